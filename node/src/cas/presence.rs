//! The presence cache: blobs recently found or stored, with their size and recorded access
//! time, so that a presence check of a blob seen within the touch granularity needs no index
//! read.
//!
//! Two generations of plain hash maps instead of an LRU list: inserts go to the young map;
//! when it is full, the old map is cleared and the two swap. A hit in the old map moves the
//! entry back to the young one. Every entry thus stays for at least one generation, recently
//! used ones longer, and a lookup is one hash probe with the value inline, where the LRU
//! list's node chasing cost a fifth of FindMissingBlobs' time in profiles.
//!
//! Entries are compact (40 bytes: the first 16 bytes of the key, mixed with its digest
//! function, then size, access time and, for a packed blob whose bytes were checked by this
//! process, where its record is) so that the cache can span the blobs of a whole store: a
//! FindMissingBlobs that walks more blobs than the cache holds misses on every one of them,
//! and each miss is an index read. With the record's place, reading a small blob needs no
//! index read either; the record's own header (key and size) confirms it is still that
//! blob's. Sixteen bytes of a SHA-256 or BLAKE3 hash tell blobs apart
//! as surely as all 32 (a clash needs about 2^64 work to find, and one of the two blobs is
//! someone else's); the size is compared too.

use std::collections::HashMap;

use super::pack::Loc;
use crate::digest::HASH_LEN;

type Key = [u8; 1 + HASH_LEN];
/// The first 16 hash bytes of a key, the digest function's byte folded into the top one (two
/// words rather than a `u128`, whose 16-byte alignment would pad every entry to 48 bytes).
type Short = (u64, u64);

/// What the cache knows of a blob: its size, its access time as recorded in the index (ms),
/// and where its pack record is, if it is packed and its bytes were checked by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    pub size: u64,
    pub atime: u64,
    /// `(pack + 1) << 40 | offset`; 0 for none (a file, unchecked, or out of range).
    loc: u64,
}

impl Seen {
    pub fn new(size: u64, atime: u64) -> Self {
        Self { size, atime, loc: 0 }
    }

    /// With the blob's pack record at `loc`: kept if the pack id fits 24 bits and the offset
    /// 40 (a terabyte), as every pack of a store does in practice; else left out.
    pub fn at(self, loc: Option<Loc>) -> Self {
        let loc = match loc {
            Some(l) if u64::from(l.pack) + 1 < (1 << 24) && l.offset < (1 << 40) => ((u64::from(l.pack) + 1) << 40) | l.offset,
            _ => 0,
        };
        Self { loc, ..self }
    }

    pub fn loc(&self) -> Option<Loc> {
        (self.loc != 0).then(|| Loc { pack: ((self.loc >> 40) - 1) as u32, offset: self.loc & ((1 << 40) - 1) })
    }
}
/// A seeded fast hasher: the keys are client-chosen, SipHash's cost showed in profiles.
type Hasher = foldhash::fast::RandomState;

pub(super) struct PresenceCache {
    young: HashMap<Short, Seen, Hasher>,
    old: HashMap<Short, Seen, Hasher>,
    /// Entries per generation at most.
    generation: usize,
}

fn short(key: &Key) -> Short {
    let word = |i: usize| u64::from_le_bytes(key[i..i + 8].try_into().expect("8 bytes"));
    (word(1), word(9) ^ (u64::from(key[0]) << 56))
}

impl PresenceCache {
    /// A cache of at most `entries` entries. The maps take their memory at once (hash tables
    /// round up to a power of two buckets of 41 bytes, 7/8 of them usable), but the operating
    /// system provides pages only as entries land in them.
    pub fn new(entries: usize) -> Self {
        let generation = (entries / 2).max(1);
        Self {
            young: HashMap::with_capacity_and_hasher(generation, Hasher::default()),
            old: HashMap::with_capacity_and_hasher(generation, Hasher::default()),
            generation,
        }
    }

    /// The entry of `key`, without moving it.
    pub fn peek(&self, key: &Key) -> Option<Seen> {
        let k = short(key);
        self.young.get(&k).or_else(|| self.old.get(&k)).copied()
    }

    /// The entry of `key`, moved to the young generation if it was in the old one.
    pub fn get(&mut self, key: &Key) -> Option<Seen> {
        let k = short(key);
        if let Some(v) = self.young.get(&k) {
            return Some(*v);
        }
        let v = self.old.remove(&k)?;
        self.put_short(k, v);
        Some(v)
    }

    pub fn put(&mut self, key: Key, value: Seen) {
        self.put_short(short(&key), value);
    }

    fn put_short(&mut self, key: Short, value: Seen) {
        if self.young.len() >= self.generation && !self.young.contains_key(&key) {
            // The old generation goes; its allocation serves the next young one.
            self.old.clear();
            std::mem::swap(&mut self.young, &mut self.old);
        }
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    pub fn pop(&mut self, key: &Key) {
        let k = short(key);
        self.young.remove(&k);
        self.old.remove(&k);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u32) -> Key {
        let mut k = [0u8; 33];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn stays_bounded_keeps_recently_used_entries_and_forgets_popped_ones() {
        let mut c = PresenceCache::new(100);
        for i in 0..1000 {
            c.put(k(i), Seen::new(i as u64, 0));
            // Entry 0 is used all along: it is never dropped.
            assert_eq!(c.get(&k(0)), Some(Seen::new(0, 0)), "after {i}");
            assert!(c.len() <= 100);
        }
        assert_eq!(c.peek(&k(999)), Some(Seen::new(999, 0)), "the newest stays");
        assert!(c.peek(&k(500)).is_none(), "old unused ones went");
        c.put(k(999), Seen::new(999, 5));
        assert_eq!(c.peek(&k(999)), Some(Seen::new(999, 5)), "an update replaces");
        c.pop(&k(0));
        assert!(c.peek(&k(0)).is_none());
    }

    #[test]
    fn keys_of_other_digest_functions_or_other_bytes_are_other_entries() {
        let mut c = PresenceCache::new(100);
        let mut sha = [7u8; 33];
        sha[0] = 1;
        let mut blake = sha;
        blake[0] = 2;
        let mut other = sha;
        other[16] ^= 1;
        c.put(sha, Seen::new(1, 1));
        assert_eq!(c.peek(&sha), Some(Seen::new(1, 1)));
        assert!(c.peek(&blake).is_none());
        assert!(c.peek(&other).is_none());
    }

    #[test]
    fn pack_places_round_trip_unless_out_of_range_and_entries_stay_compact() {
        let s = Seen::new(4096, 7);
        assert_eq!(s.loc(), None);
        for loc in [Loc { pack: 0, offset: 0 }, Loc { pack: 3, offset: 123_456_789 }, Loc { pack: (1 << 24) - 2, offset: (1 << 40) - 1 }] {
            let with = s.at(Some(loc));
            assert_eq!(with.loc(), Some(loc));
            assert_eq!((with.size, with.atime), (4096, 7));
        }
        assert_eq!(s.at(Some(Loc { pack: (1 << 24) - 1, offset: 0 })).loc(), None);
        assert_eq!(s.at(Some(Loc { pack: 0, offset: 1 << 40 })).loc(), None);
        assert_eq!(s.at(Some(Loc { pack: 1, offset: 1 })).at(None).loc(), None);
        assert_eq!(std::mem::size_of::<(Short, Seen)>(), 40);
    }
}
