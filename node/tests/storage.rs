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

/// Opens a node's index database. sled's flusher thread lets go of a dropped database a
/// moment later: the lock is retried.
fn open_index(data_dir: &std::path::Path) -> sled::Db {
    for _ in 0..200 {
        if let Ok(db) = sled::open(data_dir.join("index")) {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("index stays locked");
}

/// Waits for the start-up scan of blob files that follows an unclean shutdown.
fn wait_for_scan(store: &kiln_node::cas::BlobStore) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.index_complete() {
        assert!(std::time::Instant::now() < deadline, "the scan did not finish");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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
    let open_db = || open_index(dir.path());
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
    wait_for_scan(&store);
    assert_eq!(store.find_missing(&[d, absent]).unwrap(), vec![absent]);
    assert_eq!(store.read_all(&d).unwrap().unwrap(), data);
    assert!(store.stored_bytes() >= 5000);
    let _ = BlobDigest::parse(DigestFunction::Sha256, &hex, 5000).unwrap();
}

/// Whole blobs are written at their final path (no temp file and rename). A file a crash left
/// there half-written, or full-length but wrong, is never served, and the blob can be stored
/// again over it.
#[test]
fn a_blob_file_a_crash_left_behind_is_never_served_and_is_replaced() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let open_db = || open_index(dir.path());
    let half = pseudo_random(6000, 41);
    let wrong = pseudo_random(6000, 42);
    let dh = DigestFunction::Sha256.digest_of(&half);
    let dw = DigestFunction::Sha256.digest_of(&wrong);
    let path = |d: &kiln_node::digest::BlobDigest| {
        let hex = d.hex();
        dir.path().join("cas/sha256").join(&hex[..2]).join(hex)
    };
    {
        let db = open_db();
        let store = BlobStore::open(&cfg, &db).unwrap();
        assert!(store.put_checked_many(vec![(dh, half.clone().into())]).iter().all(|r| r.is_ok()));
        assert_eq!(std::fs::read(path(&dh)).unwrap(), half, "written at its final path");
        assert_eq!(std::fs::read_dir(dir.path().join("cas/tmp")).unwrap().count(), 0, "no temp file left");
        // No close(): this start ends like a crash.
    }
    {
        let db = open_db();
        db.open_tree("cas_index").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    // What the crash left: the first half of one blob, and a full-length file of wrong bytes.
    std::fs::write(path(&dh), &half[..3000]).unwrap();
    std::fs::write(path(&dw), &half).unwrap();
    let db = open_db();
    let store = BlobStore::open(&cfg, &db).unwrap();
    wait_for_scan(&store);
    assert_eq!(store.find_missing(&[dh]).unwrap(), vec![dh], "a half-written file is not the blob");
    assert!(store.read_all(&dw).unwrap().is_none(), "a file whose bytes do not match is never served");
    assert!(store.put_checked_many(vec![(dh, half.clone().into()), (dw, wrong.clone().into())]).iter().all(|r| r.is_ok()));
    assert_eq!(&store.read_all(&dh).unwrap().unwrap()[..], &half[..]);
    assert_eq!(&store.read_all(&dw).unwrap().unwrap()[..], &wrong[..]);
    assert_eq!(std::fs::read(path(&dh)).unwrap(), half);
}
