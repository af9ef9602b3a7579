//! ByteStream reads and writes against a real node: offsets, limits, resumption, zstd.

mod common;

use common::*;
use kiln_proto::bytestream::QueryWriteStatusRequest;

#[tokio::test]
async fn write_then_read_whole_and_ranges() {
    let n = TestNode::start().await;
    let data = pseudo_random(3 << 20, 7); // several read chunks
    let d = sha256(&data);
    let committed = bs_write(&n, &upload_resource("inst", "u1", &d), &data).await.unwrap();
    assert_eq!(committed, data.len() as i64);
    let res = blob_resource("inst", &d);
    assert_eq!(bs_read(&n, &res, 0, 0).await.unwrap(), data);
    assert_eq!(bs_read(&n, &res, 1000, 0).await.unwrap(), &data[1000..]);
    assert_eq!(bs_read(&n, &res, 1000, 5000).await.unwrap(), &data[1000..6000]);
    assert_eq!(bs_read(&n, &res, (1 << 20) - 3, (1 << 20) + 10).await.unwrap(), &data[(1 << 20) - 3..(2 << 20) + 7]);
    assert_eq!(bs_read(&n, &res, data.len() as i64, 0).await.unwrap(), Vec::<u8>::new());
    // A blob is content-addressed: any instance name reads it.
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 10).await.unwrap(), &data[..10]);
}

#[tokio::test]
async fn an_interrupted_upload_resumes_from_the_committed_size() {
    let n = TestNode::start().await;
    let data = pseudo_random(1 << 20, 3);
    let d = sha256(&data);
    let res = upload_resource("", "resume-1", &d);
    let half = 300_000;

    // First Write: part of the data, then the client closes without finish_write.
    let reqs = write_requests(&res, &data[..half], 0, 64 << 10, false);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, half as i64);

    let status = n.bs().query_write_status(QueryWriteStatusRequest { resource_name: res.clone() }).await.unwrap().into_inner();
    assert_eq!(status.committed_size, half as i64);
    assert!(!status.complete);

    // Resume from a little before the committed size: the overlap is skipped.
    let reqs = write_requests(&res, &data, half - 1000, 64 << 10, true);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);

    let status = n.bs().query_write_status(QueryWriteStatusRequest { resource_name: res.clone() }).await.unwrap().into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, data.len() as i64);
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn unknown_upload_reports_zero_and_a_fresh_write_restarts() {
    let n = TestNode::start().await;
    let data = pseudo_random(10_000, 4);
    let d = sha256(&data);
    let res = upload_resource("", "fresh", &d);
    let s = n.bs().query_write_status(QueryWriteStatusRequest { resource_name: res.clone() }).await.unwrap().into_inner();
    assert_eq!((s.committed_size, s.complete), (0, false));
    // Park a partial, then start over from 0: the partial is discarded, the blob is right.
    let reqs = write_requests(&res, &data[..5000], 0, 1000, false);
    n.bs().write(futures::stream::iter(reqs)).await.unwrap();
    assert_eq!(bs_write(&n, &res, &data).await.unwrap(), data.len() as i64);
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
}

#[tokio::test]
async fn writing_a_stored_blob_finishes_at_once() {
    let n = TestNode::start().await;
    let data = pseudo_random(200_000, 5);
    let d = sha256(&data);
    bs_write(&n, &upload_resource("", "a", &d), &data).await.unwrap();
    // Only the first chunk is sent, without finish_write: the server still answers complete.
    let reqs = write_requests(&upload_resource("", "b", &d), &data[..1000], 0, 1000, false);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
}

#[tokio::test]
async fn zstd_compressed_blobs_round_trip_both_ways() {
    let n = TestNode::start().await;
    let data: Vec<u8> = b"kiln compresses well ".repeat(100_000);
    let d = sha256(&data);
    let compressed = zstd::stream::encode_all(&data[..], 3).unwrap();
    let wres = format!("uploads/z1/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    let reqs = write_requests(&wres, &compressed, 0, 16 << 10, true);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, compressed.len() as i64);

    // Plain read gives the original bytes.
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
    // Compressed read decodes to the original.
    let rres = format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    let got = bs_read(&n, &rres, 0, 0).await.unwrap();
    assert!(got.len() < data.len() / 10, "served compressed ({} bytes)", got.len());
    assert_eq!(zstd::stream::decode_all(&got[..]).unwrap(), data);

    // A compressed upload of an already stored blob short-circuits with -1.
    let reqs = write_requests(&format!("uploads/z2/compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes), &compressed, 0, 16 << 10, true);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, -1);
}

#[tokio::test]
async fn many_concurrent_uploads_of_the_same_and_different_blobs() {
    let n = TestNode::start().await;
    let shared = pseudo_random(500_000, 11);
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let ch = n.channel.clone();
        let data = if i % 2 == 0 { shared.clone() } else { pseudo_random(100_000 + i as usize, i) };
        tasks.push(tokio::spawn(async move {
            let d = sha256(&data);
            let reqs = write_requests(&upload_resource("", &format!("c{i}"), &d), &data, 0, 32 << 10, true);
            let mut bs = kiln_proto::bytestream::byte_stream_client::ByteStreamClient::new(ch);
            bs.write(futures::stream::iter(reqs)).await.unwrap();
            (d, data)
        }));
    }
    for t in tasks {
        let (d, data) = t.await.unwrap();
        assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
    }
}

/// A large upload is hashed as it streams: a wrong digest is refused and nothing is stored, and
/// an upload parked halfway resumes with the hash state of what it had.
#[tokio::test]
async fn a_large_upload_is_checked_and_resumes_with_its_hash_state() {
    let n = TestNode::start().await;
    let data = pseudo_random(12 << 20, 77);
    let d = sha256(&data);
    let mut wrong = d.clone();
    wrong.hash = sha256(b"other").hash;
    let e = bs_write(&n, &upload_resource("", "big-wrong", &wrong), &data).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("hash mismatch"), "{}", e.message());
    assert!(bs_read(&n, &blob_resource("", &wrong), 0, 0).await.is_err(), "a mismatching blob is not stored");

    let res = upload_resource("", "big-resume", &d);
    let half = 5 << 20;
    let reqs = write_requests(&res, &data[..half], 0, 1 << 20, false);
    assert_eq!(n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size, half as i64);
    let reqs = write_requests(&res, &data, half, 1 << 20, true);
    assert_eq!(n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size, data.len() as i64);
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
}

/// Large uploads are hashed on a thread beside the file writes. Such an upload interrupted
/// midway is parked (its hashing thread ended) and resumes to the right digest, and one whose
/// bytes do not match its digest is refused.
#[tokio::test]
async fn large_uploads_resume_across_calls_and_are_checked() {
    let n = TestNode::start().await;
    let data = pseudo_random(24 << 20, 11);
    let d = sha256(&data);
    let res = upload_resource("", "large-resume", &d);
    let first = 10 << 20;
    let reqs = write_requests(&res, &data[..first], 0, 1 << 20, false);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, first as i64);
    let reqs = write_requests(&res, &data, first - 4096, 1 << 20, true);
    let committed = n.bs().write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);

    let original = pseudo_random(24 << 20, 12);
    let claimed = sha256(&original);
    let mut sent = original;
    sent[5] ^= 1;
    let err = bs_write(&n, &upload_resource("", "large-wrong", &claimed), &sent).await;
    let e = match err {
        Err(e) => e,
        Ok(c) => panic!("a mismatching large upload was accepted ({c} bytes)"),
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("hash mismatch"), "{e:?}");
    assert!(bs_read(&n, &blob_resource("", &claimed), 0, 0).await.is_err(), "a mismatching blob is not stored");
}

/// A large upload is written past the page cache and afterwards read back into it, where the
/// file system takes direct writes (the node's counters show both); it reads back intact.
#[tokio::test]
async fn a_large_upload_goes_past_the_page_cache_and_is_read_back_into_it() {
    use std::os::unix::fs::OpenOptionsExt;
    let n = TestNode::start().await;
    let data = pseudo_random(12 << 20, 91);
    let d = sha256(&data);
    bs_write(&n, &upload_resource("", "direct", &d), &data).await.unwrap();
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);

    let probe = n.dir.path().join("o_direct_probe");
    std::fs::write(&probe, b"").unwrap();
    let direct_ok = std::fs::OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(&probe).is_ok();
    let http = n.node.as_ref().unwrap().http_addr;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let (direct, read_back) = loop {
        let page = http_get(http, "/metrics").await;
        let got = (metric(&page, "kiln_cas_upload_direct_bytes_total"), metric(&page, "kiln_cas_read_back_bytes_total"));
        // The read-back runs on a thread of its own after the upload is acknowledged.
        if !direct_ok || got.1 >= data.len() as f64 || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    if direct_ok {
        assert_eq!(direct, data.len() as f64, "every byte written directly");
        assert_eq!(read_back, data.len() as f64, "and read back into the page cache");
    } else {
        assert_eq!((direct, read_back), (0.0, 0.0), "no O_DIRECT here: written through the page cache");
    }
}
