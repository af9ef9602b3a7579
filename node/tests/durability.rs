//! Durability with the real `kiln` binary: acknowledged writes survive `kill -9`, corrupt blobs
//! are never served after a restart, and a large upload streams through bounded memory.

mod common;

use common::*;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    batch_update_blobs_request, ActionResult, BatchUpdateBlobsRequest, FindMissingBlobsRequest, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};
use sha2::Digest as _;

#[tokio::test]
async fn acknowledged_blobs_and_action_results_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c) = KilnProcess::dev(dir.path()).await;
    let blobs: Vec<Vec<u8>> = (0..40).map(|i| pseudo_random(1000 + i * 5000, i as u64)).collect();
    for (i, b) in blobs.iter().enumerate() {
        c.write(&upload_resource("", &format!("k{i}"), &sha256(b)), b).await;
    }
    let action = sha256(b"durable action");
    let result = ActionResult {
        output_files: vec![OutputFile { path: "o".into(), digest: Some(sha256(&blobs[3])), ..Default::default() }],
        exit_code: 0,
        ..Default::default()
    };
    ActionCacheClient::new(c.channel.clone())
        .update_action_result(UpdateActionResultRequest {
            instance_name: "ci".into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    // No pause: the acknowledgements are all the durability promise there is.
    p.kill9();

    let (_p, c) = KilnProcess::dev(dir.path()).await;
    for (i, b) in blobs.iter().enumerate() {
        assert_eq!(&c.read(&blob_resource("", &sha256(b))).await.unwrap(), b, "blob {i}");
    }

    let got = ActionCacheClient::new(c.channel.clone())
        .get_action_result(GetActionResultRequest { instance_name: "ci".into(), action_digest: Some(action), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, result);
}

/// Small blobs of a batch are appended to a pack file and indexed in a database that buffers
/// writes in-process: acknowledged, they must survive a `kill -9` right after the answer.
#[tokio::test]
async fn an_acknowledged_batch_of_small_blobs_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c) = KilnProcess::dev(dir.path()).await;
    let small: Vec<Vec<u8>> = (0..100).map(|i| pseudo_random(64 + i * 97, 1000 + i as u64)).collect();
    let requests = small
        .iter()
        .map(|b| batch_update_blobs_request::Request { digest: Some(sha256(b)), data: b.clone(), compressor: 0 })
        .collect();
    let resp = ContentAddressableStorageClient::new(c.channel.clone())
        .batch_update_blobs(BatchUpdateBlobsRequest { instance_name: String::new(), requests, digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.responses.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)), "{resp:?}");
    p.kill9();

    let (_p, c) = KilnProcess::dev(dir.path()).await;
    for (i, b) in small.iter().enumerate() {
        assert_eq!(&c.read(&blob_resource("", &sha256(b))).await.unwrap(), b, "small blob {i} of the batch");
    }
}

#[tokio::test]
async fn a_blob_corrupted_on_disk_is_never_served_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c) = KilnProcess::dev(dir.path()).await;
    let good = pseudo_random(70_000, 1);
    let flipped = pseudo_random(80_000, 2);
    let truncated = pseudo_random(90_000, 3);
    for (i, b) in [&good, &flipped, &truncated].into_iter().enumerate() {
        c.write(&upload_resource("", &format!("c{i}"), &sha256(b)), b).await;
    }
    p.kill9();

    let path = |b: &[u8]| {
        let h = sha256(b).hash;
        dir.path().join("cas/sha256").join(&h[..2]).join(&h)
    };
    let mut bytes = std::fs::read(path(&flipped)).unwrap();
    bytes[40_000] ^= 0x55; // same size, other content: a torn or rotted write
    std::fs::write(path(&flipped), bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path(&truncated)).unwrap();
    f.set_len(1000).unwrap();

    let (_p, c) = KilnProcess::dev(dir.path()).await;
    assert_eq!(c.read(&blob_resource("", &sha256(&good))).await.unwrap(), good);
    for b in [&flipped, &truncated] {
        let e = c.read(&blob_resource("", &sha256(b))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    }
    // Dropped for good: reported missing, so a client uploads it again.
    let missing = kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(c.channel.clone())
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![sha256(&flipped), sha256(&good)],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![sha256(&flipped)]);
    c.write(&upload_resource("", "again", &sha256(&flipped)), &flipped).await;
    assert_eq!(c.read(&blob_resource("", &sha256(&flipped))).await.unwrap(), flipped);
}

#[tokio::test]
async fn a_large_upload_and_download_stream_through_bounded_memory() {
    const SIZE: usize = 512 << 20;
    const CHUNK: usize = 1 << 20;
    let chunk_of = |i: usize| pseudo_random(CHUNK, 5000 + i as u64);
    let mut h = sha2::Sha256::new();
    for i in 0..SIZE / CHUNK {
        h.update(chunk_of(i));
    }
    let d = kiln_proto::reapi::Digest { hash: hex::encode(h.finalize()), size_bytes: SIZE as i64 };

    let dir = tempfile::tempdir().unwrap();
    let (p, c) = KilnProcess::dev(dir.path()).await;
    let before = p.peak_rss_kib();
    let res = upload_resource("", "big", &d);
    let reqs = futures::stream::iter((0..SIZE / CHUNK).map(move |i| WriteRequest {
        resource_name: if i == 0 { res.clone() } else { String::new() },
        write_offset: (i * CHUNK) as i64,
        finish_write: i == SIZE / CHUNK - 1,
        data: chunk_of(i),
    }));
    let committed = ByteStreamClient::new(c.channel.clone()).write(reqs).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, SIZE as i64);

    let mut s = ByteStreamClient::new(c.channel.clone())
        .read(kiln_proto::bytestream::ReadRequest { resource_name: blob_resource("", &d), read_offset: 0, read_limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut rh = sha2::Sha256::new();
    let mut n = 0usize;
    while let Some(m) = s.message().await.unwrap() {
        n += m.data.len();
        rh.update(&m.data);
    }
    assert_eq!(n, SIZE);
    assert_eq!(hex::encode(rh.finalize()), d.hash);
    let growth_mib = (p.peak_rss_kib().saturating_sub(before)) / 1024;
    assert!(growth_mib < 64, "peak RSS grew by {growth_mib} MiB for a 512 MiB blob");
}
