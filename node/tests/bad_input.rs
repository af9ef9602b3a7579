//! Bad input gets the REAPI-specified status, a message naming the problem, and stores nothing.

mod common;

use common::*;
use kiln_proto::bytestream::{QueryWriteStatusRequest, WriteRequest};
use kiln_proto::reapi::{
    batch_update_blobs_request, compressor, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest,
    GetActionResultRequest, UpdateActionResultRequest,
};
use tonic::Code;

async fn is_missing(n: &TestNode, d: &Digest) -> bool {
    let r = n
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest { instance_name: String::new(), blob_digests: vec![d.clone()], digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    r.missing_blob_digests.len() == 1
}

fn assert_status(s: &tonic::Status, code: Code, needle: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert!(s.message().contains(needle), "message {:?} should name {needle:?}", s.message());
}

#[tokio::test]
async fn batch_update_with_wrong_hash_or_size_stores_nothing() {
    let n = TestNode::start().await;
    let data = b"the real content".to_vec();
    let good = sha256(&data);
    let wrong_hash = sha256(b"other content!!!"); // same length, other hash
    let wrong_size = Digest { hash: good.hash.clone(), size_bytes: good.size_bytes + 1 };
    let zstd_garbage = Digest { hash: sha256(b"x").hash, size_bytes: 1 };
    let req = BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![
            batch_update_blobs_request::Request { digest: Some(wrong_hash.clone()), data: data.clone(), compressor: 0 },
            batch_update_blobs_request::Request { digest: Some(wrong_size.clone()), data: data.clone(), compressor: 0 },
            batch_update_blobs_request::Request { digest: Some(zstd_garbage.clone()), data: b"not zstd".to_vec(), compressor: compressor::Value::Zstd as i32 },
            batch_update_blobs_request::Request { digest: Some(Digest { hash: "xyz".into(), size_bytes: 3 }), data: b"abc".to_vec(), compressor: 0 },
            batch_update_blobs_request::Request { digest: Some(good.clone()), data: data.clone(), compressor: compressor::Value::Brotli as i32 },
        ],
        digest_function: 0,
    };
    let resp = n.cas().batch_update_blobs(req).await.unwrap().into_inner();
    let codes: Vec<i32> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, vec![Code::InvalidArgument as i32; 5]);
    let msgs: Vec<&str> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().message.as_str()).collect();
    assert!(msgs[0].contains("hash mismatch") && msgs[0].contains(&wrong_hash.hash), "{}", msgs[0]);
    assert!(msgs[1].contains("size mismatch"), "{}", msgs[1]);
    assert!(msgs[2].contains("zstd"), "{}", msgs[2]);
    assert!(msgs[3].contains("xyz"), "{}", msgs[3]);
    assert!(msgs[4].contains("compressor"), "{}", msgs[4]);
    assert!(is_missing(&n, &wrong_hash).await);
    assert!(is_missing(&n, &good).await, "nothing stored under the right digest either");
}

#[tokio::test]
async fn bytestream_write_with_wrong_hash_or_size_stores_nothing() {
    let n = TestNode::start().await;
    let data = pseudo_random(100_000, 1);
    let good = sha256(&data);

    let wrong_hash = Digest { hash: sha256(b"something else").hash, size_bytes: good.size_bytes };
    let e = bs_write(&n, &upload_resource("", "h", &wrong_hash), &data).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, &wrong_hash.hash);
    assert!(e.message().contains("hash mismatch"));
    assert!(is_missing(&n, &wrong_hash).await);

    let too_small = Digest { hash: good.hash.clone(), size_bytes: good.size_bytes - 1 };
    let e = bs_write(&n, &upload_resource("", "s1", &too_small), &data).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "size mismatch");
    let too_large = Digest { hash: good.hash.clone(), size_bytes: good.size_bytes + 1 };
    let e = bs_write(&n, &upload_resource("", "s2", &too_large), &data).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "size mismatch");
    assert!(is_missing(&n, &good).await);

    // Compressed: data that decompresses to something else, and data that is not zstd.
    let other = zstd::stream::encode_all(&b"not the blob"[..], 1).unwrap();
    let res = format!("uploads/z/compressed-blobs/zstd/{}/{}", good.hash, good.size_bytes);
    let e = n.bs().write(futures::stream::iter(write_requests(&res, &other, 0, 1000, true))).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "size mismatch");
    let e = n.bs().write(futures::stream::iter(write_requests(&res, b"plainly not zstd", 0, 1000, true))).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "zstd");
    assert!(is_missing(&n, &good).await);
    // And a correct upload afterwards still works.
    bs_write(&n, &upload_resource("", "ok", &good), &data).await.unwrap();
    assert!(!is_missing(&n, &good).await);
}

#[tokio::test]
async fn malformed_resource_names_are_invalid_argument_naming_the_name() {
    let n = TestNode::start().await;
    let d = sha256(b"x");
    for name in [
        "".to_string(),
        "blobs".to_string(),
        format!("blobs/{}", d.hash),
        format!("blobs/{}/notanumber", d.hash),
        format!("blobs/{}/-5", d.hash),
        "blobs/0123/1".to_string(),
        format!("compressed-blobs/lz4/{}/1", d.hash),
        format!("uploads/u/blobs/{}/1", d.hash), // an upload name is not a read name
    ] {
        let e = bs_read(&n, &name, 0, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(e.message().contains("resource name"), "{name}: {}", e.message());
    }
    for name in [format!("blobs/{}/1", d.hash), format!("uploads/blobs/{}/1", d.hash), "uploads/u/blobs/zz/1".to_string()] {
        let e = bs_write(&n, &name, b"x").await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        let e = n.bs().query_write_status(QueryWriteStatusRequest { resource_name: name.clone() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
    }
}

#[tokio::test]
async fn unknown_digest_functions_are_refused_by_name() {
    let n = TestNode::start().await;
    let d = sha256(b"x");
    for (f, name) in [(2, "SHA1"), (3, "MD5"), (99, "99")] {
        let e = n
            .cas()
            .find_missing_blobs(FindMissingBlobsRequest { instance_name: String::new(), blob_digests: vec![d.clone()], digest_function: f })
            .await
            .unwrap_err();
        assert_status(&e, Code::InvalidArgument, name);
    }
    let e = bs_read(&n, &format!("blobs/md5/{}/1", d.hash), 0, 0).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "MD5");
    let e = n
        .ac()
        .get_action_result(GetActionResultRequest { action_digest: Some(d.clone()), digest_function: 2, ..Default::default() })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "SHA1");
}

#[tokio::test]
async fn batches_over_the_advertised_limit_are_refused() {
    let n = TestNode::start().await;
    let blob = pseudo_random(1 << 20, 9);
    let d = sha256(&blob);
    let requests: Vec<_> = (0..5)
        .map(|_| batch_update_blobs_request::Request { digest: Some(d.clone()), data: blob.clone(), compressor: 0 })
        .collect();
    let e = n
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest { instance_name: String::new(), requests, digest_function: 0 })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "max_batch_total_size_bytes");
    assert!(is_missing(&n, &d).await);

    let big = Digest { hash: d.hash.clone(), size_bytes: 5 << 20 };
    let e = n
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest { instance_name: String::new(), digests: vec![big], acceptable_compressors: vec![], digest_function: 0 })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "max_batch_total_size_bytes");
}

#[tokio::test]
async fn write_offsets_must_match_the_committed_size() {
    let n = TestNode::start().await;
    let data = pseudo_random(50_000, 2);
    let d = sha256(&data);
    let res = upload_resource("", "off", &d);
    // Nothing committed yet: an offset of 1000 is beyond it.
    let reqs = write_requests(&res, &data, 1000, 10_000, true);
    let e = n.bs().write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_status(&e, Code::OutOfRange, "committed size 0");
    // A stream whose offsets skip ahead.
    let reqs = vec![
        WriteRequest { resource_name: res.clone(), write_offset: 0, finish_write: false, data: data[..100].to_vec() },
        WriteRequest { resource_name: String::new(), write_offset: 200, finish_write: true, data: data[200..].to_vec() },
    ];
    let e = n.bs().write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "write_offset 200");
    // Negative offset.
    let reqs = vec![WriteRequest { resource_name: res.clone(), write_offset: -1, finish_write: true, data: vec![] }];
    let e = n.bs().write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(is_missing(&n, &d).await);
}

#[tokio::test]
async fn read_offsets_and_limits_are_checked() {
    let n = TestNode::start().await;
    let data = pseudo_random(10_000, 8);
    let d = sha256(&data);
    bs_write(&n, &upload_resource("", "r", &d), &data).await.unwrap();
    let res = blob_resource("", &d);
    assert_status(&bs_read(&n, &res, -1, 0).await.unwrap_err(), Code::OutOfRange, "read_offset -1");
    assert_status(&bs_read(&n, &res, 10_001, 0).await.unwrap_err(), Code::OutOfRange, "read_offset 10001");
    assert_status(&bs_read(&n, &res, 0, -5).await.unwrap_err(), Code::InvalidArgument, "read_limit -5");
}

#[tokio::test]
async fn reading_a_missing_blob_is_not_found_naming_it() {
    let n = TestNode::start().await;
    let d = sha256(b"absent");
    let e = bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap_err();
    assert_status(&e, Code::NotFound, &d.hash);
}

#[tokio::test]
async fn action_cache_refuses_missing_or_malformed_fields() {
    let n = TestNode::start().await;
    let e = n.ac().update_action_result(UpdateActionResultRequest { action_digest: Some(sha256(b"a")), ..Default::default() }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "action_result");
    let e = n.ac().get_action_result(GetActionResultRequest::default()).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "action_digest");
    let bad = kiln_proto::reapi::ActionResult {
        output_files: vec![kiln_proto::reapi::OutputFile { path: "p".into(), digest: Some(Digest { hash: "nothex".into(), size_bytes: 1 }), ..Default::default() }],
        ..Default::default()
    };
    let e = n
        .ac()
        .update_action_result(UpdateActionResultRequest { action_digest: Some(sha256(b"a")), action_result: Some(bad), ..Default::default() })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "output_files[\"p\"]");
    let e = n
        .ac()
        .get_action_result(GetActionResultRequest { instance_name: "x/blobs/y".into(), action_digest: Some(sha256(b"a")), ..Default::default() })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "instance_name");
}

#[tokio::test]
async fn a_stored_hash_asked_with_another_size_is_not_found_and_breaks_nothing() {
    let n = TestNode::start().await;
    let data = b"ok".to_vec();
    let d = sha256(&data);
    batch_upload(&n, "", &[&data]).await;
    let wrong = Digest { hash: d.hash.clone(), size_bytes: 3 };
    let resp = n
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest { instance_name: String::new(), digests: vec![wrong.clone()], acceptable_compressors: vec![], digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, Code::NotFound as i32);
    assert_eq!(bs_read(&n, &blob_resource("", &wrong), 0, 0).await.unwrap_err().code(), Code::NotFound);
    // The right digest still reads, from memory and through ByteStream.
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);
    assert!(is_missing(&n, &wrong).await);
}

/// FindMissingBlobs is decoded in place (not by the generated server): a request that does not
/// decode, or names a bad digest, is INVALID_ARGUMENT naming the digest, and the node goes on.
#[tokio::test]
async fn find_missing_with_undecodable_or_bad_digests_names_them() {
    /// FindMissingBlobsRequest's wire format, with each digest as raw bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct LooseRequest {
        #[prost(string, tag = "1")]
        instance_name: String,
        #[prost(bytes = "vec", repeated, tag = "2")]
        digests: Vec<Vec<u8>>,
    }
    let n = TestNode::start().await;
    let good = sha256(b"present");
    bs_write(&n, &upload_resource("", "fm", &good), b"present").await.unwrap();
    let call = |req: LooseRequest| {
        let mut grpc = tonic::client::Grpc::new(n.channel.clone());
        async move {
            grpc.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
            );
            let codec = tonic_prost::ProstCodec::<LooseRequest, kiln_proto::reapi::FindMissingBlobsResponse>::default();
            grpc.unary(tonic::Request::new(req), path, codec).await.map(|r| r.into_inner())
        }
    };
    let encoded = |d: &Digest| prost::Message::encode_to_vec(d);
    let absent = sha256(b"absent");
    // Well formed: the answer is the absent digest, as sent.
    let r = call(LooseRequest { instance_name: String::new(), digests: vec![encoded(&good), encoded(&absent)] }).await.unwrap();
    assert_eq!(r.missing_blob_digests, vec![absent.clone()]);
    // A digest message cut short (its hash claims 64 bytes, none follow).
    let e = call(LooseRequest { instance_name: String::new(), digests: vec![encoded(&good), vec![0x0a, 64]] }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "blob_digests[1]");
    // A hash that is not text at all, and one of the wrong length.
    let mut binary = vec![0x0a, 64];
    binary.extend_from_slice(&[0xff; 64]);
    let e = call(LooseRequest { instance_name: String::new(), digests: vec![binary] }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "blob_digests[0]");
    let short = Digest { hash: "abc".into(), size_bytes: 3 };
    let e = call(LooseRequest { instance_name: String::new(), digests: vec![encoded(&good), encoded(&good), encoded(&short)] }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "blob_digests[2]");
    let negative = Digest { hash: good.hash.clone(), size_bytes: -1 };
    let e = call(LooseRequest { instance_name: String::new(), digests: vec![encoded(&negative)] }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "negative");
    // A reserved instance name.
    let e = call(LooseRequest { instance_name: "a/blobs".into(), digests: vec![encoded(&good)] }).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "reserved");
    // The node still answers.
    assert!(!is_missing(&n, &good).await);
    assert!(is_missing(&n, &absent).await);
}
