//! Scheduling state survives `kill -9`: an operation queued before the kill is still queued
//! after the restart and then runs; a completed one can still be fetched.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{operation, GetOperationRequest};
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{platform, Action, Command, Directory, ExecuteRequest, ExecuteResponse, Platform, WaitExecutionRequest};
use prost::Message;

async fn upload_action(c: &ProcessClient, script: &str, props: &[(&str, &str)]) -> kiln_proto::reapi::Digest {
    let cmd = Command { arguments: vec!["sh".into(), "-c".into(), script.into()], output_paths: vec!["out".into()], ..Default::default() }
        .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let platform = Platform { properties: props.iter().map(|(k, v)| platform::Property { name: k.to_string(), value: v.to_string() }).collect() };
    let act = Action {
        command_digest: Some(sha256(&cmd)),
        input_root_digest: Some(sha256(&root)),
        platform: Some(platform),
        ..Default::default()
    }
    .encode_to_vec();
    for (i, b) in [&cmd, &root, &act].into_iter().enumerate() {
        c.write(&upload_resource("", &format!("r{i}-{}", sha256(b).hash), &sha256(b)), b).await;
    }
    sha256(&act)
}

fn result_of(op: &kiln_proto::longrunning::Operation) -> ExecuteResponse {
    match op.result.as_ref().unwrap() {
        operation::Result::Response(a) => ExecuteResponse::decode(&a.value[..]).unwrap(),
        operation::Result::Error(e) => panic!("{e:?}"),
    }
}

#[tokio::test]
async fn queued_and_completed_operations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c) = KilnProcess::dev(dir.path()).await;
    let mut exec = ExecutionClient::new(c.channel.clone());

    // Completed before the kill.
    let done_action = upload_action(&c, "echo finished > out", &[]).await;
    let mut s = exec.execute(ExecuteRequest { action_digest: Some(done_action), ..Default::default() }).await.unwrap().into_inner();
    let mut done_name = String::new();
    while let Some(op) = s.message().await.unwrap() {
        done_name = op.name.clone();
        if op.done {
            break;
        }
    }
    // Queued before the kill: no worker offers pool=later yet.
    let queued_action = upload_action(&c, "echo later > out", &[("pool", "later")]).await;
    let mut s = exec.execute(ExecuteRequest { action_digest: Some(queued_action), ..Default::default() }).await.unwrap().into_inner();
    let queued_name = s.message().await.unwrap().unwrap().name;
    drop(s);
    p.kill9();

    // Restart the same data dir with a worker that offers pool=later.
    let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.path().join("restart.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"{grpc}\"\nhttp = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n[worker]\nenabled = true\n[worker.platform]\npool = \"later\"\n",
            free_port(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (_p, c) = KilnProcess::serve(&cfg, grpc).await;
    let mut ops = OperationsClient::new(c.channel.clone());
    let done = ops.get_operation(GetOperationRequest { name: done_name }).await.unwrap().into_inner();
    assert!(done.done);
    assert_eq!(result_of(&done).result.unwrap().exit_code, 0);

    let mut w = ExecutionClient::new(c.channel.clone())
        .wait_execution(WaitExecutionRequest { name: queued_name.clone() })
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        let op = tokio::time::timeout_at(deadline, w.message()).await.expect("queued operation ran after restart").unwrap().unwrap();
        if op.done {
            break op;
        }
    };
    let r = result_of(&last).result.unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(c.read(&blob_resource("", r.output_files[0].digest.as_ref().unwrap())).await.unwrap(), b"later\n");
}
