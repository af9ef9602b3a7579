//! ByteStream resource names of REAPI v2.
//!
//! - read:  `{instance_name}/blobs/{function/}?{hash}/{size}`
//!          `{instance_name}/compressed-blobs/zstd/{function/}?{hash}/{size}`
//! - write: `{instance_name}/uploads/{uuid}/blobs/{function/}?{hash}/{size}{/optional_metadata}`
//!          `{instance_name}/uploads/{uuid}/compressed-blobs/zstd/{function/}?{hash}/{size}{/...}`
//!
//! The instance name may itself contain `/`, but none of its segments may be one of the
//! reserved words, which is what makes the split unambiguous.

use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};

/// A parsed blob resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobResource {
    pub instance_name: String,
    pub digest: BlobDigest,
    pub compressed: bool,
    /// For writes: the key of the upload, stable across resumed Write calls and QueryWriteStatus
    /// (instance, uuid and blob; the optional metadata is left out).
    pub upload_key: Option<String>,
}

fn bad(name: &str, why: &str) -> KilnError {
    KilnError::invalid(format!("malformed resource name {name:?}: {why}"))
}

/// Parses a read resource name.
pub fn parse_read(name: &str) -> Result<BlobResource> {
    let segs: Vec<&str> = name.split('/').collect();
    let pos = segs
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
        .ok_or_else(|| bad(name, "expected `{instance}/blobs/{hash}/{size}` or `{instance}/compressed-blobs/zstd/{hash}/{size}`"))?;
    let instance = segs[..pos].join("/");
    check_instance(name, &segs[..pos])?;
    let (digest, compressed, rest) = parse_blob_part(name, &segs[pos..])?;
    if !rest.is_empty() {
        return Err(bad(name, "unexpected segments after the size"));
    }
    Ok(BlobResource { instance_name: instance, digest, compressed, upload_key: None })
}

/// Parses a write resource name.
pub fn parse_write(name: &str) -> Result<BlobResource> {
    let segs: Vec<&str> = name.split('/').collect();
    let pos = segs
        .iter()
        .position(|s| *s == "uploads")
        .ok_or_else(|| bad(name, "expected `{instance}/uploads/{uuid}/blobs/{hash}/{size}`"))?;
    check_instance(name, &segs[..pos])?;
    let uuid = segs.get(pos + 1).filter(|u| !u.is_empty()).ok_or_else(|| bad(name, "missing upload uuid"))?;
    let (digest, compressed, rest) = parse_blob_part(name, &segs[pos + 2..])?;
    let key_len = segs.len() - rest.len();
    Ok(BlobResource {
        instance_name: segs[..pos].join("/"),
        digest,
        compressed,
        upload_key: Some(segs[..key_len].join("/")).filter(|_| !uuid.is_empty()),
    })
}

const RESERVED: [&str; 7] = ["blobs", "uploads", "compressed-blobs", "actions", "actionResults", "operations", "capabilities"];

fn check_instance(name: &str, segs: &[&str]) -> Result<()> {
    if let Some(r) = segs.iter().find(|s| RESERVED.contains(s)) {
        return Err(bad(name, &format!("instance name uses the reserved word {r:?}")));
    }
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") && !segs.is_empty() {
        return Err(bad(name, "instance name has an empty, `.` or `..` segment"));
    }
    Ok(())
}

/// Parses `blobs/...` or `compressed-blobs/zstd/...`; returns the digest, whether compressed,
/// and the segments left after the size.
fn parse_blob_part<'a>(name: &str, segs: &'a [&'a str]) -> Result<(BlobDigest, bool, &'a [&'a str])> {
    let (compressed, mut i) = match segs.first() {
        Some(&"blobs") => (false, 1),
        Some(&"compressed-blobs") => {
            match segs.get(1) {
                Some(&"zstd") => {}
                Some(other) => {
                    return Err(bad(name, &format!("compressor {other:?} is not supported (Kiln supports zstd)")))
                }
                None => return Err(bad(name, "missing compressor")),
            }
            (true, 2)
        }
        _ => return Err(bad(name, "expected `blobs` or `compressed-blobs`")),
    };
    let mut function = DigestFunction::Sha256;
    let first = segs.get(i).ok_or_else(|| bad(name, "missing hash"))?;
    if let Some(f) = DigestFunction::from_resource_segment(first) {
        function = f?;
        i += 1;
    }
    let hash = segs.get(i).ok_or_else(|| bad(name, "missing hash"))?;
    let size_s = segs.get(i + 1).ok_or_else(|| bad(name, "missing size"))?;
    let size: i64 = size_s.parse().map_err(|_| bad(name, &format!("size {size_s:?} is not a number")))?;
    let digest = BlobDigest::parse(function, hash, size).map_err(|e| bad(name, &e.to_string()))?;
    Ok((digest, compressed, &segs[i + 2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_reads_with_and_without_instance_and_function() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!((r.instance_name.as_str(), r.compressed, r.digest.size), ("", false, 0));
        let r = parse_read(&format!("a/b/compressed-blobs/zstd/blake3/{H}/12")).unwrap();
        assert_eq!(r.instance_name, "a/b");
        assert!(r.compressed);
        assert_eq!(r.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn parses_writes_and_keys_them_without_metadata() {
        let r = parse_write(&format!("inst/uploads/u-1/blobs/{H}/5/extra/meta")).unwrap();
        assert_eq!(r.upload_key.as_deref(), Some(format!("inst/uploads/u-1/blobs/{H}/5").as_str()));
        let r2 = parse_write(&format!("inst/uploads/u-1/blobs/{H}/5")).unwrap();
        assert_eq!(r.upload_key, r2.upload_key);
    }

    #[test]
    fn refuses_malformed_names_naming_the_problem() {
        for (n, want) in [
            (format!("blobs/{H}"), "missing size"),
            (format!("blobs/{H}/x"), "not a number"),
            (format!("blobs/zz/1"), "hex"),
            (format!("compressed-blobs/gzip/{H}/1"), "gzip"),
            (format!("blobs/sha1/{H}/1"), "SHA1"),
            ("nothing/here".to_string(), "expected"),
            (format!("blobs/{H}/1/extra"), "after the size"),
        ] {
            let e = parse_read(&n).unwrap_err().to_string();
            assert!(e.contains(want), "{n}: {e}");
        }
        assert!(parse_write(&format!("uploads//blobs/{H}/1")).is_err());
        assert!(parse_write(&format!("blobs/{H}/1")).is_err());
    }
}
