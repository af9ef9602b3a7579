//! CAS and Capabilities against a real node on loopback.

mod common;

use common::*;
use kiln_proto::reapi::{
    batch_update_blobs_request, compressor, digest_function, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory,
    DirectoryNode, FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest,
};
use prost::Message;

#[tokio::test]
async fn capabilities_advertise_digests_batch_limit_compression_and_ac_updates() {
    let n = TestNode::start().await;
    let caps = n.caps().get_capabilities(GetCapabilitiesRequest { instance_name: "any/name".into() }).await.unwrap().into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert!(cache.digest_functions.contains(&(digest_function::Value::Sha256 as i32)));
    assert!(cache.digest_functions.contains(&(digest_function::Value::Blake3 as i32)));
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert!(cache.supported_compressors.contains(&(compressor::Value::Zstd as i32)));
    assert_ne!(cache.symlink_absolute_path_strategy, 0);
    let exec = caps.execution_capabilities.unwrap();
    assert_eq!(exec.digest_function, digest_function::Value::Sha256 as i32);
    assert!(exec.exec_enabled, "Bazel refuses --remote_executor without it");
    assert_eq!(caps.high_api_version.unwrap().major, 2);
}

async fn find_missing(n: &TestNode, query: Vec<kiln_proto::reapi::Digest>) -> Vec<kiln_proto::reapi::Digest> {
    n.cas()
        .find_missing_blobs(FindMissingBlobsRequest { instance_name: String::new(), blob_digests: query, digest_function: 0 })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

#[tokio::test]
async fn batch_upload_then_find_missing_and_batch_read() {
    let n = TestNode::start().await;
    let blobs: Vec<Vec<u8>> = (0..50).map(|i| pseudo_random(100 + i * 37, i as u64)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let digests = batch_upload(&n, "", &refs).await;

    let absent = sha256(b"never uploaded");
    let mut query = digests.clone();
    query.push(absent.clone());
    query.push(sha256(b"")); // the empty blob is always present
    let missing = find_missing(&n, query).await;
    assert_eq!(missing, vec![absent.clone()]);

    // A large request (checked over several threads) mixing present, absent and repeated
    // digests: every absent one comes back, in request order, repeats included.
    let mut query = Vec::new();
    let mut expected = Vec::new();
    for i in 0..3000usize {
        let d = match i % 7 {
            0 => digests[i % digests.len()].clone(),
            3 => absent.clone(),
            _ => sha256(format!("absent {i}").as_bytes()),
        };
        if i % 7 != 0 {
            expected.push(d.clone());
        }
        query.push(d);
    }
    let missing = find_missing(&n, query).await;
    assert_eq!(missing.len(), expected.len());
    assert!(missing == expected, "missing digests out of request order");

    let mut want = digests.clone();
    want.push(absent.clone());
    let resp = n
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest { instance_name: String::new(), digests: want, acceptable_compressors: vec![], digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), 51);
    for (r, b) in resp.responses.iter().zip(&blobs) {
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        assert_eq!(&r.data, b);
    }
    let last = resp.responses.last().unwrap();
    assert_eq!(last.status.as_ref().unwrap().code, tonic::Code::NotFound as i32);
    assert!(last.status.as_ref().unwrap().message.contains(&absent.hash), "{:?}", last.status);
}

#[tokio::test]
async fn empty_blob_is_always_readable() {
    let n = TestNode::start().await;
    let empty = sha256(b"");
    assert_eq!(bs_read(&n, &blob_resource("", &empty), 0, 0).await.unwrap(), Vec::<u8>::new());
    let resp = n
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest { instance_name: String::new(), digests: vec![empty], acceptable_compressors: vec![], digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
}

#[tokio::test]
async fn zstd_batch_update_is_decompressed_and_blake3_is_kept_apart_from_sha256() {
    let n = TestNode::start().await;
    let data = b"compressible ".repeat(1000);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let d = sha256(&data);
    let resp = n
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.clone()),
                data: compressed,
                compressor: compressor::Value::Zstd as i32,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0, "{:?}", resp.responses[0].status);
    assert_eq!(bs_read(&n, &blob_resource("", &d), 0, 0).await.unwrap(), data);

    // The same bytes under BLAKE3: a different digest, stored and found only under BLAKE3.
    let b3 = kiln_proto::reapi::Digest { hash: blake3::hash(&data).to_hex().to_string(), size_bytes: data.len() as i64 };
    let blake3_fn = digest_function::Value::Blake3 as i32;
    let missing = |fnc: i32, d: kiln_proto::reapi::Digest| {
        let mut c = n.cas();
        async move {
            c.find_missing_blobs(FindMissingBlobsRequest { instance_name: String::new(), blob_digests: vec![d], digest_function: fnc })
                .await
                .unwrap()
                .into_inner()
                .missing_blob_digests
                .len()
        }
    };
    assert_eq!(missing(blake3_fn, b3.clone()).await, 1);
    let resp = n
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![batch_update_blobs_request::Request { digest: Some(b3.clone()), data: data.clone(), compressor: 0 }],
            digest_function: blake3_fn,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(missing(blake3_fn, b3.clone()).await, 0);
    let res = format!("blobs/blake3/{}/{}", b3.hash, b3.size_bytes);
    assert_eq!(bs_read(&n, &res, 0, 0).await.unwrap(), data);
}

/// A tree: root → a, b; a → c; b → c (shared, returned once).
fn make_tree() -> (Vec<Vec<u8>>, kiln_proto::reapi::Digest) {
    let c = Directory::default().encode_to_vec();
    let dn = |name: &str, d: &[u8]| DirectoryNode { name: name.into(), digest: Some(sha256(d)) };
    let a = Directory { directories: vec![dn("c", &c)], ..Default::default() }.encode_to_vec();
    let b = Directory { directories: vec![dn("c", &c)], files: vec![], ..Default::default() };
    let b = Directory { symlinks: vec![kiln_proto::reapi::SymlinkNode { name: "l".into(), target: "x".into(), node_properties: None }], ..b }.encode_to_vec();
    let root = Directory { directories: vec![dn("a", &a), dn("b", &b)], ..Default::default() }.encode_to_vec();
    let d = sha256(&root);
    (vec![root, a, b, c], d)
}

#[tokio::test]
async fn get_tree_pages_through_every_directory_once() {
    let n = TestNode::start().await;
    let (dirs, root) = make_tree();
    let refs: Vec<&[u8]> = dirs.iter().map(|b| b.as_slice()).collect();
    batch_upload(&n, "", &refs).await;

    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let mut s = n
            .cas()
            .get_tree(GetTreeRequest { instance_name: String::new(), root_digest: Some(root.clone()), page_size: 2, page_token: token.clone(), digest_function: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut next = String::new();
        while let Some(m) = s.message().await.unwrap() {
            all.extend(m.directories);
            next = m.next_page_token;
        }
        pages += 1;
        if next.is_empty() {
            break;
        }
        token = next;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 2);
    let got: Vec<Vec<u8>> = all.iter().map(|d| d.encode_to_vec()).collect();
    assert_eq!(got.len(), 4, "each directory once");
    for d in &dirs {
        assert!(got.contains(d));
    }
    assert_eq!(got[0], dirs[0], "root first");

    // Unpaged: everything in one call.
    let mut s = n
        .cas()
        .get_tree(GetTreeRequest { instance_name: String::new(), root_digest: Some(root.clone()), page_size: 0, page_token: String::new(), digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(m) = s.message().await.unwrap() {
        count += m.directories.len();
        assert!(m.next_page_token.is_empty());
    }
    assert_eq!(count, 4);

    // A missing root is NOT_FOUND naming it.
    let absent = sha256(b"no such directory");
    let err = match n
        .cas()
        .get_tree(GetTreeRequest { instance_name: String::new(), root_digest: Some(absent.clone()), page_size: 0, page_token: String::new(), digest_function: 0 })
        .await
    {
        Err(e) => e,
        Ok(s) => s.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains(&absent.hash));
}
