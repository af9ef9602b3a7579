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
//! Entries are compact (32 bytes: the first 16 bytes of the key, mixed with its digest
//! function, then size and access time) so that the cache can span the blobs of a whole store:
//! a FindMissingBlobs that walks more blobs than the cache holds misses on every one of them,
//! and each miss is an index read. Sixteen bytes of a SHA-256 or BLAKE3 hash tell blobs apart
//! as surely as all 32 (a clash needs about 2^64 work to find, and one of the two blobs is
//! someone else's); the size is compared too.

use std::collections::HashMap;

use crate::digest::HASH_LEN;

type Key = [u8; 1 + HASH_LEN];
/// `(size, recorded access time in ms)`.
pub(super) type Seen = (u64, u64);
/// The first 16 hash bytes of a key, the digest function's byte folded into the top one.
type Short = u128;
/// A seeded fast hasher: the keys are client-chosen, SipHash's cost showed in profiles.
type Hasher = foldhash::fast::RandomState;

pub(super) struct PresenceCache {
    young: HashMap<Short, Seen, Hasher>,
    old: HashMap<Short, Seen, Hasher>,
    /// Entries per generation at most.
    generation: usize,
}

fn short(key: &Key) -> Short {
    let mut b = [0u8; 16];
    b.copy_from_slice(&key[1..17]);
    u128::from_le_bytes(b) ^ (u128::from(key[0]) << 120)
}

impl PresenceCache {
    /// A cache of at most `entries` entries. The maps take their memory at once (hash tables
    /// round up to a power of two buckets of 33 bytes, 7/8 of them usable), but the operating
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
            c.put(k(i), (i as u64, 0));
            // Entry 0 is used all along: it is never dropped.
            assert_eq!(c.get(&k(0)), Some((0, 0)), "after {i}");
            assert!(c.len() <= 100);
        }
        assert_eq!(c.peek(&k(999)), Some((999, 0)), "the newest stays");
        assert!(c.peek(&k(500)).is_none(), "old unused ones went");
        c.put(k(999), (999, 5));
        assert_eq!(c.peek(&k(999)), Some((999, 5)), "an update replaces");
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
        c.put(sha, (1, 1));
        assert_eq!(c.peek(&sha), Some((1, 1)));
        assert!(c.peek(&blake).is_none());
        assert!(c.peek(&other).is_none());
    }
}
