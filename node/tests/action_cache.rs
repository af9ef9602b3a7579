//! Action Cache against a real node: storage, blob-presence checks, inlining, write-once,
//! instance separation.

mod common;

use common::*;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, OutputDirectory, OutputFile, Tree, UpdateActionResultRequest};
use prost::Message;

fn get(instance: &str, action: &kiln_proto::reapi::Digest) -> GetActionResultRequest {
    GetActionResultRequest { instance_name: instance.into(), action_digest: Some(action.clone()), ..Default::default() }
}

fn update(instance: &str, action: &kiln_proto::reapi::Digest, r: ActionResult) -> UpdateActionResultRequest {
    UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(r),
        ..Default::default()
    }
}

async fn result_with_outputs(n: &TestNode) -> ActionResult {
    let out = b"output file".to_vec();
    let stdout = b"hello on stdout".to_vec();
    let inner = b"file in a tree".to_vec();
    let tree = Tree {
        root: Some(kiln_proto::reapi::Directory {
            files: vec![kiln_proto::reapi::FileNode { name: "f".into(), digest: Some(sha256(&inner)), ..Default::default() }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    batch_upload(n, "", &[&out, &stdout, &inner, &tree]).await;
    ActionResult {
        output_files: vec![OutputFile { path: "out.txt".into(), digest: Some(sha256(&out)), ..Default::default() }],
        output_directories: vec![OutputDirectory { path: "dir".into(), tree_digest: Some(sha256(&tree)), ..Default::default() }],
        stdout_digest: Some(sha256(&stdout)),
        exit_code: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn update_then_get_and_instances_are_kept_apart() {
    let n = TestNode::start().await;
    let action = sha256(b"action 1");
    let err = n.ac().get_action_result(get("a", &action)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains(&action.hash));

    let r = result_with_outputs(&n).await;
    n.ac().update_action_result(update("a", &action, r.clone())).await.unwrap();
    assert_eq!(n.ac().get_action_result(get("a", &action)).await.unwrap().into_inner(), r);
    // Another instance name does not see it.
    assert_eq!(n.ac().get_action_result(get("b", &action)).await.unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(n.ac().get_action_result(get("", &action)).await.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn a_result_whose_blobs_are_gone_is_not_found() {
    let n = TestNode::start().await;
    let action = sha256(b"action 2");
    let r = ActionResult {
        output_files: vec![OutputFile { path: "o".into(), digest: Some(sha256(b"never uploaded")), ..Default::default() }],
        ..Default::default()
    };
    n.ac().update_action_result(update("", &action, r)).await.unwrap();
    let err = n.ac().get_action_result(get("", &action)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The same for a file inside an output directory's tree.
    let tree = Tree {
        root: Some(kiln_proto::reapi::Directory {
            files: vec![kiln_proto::reapi::FileNode { name: "f".into(), digest: Some(sha256(b"missing inner")), ..Default::default() }],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    batch_upload(&n, "", &[&tree]).await;
    let r = ActionResult {
        output_directories: vec![OutputDirectory { path: "d".into(), tree_digest: Some(sha256(&tree)), ..Default::default() }],
        ..Default::default()
    };
    let action3 = sha256(b"action 3");
    n.ac().update_action_result(update("", &action3, r)).await.unwrap();
    assert_eq!(n.ac().get_action_result(get("", &action3)).await.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn inline_stdout_stderr_and_output_files_on_request() {
    let n = TestNode::start().await;
    let action = sha256(b"inline action");
    let r = result_with_outputs(&n).await;
    n.ac().update_action_result(update("", &action, r.clone())).await.unwrap();

    let plain = n.ac().get_action_result(get("", &action)).await.unwrap().into_inner();
    assert!(plain.stdout_raw.is_empty() && plain.output_files[0].contents.is_empty());

    let req = GetActionResultRequest {
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: vec!["out.txt".into()],
        ..get("", &action)
    };
    let inl = n.ac().get_action_result(req).await.unwrap().into_inner();
    assert_eq!(inl.stdout_raw, b"hello on stdout");
    assert_eq!(inl.output_files[0].contents, b"output file");
    assert!(inl.stderr_raw.is_empty(), "no stderr digest, nothing to inline");
}

#[tokio::test]
async fn write_once_keeps_the_first_result() {
    let n = TestNode::start_with(|c| c.action_cache.write_once = true).await;
    let action = sha256(b"write once");
    let first = ActionResult { exit_code: 0, stdout_raw: b"first".to_vec(), ..Default::default() };
    let second = ActionResult { exit_code: 0, stdout_raw: b"second".to_vec(), ..Default::default() };
    n.ac().update_action_result(update("", &action, first.clone())).await.unwrap();
    let stored = n.ac().update_action_result(update("", &action, second)).await.unwrap().into_inner();
    assert_eq!(stored, first);
    assert_eq!(n.ac().get_action_result(get("", &action)).await.unwrap().into_inner(), first);

    // Without write-once the second update replaces the first.
    let m = TestNode::start().await;
    let third = ActionResult { exit_code: 3, ..Default::default() };
    m.ac().update_action_result(update("", &action, first)).await.unwrap();
    m.ac().update_action_result(update("", &action, third.clone())).await.unwrap();
    assert_eq!(m.ac().get_action_result(get("", &action)).await.unwrap().into_inner(), third);
}
