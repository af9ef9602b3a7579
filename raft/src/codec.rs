//! The one versioned record codec.
//!
//! Every record is `[format version: u8][bincode 2 body]`. bincode is pinned at `=2.0.1` and no
//! longer developed, so nothing outside this module names it: replacing it means changing this
//! file and bumping the version byte, while the old decoder stays to read older records.
//!
//! Why not protobuf for our own records: bincode's serde path lets a plain Rust struct be the
//! schema, and the version byte gives explicit, tested evolution. Records that *are* protobuf
//! messages (an `ActionResult`) are stored as protobuf behind the same version byte.

use serde::{de::DeserializeOwned, Serialize};

/// Errors decoding a stored record.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record has format version {found}, this build reads versions up to {max}")]
    UnknownVersion { found: u8, max: u8 },
    #[error("record body does not decode: {0}")]
    Body(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` behind `version`.
pub fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Encoding into a Vec cannot fail for the plain data types Kiln stores (no maps with
    // non-serializable keys, no custom serializers that error).
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("bincode encoding into a Vec is infallible for Kiln's record types");
    out
}

/// Splits a record into its version byte and body.
pub fn split(record: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    match record.split_first() {
        Some((v, body)) => Ok((*v, body)),
        None => Err(CodecError::Empty),
    }
}

/// Decodes a bincode body written by [`encode`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    bincode::serde::decode_from_slice(body, config())
        .map(|(v, _)| v)
        .map_err(|e| CodecError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        size: u64,
        atime: u64,
        name: String,
    }

    #[test]
    fn round_trip_keeps_version_and_body() {
        let s = Sample { size: 42, atime: 7, name: "x".into() };
        let rec = encode(3, &s);
        let (v, body) = split(&rec).unwrap();
        assert_eq!(v, 3);
        assert_eq!(decode_body::<Sample>(body).unwrap(), s);
    }

    #[test]
    fn checked_in_encoding_still_decodes() {
        // Bytes produced by version 1 of this codec for Sample { size: 42, atime: 7, name: "x" }.
        // If this fails, a dependency or codec change altered the on-disk format.
        let golden: &[u8] = &[1, 42, 7, 1, b'x'];
        assert_eq!(encode(1, &Sample { size: 42, atime: 7, name: "x".into() }), golden);
        let (v, body) = split(golden).unwrap();
        assert_eq!(v, 1);
        assert_eq!(decode_body::<Sample>(body).unwrap(), Sample { size: 42, atime: 7, name: "x".into() });
    }

    #[test]
    fn empty_and_garbage_records_are_errors_not_panics() {
        assert!(matches!(split(&[]), Err(CodecError::Empty)));
        assert!(decode_body::<Sample>(&[0xff, 0xff, 0xff]).is_err());
    }
}
