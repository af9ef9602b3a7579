//! The memory tier: recently used small blobs, bounded in bytes.

use bytes::Bytes;
use lru::LruCache;

use crate::digest::HASH_LEN;

type Key = [u8; 1 + HASH_LEN];

/// An LRU of blob bytes bounded by their total size. Only verified bytes are inserted, so a hit
/// can be served without touching the disk.
pub(super) struct MemoryTier {
    cache: LruCache<Key, Bytes>,
    bytes: u64,
    max_bytes: u64,
    max_blob_bytes: u64,
}

impl MemoryTier {
    pub(super) fn new(max_bytes: u64, max_blob_bytes: u64) -> Self {
        Self { cache: LruCache::unbounded(), bytes: 0, max_bytes, max_blob_bytes }
    }

    pub(super) fn get(&mut self, key: &Key) -> Option<Bytes> {
        self.cache.get(key).cloned()
    }

    pub(super) fn insert(&mut self, key: Key, data: Bytes) {
        let len = data.len() as u64;
        if self.max_bytes == 0 || len > self.max_blob_bytes {
            return;
        }
        if let Some(old) = self.cache.put(key, data) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += len;
        while self.bytes > self.max_bytes {
            match self.cache.pop_lru() {
                Some((_, evicted)) => self.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }

    pub(super) fn remove(&mut self, key: &Key) {
        if let Some(old) = self.cache.pop(key) {
            self.bytes -= old.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_bound_and_drops_least_recent() {
        let mut m = MemoryTier::new(100, 60);
        m.insert([1; 33], Bytes::from(vec![0; 40]));
        m.insert([2; 33], Bytes::from(vec![0; 40]));
        assert!(m.get(&[1; 33]).is_some()); // 1 is now the most recent
        m.insert([3; 33], Bytes::from(vec![0; 40]));
        assert!(m.bytes <= 100);
        assert!(m.get(&[2; 33]).is_none());
        assert!(m.get(&[1; 33]).is_some() && m.get(&[3; 33]).is_some());
        m.insert([4; 33], Bytes::from(vec![0; 61]));
        assert!(m.get(&[4; 33]).is_none(), "blobs over the per-blob limit are not kept");
    }
}
