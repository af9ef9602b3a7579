//! Digests: which hash functions Kiln serves and how a client's `Digest` is checked.
//!
//! Kiln serves SHA-256 (REAPI's default) and BLAKE3. Both produce 32 bytes, so a stored blob is
//! keyed by one byte naming the function followed by the raw hash: `[function][32 bytes]`. That
//! keeps SHA-256 and BLAKE3 blobs with equal hex apart (REAPI resource names must name BLAKE3
//! explicitly for the same reason).

use kiln_proto::reapi::{self, digest_function::Value as DigestFunctionValue};

/// Length of every hash Kiln serves.
pub const HASH_LEN: usize = 32;

/// A hash function Kiln serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    /// Every function Kiln serves, in the order Capabilities lists them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// Picks the function from a request's `digest_function` field. `UNKNOWN` (0) means the
    /// client predates the field: REAPI says to infer from the hash length, and a 64-hex hash
    /// then means SHA-256.
    pub fn from_request(value: i32) -> Result<Self, DigestError> {
        match DigestFunctionValue::try_from(value) {
            Ok(DigestFunctionValue::Unknown) | Ok(DigestFunctionValue::Sha256) => Ok(Self::Sha256),
            Ok(DigestFunctionValue::Blake3) => Ok(Self::Blake3),
            Ok(other) => Err(DigestError::UnsupportedFunction(other.as_str_name().to_string())),
            Err(_) => Err(DigestError::UnsupportedFunction(format!("digest_function value {value}"))),
        }
    }

    /// The function named by a lower-case ByteStream resource segment (`blake3`, `sha256`).
    pub fn from_resource_segment(s: &str) -> Option<Result<Self, DigestError>> {
        let upper = s.to_ascii_uppercase();
        DigestFunctionValue::from_str_name(&upper).map(|v| match v {
            DigestFunctionValue::Sha256 => Ok(Self::Sha256),
            DigestFunctionValue::Blake3 => Ok(Self::Blake3),
            other => Err(DigestError::UnsupportedFunction(other.as_str_name().to_string())),
        })
    }

    pub fn to_proto(self) -> i32 {
        match self {
            Self::Sha256 => DigestFunctionValue::Sha256 as i32,
            Self::Blake3 => DigestFunctionValue::Blake3 as i32,
        }
    }

    /// The byte that prefixes this function's keys. Persisted: never renumber.
    pub fn key_byte(self) -> u8 {
        match self {
            Self::Sha256 => 1,
            Self::Blake3 => 9,
        }
    }

    pub fn from_key_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Sha256),
            9 => Some(Self::Blake3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Blake3 => "blake3",
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Self::Sha256 => Hasher::Sha256(Box::default()),
            Self::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    /// The digest of the empty blob under this function (computed once).
    pub fn empty(self) -> BlobDigest {
        static EMPTY: std::sync::OnceLock<[BlobDigest; 2]> = std::sync::OnceLock::new();
        let both = EMPTY.get_or_init(|| {
            DigestFunction::ALL.map(|f| BlobDigest { function: f, hash: f.hasher().finalize(), size: 0 })
        });
        both[DigestFunction::ALL.iter().position(|f| *f == self).unwrap_or(0)]
    }

    /// Hashes a whole in-memory buffer.
    pub fn digest_of(self, data: &[u8]) -> BlobDigest {
        let mut h = self.hasher();
        h.update(data);
        BlobDigest { function: self, hash: h.finalize(), size: data.len() as u64 }
    }
}

/// Why a client's digest was refused. Each names the offending value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest function {0} is not supported (Kiln serves SHA256 and BLAKE3)")]
    UnsupportedFunction(String),
    #[error("digest hash {0:?} is not {1} lower-case hex characters")]
    BadHash(String, usize),
    #[error("digest {0} has negative size_bytes {1}")]
    NegativeSize(String, i64),
    #[error("digest is missing")]
    Missing,
}

/// A validated digest: function, raw hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobDigest {
    pub function: DigestFunction,
    pub hash: [u8; HASH_LEN],
    pub size: u64,
}

impl std::fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl BlobDigest {
    /// Validates a client's digest under `function`.
    pub fn from_proto(function: DigestFunction, d: &reapi::Digest) -> Result<Self, DigestError> {
        Self::parse(function, &d.hash, d.size_bytes)
    }

    /// Same as [`Self::from_proto`] for an optional field.
    pub fn from_proto_opt(function: DigestFunction, d: Option<&reapi::Digest>) -> Result<Self, DigestError> {
        d.ok_or(DigestError::Missing).and_then(|d| Self::from_proto(function, d))
    }

    pub fn parse(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        Self::parse_ascii(function, hash_hex.as_bytes(), size)
    }

    /// [`Self::parse`] of a hash as the bytes it arrived in (a protobuf string field read in
    /// place): anything but lower-case hex is refused, so no UTF-8 check is needed first.
    pub fn parse_ascii(function: DigestFunction, hash_hex: &[u8], size: i64) -> Result<Self, DigestError> {
        // One pass, lowercase only (REAPI hashes are lowercase hex). This runs once per digest
        // of every FindMissingBlobs, so it avoids the general-purpose decoder and branches: a
        // table maps each byte to its nibble, or to 0xff, whose high bits flag the whole hash.
        const NIBBLE: [u8; 256] = {
            let mut t = [0xffu8; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        let bytes = hash_hex;
        let shown = || String::from_utf8_lossy(hash_hex).into_owned();
        if bytes.len() != HASH_LEN * 2 {
            return Err(DigestError::BadHash(shown(), HASH_LEN * 2));
        }
        let mut hash = [0u8; HASH_LEN];
        let mut flags = 0u8;
        for (out, pair) in hash.iter_mut().zip(bytes.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
            flags |= hi | lo;
            *out = hi << 4 | (lo & 0x0f);
        }
        if flags & 0xf0 != 0 {
            return Err(DigestError::BadHash(shown(), HASH_LEN * 2));
        }
        if size < 0 {
            return Err(DigestError::NegativeSize(shown(), size));
        }
        Ok(Self { function, hash, size: size as u64 })
    }

    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Vec::with_capacity(HASH_LEN * 2);
        for b in self.hash {
            out.push(DIGITS[(b >> 4) as usize]);
            out.push(DIGITS[(b & 15) as usize]);
        }
        String::from_utf8(out).expect("hex digits are ASCII")
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hex(), size_bytes: self.size as i64 }
    }

    pub fn is_empty_blob(&self) -> bool {
        *self == self.function.empty()
    }

    /// The store key: `[function byte][hash]`. The size is not part of the key: two digests with
    /// the same hash and different sizes cannot both be valid.
    pub fn key(&self) -> [u8; 1 + HASH_LEN] {
        let mut k = [0u8; 1 + HASH_LEN];
        k[0] = self.function.key_byte();
        k[1..].copy_from_slice(&self.hash);
        k
    }
}

/// An incremental hasher for one of the served functions.
pub enum Hasher {
    Sha256(Box<sha2::Sha256>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn function(&self) -> DigestFunction {
        match self {
            Hasher::Sha256(_) => DigestFunction::Sha256,
            Hasher::Blake3(_) => DigestFunction::Blake3,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finalize(self) -> [u8; HASH_LEN] {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digests_are_the_well_known_values() {
        assert_eq!(
            DigestFunction::Sha256.empty().hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            DigestFunction::Blake3.empty().hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn bad_hashes_and_sizes_are_refused_with_the_value() {
        let e = BlobDigest::parse(DigestFunction::Sha256, "abc", 1).unwrap_err();
        assert!(e.to_string().contains("\"abc\""));
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert!(BlobDigest::parse(DigestFunction::Sha256, upper, 0).is_err());
        let ok = DigestFunction::Sha256.empty().hex();
        assert!(matches!(BlobDigest::parse(DigestFunction::Sha256, &ok, -1), Err(DigestError::NegativeSize(..))));
    }

    proptest::proptest! {
        #[test]
        fn hex_round_trips_and_any_non_hex_character_is_refused(hash in proptest::array::uniform32(0u8..), at in 0usize..64, c in proptest::char::any()) {
            let d = BlobDigest { function: DigestFunction::Sha256, hash, size: 7 };
            let hex = d.hex();
            proptest::prop_assert_eq!(&hex, &hex::encode(hash));
            proptest::prop_assert_eq!(BlobDigest::parse(DigestFunction::Sha256, &hex, 7).unwrap(), d);
            let mut chars: Vec<char> = hex.chars().collect();
            chars[at] = c;
            let changed: String = chars.into_iter().collect();
            let is_hex = c.is_ascii_digit() || ('a'..='f').contains(&c);
            proptest::prop_assert_eq!(BlobDigest::parse(DigestFunction::Sha256, &changed, 7).is_ok(), is_hex);
        }
    }

    #[test]
    fn unknown_function_means_sha256_and_others_are_named() {
        assert_eq!(DigestFunction::from_request(0).unwrap(), DigestFunction::Sha256);
        assert_eq!(DigestFunction::from_request(9).unwrap(), DigestFunction::Blake3);
        assert!(DigestFunction::from_request(2).unwrap_err().to_string().contains("SHA1"));
        assert!(DigestFunction::from_request(77).unwrap_err().to_string().contains("77"));
    }
}
