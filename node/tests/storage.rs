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

/// A store's configuration without a memory tier, with a size limit and a protect window,
/// and `n` blobs of `size` bytes (seeded from `seed`) with their digests.
fn eviction_setup(
    dir: &std::path::Path,
    max_size_bytes: u64,
    protect_window_secs: u64,
    (n, size, seed): (usize, usize, u64),
) -> (kiln_node::config::Config, Vec<Vec<u8>>, Vec<kiln_node::digest::BlobDigest>) {
    let mut cfg = test_config(dir);
    cfg.storage.memory_tier_bytes = 0;
    cfg.storage.protect_window_secs = protect_window_secs;
    cfg.storage.max_size_bytes = max_size_bytes;
    let blobs: Vec<Vec<u8>> = (0..n).map(|i| pseudo_random(size, seed + i as u64)).collect();
    let digests = blobs.iter().map(|b| kiln_node::digest::DigestFunction::Sha256.digest_of(b)).collect();
    (cfg, blobs, digests)
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

/// Whole blobs too large for packs are written at their final path (no temp file and rename).
/// A file a crash left there half-written, or full-length but wrong, is never served, and the
/// blob can be stored again over it.
#[test]
fn a_blob_file_a_crash_left_behind_is_never_served_and_is_replaced() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let open_db = || open_index(dir.path());
    let half = pseudo_random(100_000, 41);
    let wrong = pseudo_random(100_000, 42);
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
    std::fs::write(path(&dh), &half[..50_000]).unwrap();
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

fn pack_files(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data_dir.join("cas/packs")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// Small blobs stored whole share pack files. After a crash that lost their index entries the
/// start-up scan finds them again; a record whose bytes rotted is dropped on first read, and a
/// torn last record is not the blob.
#[test]
fn packed_blobs_are_found_after_a_crash_and_damaged_records_are_never_served() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.storage.memory_tier_bytes = 0;
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| pseudo_random(1000 + i * 13, 500 + i as u64)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| DigestFunction::Sha256.digest_of(b)).collect();
    {
        let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
        for (bs, ds) in blobs.chunks(100).zip(digests.chunks(100)) {
            let batch = ds.iter().zip(bs).map(|(d, b)| (*d, b.clone().into())).collect();
            assert!(store.put_checked_many(batch).iter().all(|r| r.is_ok()));
        }
        assert!(store.find_missing(&digests).unwrap().is_empty());
        assert_eq!(pack_files(dir.path()).len(), 1, "300 small blobs, one pack");
        assert!(!dir.path().join("cas/sha256").join(&digests[0].hex()[..2]).join(digests[0].hex()).exists(), "no file of its own");
        // No close(): this start ends like a crash, and the index writes are lost.
    }
    {
        let db = open_index(dir.path());
        db.open_tree("cas_index").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    // Rot one byte of blob 7's record (its bytes are at the end of it), and tear the last
    // (records are found by their hash: a direct append starts on a block boundary, and the
    // file may go on past the last record, zero-filled).
    let pack = &pack_files(dir.path())[0];
    let mut bytes = std::fs::read(pack).unwrap();
    let end_of = |bytes: &[u8], i: usize| -> usize {
        let hash = &digests[i].hash[..];
        let at = bytes.windows(hash.len()).position(|w| w == hash).unwrap();
        at + hash.len() + 8 + blobs[i].len()
    };
    let end7 = end_of(&bytes, 7);
    bytes[end7 - 1] ^= 0x40;
    let end299 = end_of(&bytes, 299);
    bytes.truncate(end299 - 100);
    std::fs::write(pack, &bytes).unwrap();

    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    wait_for_scan(&store);
    assert_eq!(store.find_missing(&digests).unwrap(), vec![digests[299]], "only the torn record is missing");
    assert!(store.read_all(&digests[7]).unwrap().is_none(), "a rotted record is never served");
    assert_eq!(store.find_missing(&digests[7..8]).unwrap(), vec![digests[7]], "and is dropped for good");
    for i in (0..299).filter(|i| *i != 7) {
        assert_eq!(&store.read_all(&digests[i]).unwrap().unwrap()[..], &blobs[i][..], "blob {i}");
    }
    // Both can be stored again, in a new pack.
    let again = vec![(digests[7], blobs[7].clone().into()), (digests[299], blobs[299].clone().into())];
    assert!(store.put_checked_many(again).iter().all(|r| r.is_ok()));
    assert_eq!(pack_files(dir.path()).len(), 2);
    assert_eq!(&store.read_all(&digests[299]).unwrap().unwrap()[..], &blobs[299][..]);
    assert_eq!(&store.read_all(&digests[7]).unwrap().unwrap()[..], &blobs[7][..]);
}

/// Evicting small blobs frees their packs: a pack with nothing left is deleted, a mostly
/// unused one is compacted, so packs never hold much more than the blobs still stored, and
/// every blob still reported present reads back intact, also after a restart.
#[test]
fn evicted_small_blobs_free_their_packs() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.storage.memory_tier_bytes = 0;
    cfg.storage.protect_window_secs = 0;
    cfg.storage.max_size_bytes = 400 << 10;
    cfg.storage.pack_file_bytes = 64 << 10;
    let blobs: Vec<Vec<u8>> = (0..400).map(|i| pseudo_random(4096, 900 + i as u64)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| DigestFunction::Sha256.digest_of(b)).collect();
    let pack_bytes = |dir: &std::path::Path| pack_files(dir).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum::<u64>();
    {
        let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
        for (n, (bs, ds)) in blobs.chunks(10).zip(digests.chunks(10)).enumerate() {
            let batch = ds.iter().zip(bs).map(|(d, b)| (*d, b.clone().into())).collect();
            assert!(store.put_checked_many(batch).iter().all(|r| r.is_ok()), "batch {n}");
            // Keep every third blob hot, so packs end up partly used rather than all gone.
            let hot: Vec<_> = digests[..(n + 1) * 10].iter().step_by(3).copied().collect();
            let _ = store.find_missing(&hot).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(store.stored_bytes() <= 400 << 10);
        // A background pass may be moving records meanwhile: the bound holds once both are done.
        let bound = || 2 * store.stored_bytes() + (64 << 10) + 2 * (400 << 10) / 4096 * 45;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            store.compact_packs().unwrap();
            let on_disk = pack_bytes(dir.path());
            if on_disk <= bound() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{on_disk} bytes of packs for {} bytes of blobs", store.stored_bytes());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(pack_files(dir.path()).len() < 400 * 4141 / (64 << 10), "packs were deleted");
        let missing = store.find_missing(&digests).unwrap();
        assert!(missing.len() >= 300, "most were evicted");
        for (d, b) in digests.iter().zip(&blobs).filter(|(d, _)| !missing.contains(d)) {
            assert_eq!(&store.read_all(d).unwrap().unwrap()[..], &b[..]);
        }
        store.close().unwrap();
    }
    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    let missing = store.find_missing(&digests).unwrap();
    assert!(missing.len() < 400);
    for (d, b) in digests.iter().zip(&blobs).filter(|(d, _)| !missing.contains(d)) {
        assert_eq!(&store.read_all(d).unwrap().unwrap()[..], &b[..], "after a restart");
    }
}

/// A packed blob read once is read again straight from its record, without the index (the
/// presence cache remembers where the record is). Such reads stay right when compaction moves
/// the records and deletes their packs, and a dropped blob is not served.
#[test]
fn packed_blobs_read_right_after_their_records_move_or_are_dropped() {
    use kiln_node::cas::BlobStore;
    use kiln_node::digest::DigestFunction;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.storage.memory_tier_bytes = 0; // every read goes to the packs
    cfg.storage.pack_file_bytes = 64 << 10;
    let blobs: Vec<Vec<u8>> = (0..300).map(|i| pseudo_random(4096, 5000 + i as u64)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| DigestFunction::Sha256.digest_of(b)).collect();
    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    wait_for_scan(&store);
    for (bs, ds) in blobs.chunks(10).zip(digests.chunks(10)) {
        let batch = ds.iter().zip(bs).map(|(d, b)| (*d, b.clone().into())).collect();
        assert!(store.put_checked_many(batch).iter().all(|r| r.is_ok()));
    }
    let read_back = |what: &str| {
        for (i, (d, b)) in digests.iter().zip(&blobs).enumerate() {
            let dropped = i % 3 != 0;
            match store.read_all(d).unwrap() {
                Some(got) => {
                    assert!(!dropped || what == "before", "dropped blob {i} served {what}");
                    assert_eq!(&got[..], &b[..], "blob {i} {what}");
                }
                None => assert!(dropped && what != "before", "blob {i} missing {what}"),
            }
        }
    };
    read_back("before");
    read_back("before");
    let packs_before = pack_files(dir.path());
    assert!(packs_before.len() >= 10, "{} packs", packs_before.len());
    for d in digests.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, d)| d) {
        store.drop_copy(d).unwrap();
    }
    read_back("after the drops");
    // Every closed pack is now a third live: compaction (explicit, or the background pass the
    // drops asked for) moves the survivors and deletes the packs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pack_files(dir.path()).iter().filter(|p| packs_before.contains(p)).count() > 1 {
        store.compact_packs().unwrap();
        assert!(std::time::Instant::now() < deadline, "packs were not compacted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    read_back("after compaction");
    read_back("after compaction, again");
    let missing = store.find_missing(&digests).unwrap();
    assert_eq!(missing.len(), 200);
}

/// Above 95 % of its limit a store evicts in the background, down to 90 %, so writes do not
/// wait for it; what goes are the blobs least recently used, by the index's access times.
#[test]
fn a_store_past_its_high_watermark_evicts_the_least_recently_used_in_the_background() {
    use kiln_node::cas::BlobStore;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, blobs, digests) = eviction_setup(dir.path(), 1000 * 4096, 0, (960, 4096, 5000));
    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    for (n, (bs, ds)) in blobs.chunks(10).zip(digests.chunks(10)).enumerate() {
        let batch = ds.iter().zip(bs).map(|(d, b)| (*d, b.clone().into())).collect();
        assert!(store.put_checked_many(batch).iter().all(|r| r.is_ok()), "batch {n}");
        if n == 93 {
            // 94 % of the limit: nothing goes yet.
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(store.stored_bytes(), 940 * 4096, "evicted below the high watermark");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // 960 blobs are 96 % of the limit: no write needed room, a background pass makes it. The
    // pass starts at the blob that crosses 95 %, the 951st; the last batch's other nine may be
    // stored after it ends, so the bound is 90 % plus those.
    // Checked once the pass is over: the presence checks below touch what they find, and
    // would reorder what a running pass takes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.stored_bytes() > 909 * 4096 || store.evicting() {
        assert!(std::time::Instant::now() < deadline, "still {} bytes stored", store.stored_bytes());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let missing = store.find_missing(&digests).unwrap();
    assert!(missing.len() >= 51 && missing.len() < 200, "{} evicted", missing.len());
    // Blobs of one batch share their access time: whole batches older than the kept ones went.
    let batch_of = |d: &kiln_node::digest::BlobDigest| digests.iter().position(|x| x == d).unwrap() / 10;
    let newest_gone = missing.iter().map(batch_of).max().unwrap();
    let oldest_kept = digests.iter().filter(|d| !missing.contains(d)).map(batch_of).min().unwrap();
    let mut gone_batches: Vec<usize> = missing.iter().map(batch_of).collect();
    gone_batches.sort_unstable();
    assert!(newest_gone <= oldest_kept, "batch {newest_gone} evicted while batch {oldest_kept} kept; evicted: {gone_batches:?}");
    assert!(missing.iter().map(batch_of).filter(|&b| b < newest_gone).count() == newest_gone * 10, "every older batch went whole");
    for (d, b) in digests.iter().zip(&blobs).filter(|(d, _)| !missing.contains(d)) {
        assert_eq!(&store.read_all(d).unwrap().unwrap()[..], &b[..]);
    }
}

/// A write refused because every blob was protected succeeds once the oldest leaves the
/// window (the store remembers when that is, and must not hold on to it longer).
#[test]
fn eviction_resumes_when_the_protect_window_has_passed() {
    use kiln_node::cas::BlobStore;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, blobs, digests) = eviction_setup(dir.path(), 1 << 20, 1, (5, 240 << 10, 7000));
    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    for (d, b) in digests.iter().zip(&blobs).take(4) {
        store.put(d, b.clone().into()).unwrap();
    }
    let refused = store.put(&digests[4], blobs[4].clone().into()).unwrap_err();
    assert!(refused.to_string().contains("CAS is full"), "{refused}");
    // Refused again at once, from what the failed pass recorded.
    assert!(store.put(&digests[4], blobs[4].clone().into()).is_err());
    std::thread::sleep(std::time::Duration::from_millis(1300));
    store.put(&digests[4], blobs[4].clone().into()).unwrap();
    let missing = store.find_missing(&digests).unwrap();
    assert!(!missing.is_empty() && !missing.contains(&digests[4]), "an old blob went, the new one is stored: {missing:?}");
    assert!(store.stored_bytes() <= 1 << 20);
}

/// A blob read after a restart (its bytes hashed again, its index entry marked verified) gets
/// a new access time too: it is the most recently used, and eviction takes an older one.
#[test]
fn a_blob_read_after_a_restart_counts_as_just_used() {
    use kiln_node::cas::BlobStore;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, blobs, digests) = eviction_setup(dir.path(), 1 << 20, 0, (3, 400 << 10, 8000));
    {
        let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
        for (d, b) in digests.iter().zip(&blobs).take(2) {
            store.put(d, b.clone().into()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        store.close().unwrap();
    }
    let store = BlobStore::open(&cfg, &open_index(dir.path())).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    // Blob 0, the older, is read: hashed (a new process) and touched.
    assert_eq!(&store.read_all(&digests[0]).unwrap().unwrap()[..], &blobs[0][..]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // Blob 2 needs one of the others' room.
    store.put(&digests[2], blobs[2].clone().into()).unwrap();
    assert_eq!(store.find_missing(&digests).unwrap(), vec![digests[1]], "the least recently used went");
}
