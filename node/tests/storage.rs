//! Storage behaviour of a real node: eviction under the size limit and the protect window.

mod common;

use common::*;
use kiln_proto::reapi::FindMissingBlobsRequest;

async fn missing(n: &TestNode, ds: &[kiln_proto::reapi::Digest]) -> Vec<kiln_proto::reapi::Digest> {
    n.cas()
        .find_missing_blobs(FindMissingBlobsRequest { instance_name: String::new(), blob_digests: ds.to_vec(), digest_function: 0 })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

#[tokio::test]
async fn least_recently_used_blobs_are_evicted_above_the_limit() {
    let n = TestNode::start_with(|c| {
        c.storage.max_size_bytes = 1 << 20;
        c.storage.protect_window_secs = 0;
        c.storage.memory_tier_bytes = 0;
    })
    .await;
    let blobs: Vec<Vec<u8>> = (0..10).map(|i| pseudo_random(200 << 10, 100 + i)).collect();
    let mut digests = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let d = sha256(b);
        bs_write(&n, &upload_resource("", &format!("e{i}"), &d), b).await.unwrap();
        digests.push(d);
        // Keep blob 0 hot: it is touched after every write, so it is never the oldest.
        assert!(missing(&n, &digests[..1]).await.is_empty(), "blob 0 evicted after write {i}");
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let gone = missing(&n, &digests).await;
    assert!(!gone.is_empty(), "10 x 200 KiB cannot fit in 1 MiB");
    assert!(!gone.contains(&digests[0]), "the recently touched blob stays");
    assert!(!gone.contains(&digests[9]), "the newest blob stays");
    assert!(gone.contains(&digests[1]), "the least recently used blob goes first");
    let stored = n.node.as_ref().unwrap().state.cas.stored_bytes();
    assert!(stored <= 1 << 20, "stored {stored} bytes over the limit");
    // What is reported present is readable.
    for (d, b) in digests.iter().zip(&blobs) {
        if !gone.contains(d) {
            assert_eq!(&bs_read(&n, &blob_resource("", d), 0, 0).await.unwrap(), b);
        }
    }
}

#[tokio::test]
async fn blobs_inside_the_protect_window_are_never_evicted() {
    let n = TestNode::start_with(|c| {
        c.storage.max_size_bytes = 1 << 20;
        c.storage.protect_window_secs = 3600;
    })
    .await;
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(240 << 10, 200 + i)).collect();
    let mut digests = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let d = sha256(b);
        bs_write(&n, &upload_resource("", &format!("p{i}"), &d), b).await.unwrap();
        digests.push(d);
    }
    let extra = pseudo_random(240 << 10, 999);
    let e = bs_write(&n, &upload_resource("", "over", &sha256(&extra)), &extra).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("CAS is full"), "{}", e.message());
    assert!(missing(&n, &digests).await.is_empty(), "every protected blob is still there");
}

/// After a crash the index may lack blobs whose files are in place (sled flushes in the
/// background): the start-up scan finds them, and until it has, misses are checked on disk.
#[test]
fn blob_files_the_index_lost_are_found_after_an_unclean_start() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::{BlobDigest, DigestFunction};
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let data = pseudo_random(5000, 77);
    let d = DigestFunction::Sha256.digest_of(&data);
    // sled's flusher thread lets go of a dropped database a moment later: retry the lock.
    let open_db = || {
        for _ in 0..200 {
            if let Ok(db) = sled::open(dir.path().join("index")) {
                return db;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("index stays locked");
    };
    {
        let db = open_db();
        let store = BlobStore::open(&cfg, &db).unwrap();
        while !store.index_complete() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        store.close().unwrap();
    }
    // A blob file in place without an index entry, as a crash right after the write leaves it.
    let hex = d.hex();
    std::fs::write(dir.path().join("cas/sha256").join(&hex[..2]).join(&hex), &data).unwrap();
    let absent = DigestFunction::Sha256.digest_of(b"absent");
    {
        // The previous start was clean: the index is trusted as is.
        let db = open_db();
        let store = BlobStore::open(&cfg, &db).unwrap();
        assert!(store.index_complete());
        assert_eq!(store.find_missing(&[d, absent]).unwrap(), vec![d, absent]);
        // No close(): this start ends like a crash.
    }
    let db = open_db();
    let store = BlobStore::open(&cfg, &db).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.index_complete() {
        assert!(std::time::Instant::now() < deadline, "the scan did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(store.find_missing(&[d, absent]).unwrap(), vec![absent]);
    assert_eq!(store.read_all(&d).unwrap().unwrap(), data);
    assert!(store.stored_bytes() >= 5000);
    let _ = BlobDigest::parse(DigestFunction::Sha256, &hex, 5000).unwrap();
}

/// Small blobs that arrive whole live in the index database, not in files; they are checked
/// once per boot (a corrupt one is dropped, never served), found again after a crash that lost
/// their index entry, and evicted like files.
#[test]
fn small_blobs_live_inline_checked_recovered_and_evicted() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.storage.inline_blob_max_bytes = 4096;
    cfg.storage.protect_window_secs = 0;
    cfg.storage.memory_tier_bytes = 0;
    let open_db = || {
        for _ in 0..200 {
            if let Ok(db) = sled::open(dir.path().join("index")) {
                return db;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("index stays locked");
    };
    let small: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(4096 - i * 100, 300 + i as u64)).collect();
    let large = pseudo_random(4097, 310);
    let ds: Vec<_> = small.iter().chain([&large]).map(|b| DigestFunction::Sha256.digest_of(b)).collect();
    let file_of = |i: usize| {
        let hex = ds[i].hex();
        dir.path().join("cas/sha256").join(&hex[..2]).join(&hex)
    };
    {
        let db = open_db();
        let store = BlobStore::open(&cfg, &db).unwrap();
        let batch = small.iter().chain([&large]).zip(&ds).map(|(b, d)| (*d, bytes::Bytes::from(b.clone()))).collect();
        assert!(store.put_checked_many(batch).iter().all(|r| r.is_ok()));
        for i in 0..3 {
            assert!(!file_of(i).exists(), "blob {i} of {} bytes became a file", small[i].len());
        }
        assert!(file_of(3).exists(), "a blob over the limit is a file");
        assert_eq!(db.open_tree("cas_inline").unwrap().len(), 3);
        for (d, b) in ds.iter().zip(small.iter().chain([&large])) {
            assert_eq!(&store.read_all(d).unwrap().unwrap()[..], &b[..]);
        }
        store.close().unwrap();
    }
    {
        // Bit rot in one inline blob, and the index entry of another lost as in a crash.
        let db = open_db();
        let inline = db.open_tree("cas_inline").unwrap();
        let mut bad = small[0].clone();
        bad[17] ^= 0x40;
        inline.insert(ds[0].key(), bad).unwrap();
        db.open_tree("cas_index").unwrap().remove(ds[1].key()).unwrap();
        db.open_tree("meta").unwrap().remove("cas_index_clean").unwrap();
        db.flush().unwrap();
    }
    let db = open_db();
    let store = BlobStore::open(&cfg, &db).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.index_complete() {
        assert!(std::time::Instant::now() < deadline, "the scan did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(store.read_all(&ds[0]).unwrap().is_none(), "a corrupt inline blob is never served");
    assert_eq!(store.find_missing(&ds).unwrap(), vec![ds[0]]);
    assert_eq!(&store.read_all(&ds[1]).unwrap().unwrap()[..], &small[1][..], "re-indexed after the lost entry");
    assert_eq!(db.open_tree("cas_inline").unwrap().len(), 2, "the corrupt bytes are gone");
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(store.evict_down_to(0).unwrap(), 3);
    assert_eq!(store.stored_bytes(), 0);
    assert_eq!(db.open_tree("cas_inline").unwrap().len(), 0, "eviction frees inline bytes");
    assert!(!file_of(3).exists());
}
