//! Remote execution end to end on one node: Execute through Raft, a real `kiln worker` bot loop
//! running real processes, the Action Cache, Operations, cancellation, orphans, lost bots.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{operation, CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest, Operation};
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    command::EnvironmentVariable, execution_stage, platform, Action, Command, Directory, ExecuteOperationMetadata, ExecuteRequest,
    ExecuteResponse, FileNode, Platform, WaitExecutionRequest,
};
use kiln_proto::remoteworkers::{bots_client::BotsClient, BotSession, CreateBotSessionRequest, LeaseState, UpdateBotSessionRequest};
use prost::Message;
use tokio::sync::watch;

struct Cluster {
    node: TestNode,
    _worker_dir: tempfile::TempDir,
    stop: Option<watch::Sender<bool>>,
}

impl Cluster {
    async fn start(tweak: impl FnOnce(&mut kiln_node::config::Config)) -> Self {
        Self::start_with_worker(tweak, true).await
    }

    async fn start_with_worker(tweak: impl FnOnce(&mut kiln_node::config::Config), worker: bool) -> Self {
        let node = TestNode::start_with(tweak).await;
        let wd = tempfile::tempdir().unwrap();
        let mut c = Self { node, _worker_dir: wd, stop: None };
        if worker {
            c.start_worker(&[]);
        }
        c
    }

    fn start_worker(&mut self, platform: &[(&str, &str)]) {
        self.start_named_worker("test-worker", platform);
    }

    /// Starts a worker; a second one with the same name is that worker restarted.
    fn start_named_worker(&mut self, name: &str, platform: &[(&str, &str)]) -> watch::Sender<bool> {
        self.start_worker_with(name, platform, 2, 0)
    }

    fn start_worker_with(&mut self, name: &str, platform: &[(&str, &str)], concurrency: usize, prefetch: usize) -> watch::Sender<bool> {
        let (tx, rx) = watch::channel(false);
        let opts = kiln_node::worker::bot::WorkerOptions {
            endpoints: vec![format!("http://{}", self.node.node.as_ref().unwrap().grpc_addr)],
            concurrency,
            prefetch,
            work_dir: self._worker_dir.path().to_path_buf(),
            platform: platform.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            name: name.into(),
            instance_name: String::new(),
            cache_max_bytes: 1 << 30,
        };
        tokio::spawn(kiln_node::worker::bot::run(opts, rx));
        self.stop = Some(tx.clone());
        tx
    }

    fn exec(&self) -> ExecutionClient<tonic::transport::Channel> {
        ExecutionClient::new(self.node.channel.clone())
    }

    fn ops(&self) -> OperationsClient<tonic::transport::Channel> {
        OperationsClient::new(self.node.channel.clone())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            let _ = s.send(true);
        }
    }
}

/// Uploads a Command, an input root and an Action; returns the action digest.
async fn action(n: &TestNode, args: &[&str], outputs: &[&str], inputs: &[(&str, &[u8])], timeout_s: Option<i64>, props: &[(&str, &str)]) -> kiln_proto::reapi::Digest {
    let cmd = Command {
        arguments: args.iter().map(|s| s.to_string()).collect(),
        environment_variables: vec![EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() }],
        output_paths: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut files = Vec::new();
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for (name, data) in inputs {
        files.push(FileNode { name: name.to_string(), digest: Some(sha256(data)), is_executable: false, node_properties: None });
        blobs.push(data.to_vec());
    }
    let root = Directory { files, ..Default::default() }.encode_to_vec();
    let platform = Platform { properties: props.iter().map(|(k, v)| platform::Property { name: k.to_string(), value: v.to_string() }).collect() };
    let act = Action {
        command_digest: Some(sha256(&cmd.encode_to_vec())),
        input_root_digest: Some(sha256(&root)),
        timeout: timeout_s.map(|s| kiln_proto::protobuf::Duration { seconds: s, nanos: 0 }),
        platform: Some(platform),
        ..Default::default()
    }
    .encode_to_vec();
    let mut all: Vec<&[u8]> = vec![&act, &root];
    let cmd_bytes = cmd.encode_to_vec();
    all.push(&cmd_bytes);
    for b in &blobs {
        all.push(b);
    }
    batch_upload(n, "", &all).await;
    sha256(&act)
}

fn stage(op: &Operation) -> i32 {
    ExecuteOperationMetadata::decode(&op.metadata.as_ref().unwrap().value[..]).unwrap().stage
}

fn response(op: &Operation) -> ExecuteResponse {
    match op.result.as_ref().expect("done operation has a result") {
        operation::Result::Response(any) => {
            assert_eq!(any.type_url, "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse");
            ExecuteResponse::decode(&any.value[..]).unwrap()
        }
        operation::Result::Error(e) => panic!("operation error {e:?}"),
    }
}

/// Reads a stream of operations to the end; returns all of them.
async fn drain(mut s: tonic::Streaming<Operation>) -> Vec<Operation> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Some(op) = tokio::time::timeout_at(deadline, s.message()).await.expect("operation finished in time").unwrap() {
        let done = op.done;
        all.push(op);
        if done {
            break;
        }
    }
    all
}

fn req(d: &kiln_proto::reapi::Digest, skip_cache: bool) -> ExecuteRequest {
    ExecuteRequest { action_digest: Some(d.clone()), skip_cache_lookup: skip_cache, ..Default::default() }
}

#[tokio::test]
async fn an_action_runs_on_the_worker_and_then_hits_the_cache() {
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "cat in.txt > out.txt; echo made >> out.txt; echo to-stderr >&2"], &["out.txt"], &[("in.txt", b"input\n")], None, &[]).await;
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    let last = ops.last().unwrap();
    assert!(last.done);
    let stages: Vec<i32> = ops.iter().map(stage).collect();
    assert_eq!(*stages.last().unwrap(), execution_stage::Value::Completed as i32);
    assert!(stages.contains(&(execution_stage::Value::Queued as i32)) || stages.contains(&(execution_stage::Value::Executing as i32)), "{stages:?}");
    let r = response(last);
    assert!(!r.cached_result);
    let result = r.result.unwrap();
    assert_eq!(result.exit_code, 0);
    let out = &result.output_files[0];
    assert_eq!(out.path, "out.txt");
    assert_eq!(bs_read(&c.node, &blob_resource("", out.digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"input\nmade\n");
    assert_eq!(bs_read(&c.node, &blob_resource("", result.stderr_digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"to-stderr\n");
    let md = result.execution_metadata.unwrap();
    assert!(md.queued_timestamp.is_some() && md.worker_start_timestamp.is_some() && md.worker_completed_timestamp.is_some());
    assert!(!md.worker.is_empty());

    // Again: answered from the Action Cache without a worker.
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    assert_eq!(ops.len(), 1);
    let r = response(&ops[0]);
    assert!(r.cached_result);
    assert_eq!(r.result.unwrap().output_files[0].digest, out.digest);
    // skip_cache_lookup runs it again.
    let ops = drain(c.exec().execute(req(&d, true)).await.unwrap().into_inner()).await;
    assert!(!response(ops.last().unwrap()).cached_result);
}

#[tokio::test]
async fn a_failing_action_reports_its_exit_code_and_stderr_and_is_not_cached() {
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "echo broken >&2; exit 3"], &[], &[], None, &[]).await;
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    let r = response(ops.last().unwrap()).result.unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(bs_read(&c.node, &blob_resource("", r.stderr_digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"broken\n");
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    assert!(!response(ops.last().unwrap()).cached_result, "failed results are not cached");
}

#[tokio::test]
async fn identical_actions_in_flight_are_joined() {
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "sleep 1; echo once >> /dev/null"], &[], &[], None, &[]).await;
    let mut a = c.exec().execute(req(&d, true)).await.unwrap().into_inner();
    let mut b = c.exec().execute(req(&d, true)).await.unwrap().into_inner();
    let first_a = a.message().await.unwrap().unwrap();
    let first_b = b.message().await.unwrap().unwrap();
    assert_eq!(first_a.name, first_b.name, "the second Execute joined the first");
    drain(a).await;
    drain(b).await;
}

#[tokio::test]
async fn missing_inputs_fail_with_a_precondition_failure_listing_each() {
    let c = Cluster::start_with_worker(|_| {}, false).await;
    let absent = b"never uploaded input".to_vec();
    let cmd = Command { arguments: vec!["true".into()], ..Default::default() }.encode_to_vec();
    let root = Directory {
        files: vec![FileNode { name: "x".into(), digest: Some(sha256(&absent)), ..Default::default() }],
        ..Default::default()
    }
    .encode_to_vec();
    let act = Action { command_digest: Some(sha256(&cmd)), input_root_digest: Some(sha256(&root)), ..Default::default() }.encode_to_vec();
    batch_upload(&c.node, "", &[&act, &root]).await; // the command is missing too
    let err = c.exec().execute(req(&sha256(&act), false)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let status = kiln_proto::rpc::Status::decode(err.details()).unwrap();
    let any = &status.details[0];
    assert_eq!(any.type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
    let pf = kiln_proto::rpc_details::PreconditionFailure::decode(&any.value[..]).unwrap();
    let subjects: Vec<String> = pf.violations.iter().map(|v| v.subject.clone()).collect();
    for d in [sha256(&absent), sha256(&cmd)] {
        assert!(subjects.contains(&format!("blobs/{}/{}", d.hash, d.size_bytes)), "{subjects:?}");
    }
    assert!(pf.violations.iter().all(|v| v.r#type == "MISSING"));
    // A missing action is reported the same way.
    let ghost = sha256(b"no such action");
    let err = c.exec().execute(req(&ghost, false)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn wait_execution_get_list_and_delete_operations() {
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "sleep 1"], &[], &[], None, &[]).await;
    let mut s = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let name = s.message().await.unwrap().unwrap().name;
    drop(s);
    let ops = drain(c.exec().wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner()).await;
    assert_eq!(response(ops.last().unwrap()).result.unwrap().exit_code, 0);
    let got = c.ops().get_operation(GetOperationRequest { name: name.clone() }).await.unwrap().into_inner();
    assert!(got.done);
    let list = c.ops().list_operations(ListOperationsRequest { page_size: 10, ..Default::default() }).await.unwrap().into_inner();
    assert!(list.operations.iter().any(|o| o.name == name));
    c.ops().delete_operation(DeleteOperationRequest { name: name.clone() }).await.unwrap();
    let e = c.ops().get_operation(GetOperationRequest { name: name.clone() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.exec().wait_execution(WaitExecutionRequest { name: "no-such-op".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn list_operations_pages() {
    let c = Cluster::start_with_worker(|_| {}, false).await;
    let mut names = Vec::new();
    let mut streams = Vec::new();
    for i in 0..5 {
        let d = action(&c.node, &["sh", "-c", &format!("echo {i}")], &[], &[], None, &[]).await;
        let mut s = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
        names.push(s.message().await.unwrap().unwrap().name);
        streams.push(s);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = c.ops().list_operations(ListOperationsRequest { page_size: 2, page_token: token, ..Default::default() }).await.unwrap().into_inner();
        assert!(r.operations.len() <= 2);
        seen.extend(r.operations.into_iter().map(|o| o.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    names.sort();
    assert_eq!(seen, names);
}

#[tokio::test]
async fn cancel_operation_kills_the_running_action() {
    let c = Cluster::start(|_| {}).await;
    let marker = format!("kiln-cancel-marker-{}", std::process::id());
    let d = action(&c.node, &["sh", "-c", &format!("sleep 30 # {marker}")], &[], &[], None, &[]).await;
    let mut s = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let name = s.message().await.unwrap().unwrap().name;
    // Wait until it runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !pgrep(&marker) {
        assert!(tokio::time::Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.ops().cancel_operation(CancelOperationRequest { name }).await.unwrap();
    let ops = drain(s).await;
    assert_eq!(response(ops.last().unwrap()).status.unwrap().code, tonic::Code::Cancelled as i32);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pgrep(&marker) {
        assert!(tokio::time::Instant::now() < deadline, "the cancelled action is still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pgrep(marker: &str) -> bool {
    std::process::Command::new("pgrep").args(["-f", marker]).output().map(|o| o.status.success()).unwrap_or(false)
}

#[tokio::test]
async fn an_unwatched_operation_is_cancelled_but_a_joined_one_runs_to_completion() {
    let c = Cluster::start(|cfg| cfg.scheduler.orphan_grace_secs = 2).await;
    // Orphan: the only client goes away.
    let marker = format!("kiln-orphan-marker-{}", std::process::id());
    let d = action(&c.node, &["sh", "-c", &format!("sleep 30 # {marker}")], &[], &[], None, &[]).await;
    let mut s = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let name = s.message().await.unwrap().unwrap().name;
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let op = c.ops().get_operation(GetOperationRequest { name: name.clone() }).await.unwrap().into_inner();
        if op.done {
            assert_eq!(response(&op).status.unwrap().code, tonic::Code::Cancelled as i32);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "orphan was not cancelled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pgrep(&marker) {
        assert!(tokio::time::Instant::now() < deadline, "the orphan's process still runs: its worker was not freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Joined: the first client leaves, another keeps waiting on it: it completes.
    let d = action(&c.node, &["sh", "-c", "sleep 4"], &[], &[], None, &[]).await;
    let mut s = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let name = s.message().await.unwrap().unwrap().name;
    let waiter = c.exec().wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner();
    drop(s);
    let ops = drain(waiter).await;
    let r = response(ops.last().unwrap());
    assert!(r.status.as_ref().is_none_or(|s| s.code == 0), "{:?}", r.status);
    assert_eq!(r.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn the_action_timeout_is_enforced() {
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "sleep 20"], &[], &[], Some(1), &[]).await;
    let started = std::time::Instant::now();
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    assert_eq!(response(ops.last().unwrap()).status.unwrap().code, tonic::Code::DeadlineExceeded as i32);
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn an_action_no_worker_can_run_fails_naming_the_properties() {
    let mut c = Cluster::start_with_worker(|cfg| cfg.scheduler.unmatched_platform_secs = 1, false).await;
    c.start_worker(&[("OSFamily", "linux")]);
    let d = action(&c.node, &["true"], &[], &[], None, &[("gpu", "a100")]).await;
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    let st = response(ops.last().unwrap()).status.unwrap();
    assert_eq!(st.code, tonic::Code::FailedPrecondition as i32);
    assert!(st.message.contains("gpu=a100"), "{}", st.message);
    // A matching action runs.
    let d = action(&c.node, &["true"], &[], &[], None, &[("OSFamily", "linux")]).await;
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    assert_eq!(response(ops.last().unwrap()).result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn a_lease_of_a_bot_that_goes_silent_is_requeued_to_another_bot() {
    let mut c = Cluster::start_with_worker(|cfg| cfg.scheduler.bot_silence_secs = 1, false).await;
    let d = action(&c.node, &["sh", "-c", "echo ran > out"], &["out"], &[], None, &[]).await;
    let exec = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    // A bot takes the lease, then never calls again.
    let mut bots = BotsClient::new(c.node.channel.clone());
    let s = bots
        .create_bot_session(CreateBotSessionRequest { parent: String::new(), bot_session: Some(BotSession { bot_id: "silent".into(), ..Default::default() }) })
        .await
        .unwrap()
        .into_inner();
    let s = bots.update_bot_session(UpdateBotSessionRequest { name: s.name.clone(), bot_session: Some(s), update_mask: None }).await.unwrap().into_inner();
    assert_eq!(s.leases.len(), 1);
    assert_eq!(s.leases[0].state, LeaseState::Pending as i32);
    // A real worker arrives; the silent bot's lease is requeued to it.
    c.start_worker(&[]);
    let ops = drain(exec).await;
    let resp = response(ops.last().unwrap());
    let r = resp.result.unwrap_or_else(|| panic!("no result; status {:?}", resp.status));
    assert_eq!(bs_read(&c.node, &blob_resource("", r.output_files[0].digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"ran\n");
    // The silent bot's session is gone: its next call is told so.
    let e = bots.update_bot_session(UpdateBotSessionRequest { name: s.name.clone(), bot_session: Some(s), update_mask: None }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn an_idle_bot_that_keeps_long_polling_is_never_taken_for_lost() {
    // With a 1 s silence limit a bot asking for work with a 20 s deadline must be answered
    // well within the limit, or it is declared lost while it waits.
    let c = Cluster::start_with_worker(|cfg| cfg.scheduler.bot_silence_secs = 1, false).await;
    let mut bots = BotsClient::new(c.node.channel.clone());
    let mut s = bots
        .create_bot_session(CreateBotSessionRequest { parent: String::new(), bot_session: Some(BotSession { bot_id: "poller".into(), ..Default::default() }) })
        .await
        .unwrap()
        .into_inner();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut calls = 0;
    while tokio::time::Instant::now() < until {
        let mut req = tonic::Request::new(UpdateBotSessionRequest { name: s.name.clone(), bot_session: Some(s.clone()), update_mask: None });
        req.set_timeout(Duration::from_secs(20));
        s = tokio::time::timeout(Duration::from_secs(5), bots.update_bot_session(req))
            .await
            .expect("a long poll ends before the bot would be taken for lost")
            .unwrap_or_else(|e| panic!("call {calls}: the session was lost while polling: {e:?}"))
            .into_inner();
        assert!(s.leases.is_empty());
        calls += 1;
    }
    // Work arriving now goes to this same session.
    let d = action(&c.node, &["true"], &[], &[], None, &[]).await;
    let _exec = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let mut req = tonic::Request::new(UpdateBotSessionRequest { name: s.name.clone(), bot_session: Some(s.clone()), update_mask: None });
    req.set_timeout(Duration::from_secs(20));
    let s = bots.update_bot_session(req).await.expect("the session is still known").into_inner();
    assert_eq!(s.leases.len(), 1, "the queued action is leased to the polling bot");
}

#[tokio::test]
async fn a_prefetched_lease_is_taken_at_once_but_runs_only_when_a_slot_frees() {
    let mut c = Cluster::start_with_worker(|_| {}, false).await;
    c.start_worker_with("prefetching", &[], 1, 1);
    let script = "sleep 1; date +%s%N > out";
    let a = action(&c.node, &["sh", "-c", &format!("{script} # a")], &["out"], &[], None, &[]).await;
    let b = action(&c.node, &["sh", "-c", &format!("{script} # b")], &["out"], &[], None, &[]).await;
    let follow = |s: tonic::Streaming<Operation>| {
        tokio::spawn(async move {
            let mut first_executing = None;
            let mut s = s;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while let Some(op) = tokio::time::timeout_at(deadline, s.message()).await.expect("in time").unwrap() {
                if stage(&op) == execution_stage::Value::Executing as i32 && first_executing.is_none() {
                    first_executing = Some(std::time::Instant::now());
                }
                if op.done {
                    return (first_executing, std::time::Instant::now(), response(&op));
                }
            }
            panic!("the stream ended before the operation was done");
        })
    };
    let ta = follow(c.exec().execute(req(&a, false)).await.unwrap().into_inner());
    let tb = follow(c.exec().execute(req(&b, false)).await.unwrap().into_inner());
    let (ea, da, ra) = ta.await.unwrap();
    let (eb, db, rb) = tb.await.unwrap();
    let (ea, eb) = (ea.expect("a was executing"), eb.expect("b was executing"));
    // Both leases were out before the first action finished: one of them was prefetched.
    let (first_done, second_executing) = if da <= db { (da, eb) } else { (db, ea) };
    assert!(second_executing < first_done, "the second lease was taken only after the first action finished");
    // One slot: the two commands never ran at the same time.
    let window = |r: &ExecuteResponse| {
        let m = r.result.as_ref().unwrap().execution_metadata.clone().unwrap();
        let t = |ts: Option<kiln_proto::protobuf::Timestamp>| {
            let ts = ts.unwrap();
            ts.seconds as i128 * 1_000_000_000 + ts.nanos as i128
        };
        (t(m.execution_start_timestamp), t(m.execution_completed_timestamp))
    };
    let (wa, wb) = (window(&ra), window(&rb));
    assert!(wa.1 <= wb.0 || wb.1 <= wa.0, "the two actions overlapped: {wa:?} {wb:?}");
}

#[tokio::test]
async fn bots_see_env_and_get_results_back_through_the_lease() {
    let c = Cluster::start(|_| {}).await;
    let cmd = Command {
        arguments: vec!["sh".into(), "-c".into(), "echo \"$GREETING\" > sub/g.txt".into()],
        environment_variables: vec![
            EnvironmentVariable { name: "GREETING".into(), value: "hi from env".into() },
            EnvironmentVariable { name: "PATH".into(), value: "/usr/bin:/bin".into() },
        ],
        output_paths: vec!["sub/g.txt".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let act = Action { command_digest: Some(sha256(&cmd)), input_root_digest: Some(sha256(&root)), ..Default::default() }.encode_to_vec();
    batch_upload(&c.node, "", &[&act, &root, &cmd]).await;
    let ops = drain(c.exec().execute(req(&sha256(&act), false)).await.unwrap().into_inner()).await;
    let r = response(ops.last().unwrap()).result.unwrap();
    assert_eq!(r.output_files[0].path, "sub/g.txt");
    assert_eq!(bs_read(&c.node, &blob_resource("", r.output_files[0].digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"hi from env\n");
}

#[tokio::test]
async fn do_not_cache_actions_run_every_time_and_are_not_joined() {
    let c = Cluster::start(|_| {}).await;
    let cmd = Command { arguments: vec!["sh".into(), "-c".into(), "sleep 1; date +%s%N > out".into()], output_paths: vec!["out".into()], ..Default::default() }
        .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let act = Action { command_digest: Some(sha256(&cmd)), input_root_digest: Some(sha256(&root)), do_not_cache: true, ..Default::default() }.encode_to_vec();
    batch_upload(&c.node, "", &[&act, &root, &cmd]).await;
    let d = sha256(&act);
    let mut a = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let mut b = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let (na, nb) = (a.message().await.unwrap().unwrap().name, b.message().await.unwrap().unwrap().name);
    assert_ne!(na, nb, "do_not_cache actions are never joined");
    let ra = response(drain(a).await.last().unwrap());
    let rb = response(drain(b).await.last().unwrap());
    assert!(!ra.cached_result && !rb.cached_result);
    let again = response(drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await.last().unwrap());
    assert!(!again.cached_result, "do_not_cache results are not written to the Action Cache");
}

#[tokio::test]
async fn a_worker_restarted_mid_action_does_not_lose_the_action() {
    let mut c = Cluster::start_with_worker(|_| {}, false).await;
    let marker = format!("kiln-restart-marker-{}", std::process::id());
    let first = c.start_named_worker("restarting", &[]);
    let d = action(&c.node, &["sh", "-c", &format!("sleep 2; echo done > out # {marker}")], &["out"], &[], None, &[]).await;
    let exec = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !pgrep(&marker) {
        assert!(tokio::time::Instant::now() < deadline, "the action never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same worker comes back (same bot ids) while its first incarnation is still busy: the
    // new sessions replace the old ones and the action is requeued to them.
    let _second = c.start_named_worker("restarting", &[]);
    drop(first);
    let ops = drain(exec).await;
    let r = response(ops.last().unwrap());
    let result = r.result.expect("the action completed");
    assert_eq!(result.exit_code, 0);
    assert_eq!(bs_read(&c.node, &blob_resource("", result.output_files[0].digest.as_ref().unwrap()), 0, 0).await.unwrap(), b"done\n");
}

/// A CompletedActionLogger receiver: keeps what it is sent, acknowledges each in order.
#[derive(Clone, Default)]
struct Receiver {
    got: std::sync::Arc<std::sync::Mutex<Vec<kiln_proto::completed_actions::CompletedAction>>>,
}

#[tonic::async_trait]
impl kiln_proto::completed_actions::CompletedActionLogger for Receiver {
    type LogCompletedActionsStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<(), tonic::Status>> + Send>>;

    async fn log_completed_actions(
        &self,
        req: tonic::Request<tonic::Streaming<kiln_proto::completed_actions::CompletedAction>>,
    ) -> Result<tonic::Response<Self::LogCompletedActionsStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let got = self.got.clone();
        let acks = async_stream_acks(move |tx| async move {
            while let Ok(Some(ca)) = inbound.message().await {
                got.lock().unwrap().push(ca);
                if tx.send(Ok(())).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(acks))
    }
}

/// The acknowledgements a task produces, as a response stream.
fn async_stream_acks<F, Fut>(f: F) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<(), tonic::Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<(), tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn serve_receiver(port: u16) -> (Receiver, tokio::task::JoinHandle<()>) {
    let r = Receiver::default();
    let svc = kiln_proto::completed_actions::CompletedActionLoggerServer::new(r.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let h = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (r, h)
}

#[tokio::test]
async fn every_finished_action_reaches_the_completed_action_logger_once_even_when_it_starts_late() {
    // The receiver is not there yet: the node buffers and retries.
    let port = free_port();
    let c = Cluster::start(|cfg| cfg.completed_action_logger.endpoint = Some(format!("http://127.0.0.1:{port}"))).await;
    let mut digests = Vec::new();
    for i in 0..4 {
        let d = action(&c.node, &["sh", "-c", &format!("echo {i} > out.txt")], &["out.txt"], &[], None, &[]).await;
        let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
        assert_eq!(response(ops.last().unwrap()).result.unwrap().exit_code, 0);
        digests.push(d);
    }
    // A cache hit runs nothing and is not logged; a failing action is.
    let ops = drain(c.exec().execute(req(&digests[0], false)).await.unwrap().into_inner()).await;
    assert!(response(&ops[0]).cached_result);
    let failing = action(&c.node, &["sh", "-c", "exit 7"], &[], &[], None, &[]).await;
    drain(c.exec().execute(req(&failing, false)).await.unwrap().into_inner()).await;
    digests.push(failing.clone());

    let (rx, _server) = serve_receiver(port).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while rx.got.lock().unwrap().len() < digests.len() {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {} actions arrived", rx.got.lock().unwrap().len(), digests.len());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Nothing more arrives (a duplicate would show up within this wait).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), digests.len(), "each action once");
    let mut uuids = std::collections::HashSet::new();
    for ca in &got {
        assert!(uuid::Uuid::parse_str(&ca.uuid).is_ok(), "{}", ca.uuid);
        uuids.insert(ca.uuid.clone());
        assert_eq!(ca.instance_name, "");
    }
    assert_eq!(uuids.len(), got.len());
    let logged: Vec<_> = got.iter().map(|ca| ca.historical_execute_response.clone().unwrap()).collect();
    let mut logged_digests: Vec<_> = logged.iter().map(|h| h.action_digest.clone().unwrap().hash).collect();
    let mut want: Vec<_> = digests.iter().map(|d| d.hash.clone()).collect();
    logged_digests.sort();
    want.sort();
    assert_eq!(logged_digests, want);
    for h in &logged {
        let result = h.execute_response.clone().unwrap().result.unwrap();
        let md = result.execution_metadata.unwrap();
        assert!(!md.worker.is_empty() && md.worker_start_timestamp.is_some() && md.worker_completed_timestamp.is_some());
        if h.action_digest.as_ref().unwrap().hash == failing.hash {
            assert_eq!(result.exit_code, 7);
        }
    }
}

#[tokio::test]
async fn a_full_logger_buffer_drops_and_never_blocks_execution() {
    // Nothing ever listens on the receiver's port, and the buffer holds one action.
    let port = free_port();
    let c = Cluster::start(|cfg| {
        cfg.completed_action_logger.endpoint = Some(format!("http://127.0.0.1:{port}"));
        cfg.completed_action_logger.buffer = 1;
    })
    .await;
    for i in 0..4 {
        let d = action(&c.node, &["sh", "-c", &format!("echo {i}")], &[], &[], None, &[]).await;
        let ops = tokio::time::timeout(std::time::Duration::from_secs(30), drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()))
            .await
            .expect("execution does not wait for the logger");
        assert_eq!(response(ops.last().unwrap()).result.unwrap().exit_code, 0);
    }
    let page = http_get(c.node.node.as_ref().unwrap().http_addr, "/metrics").await;
    assert!(metric(&page, "kiln_completed_actions_dropped_total") >= 1.0, "{page}");
}

#[tokio::test]
async fn a_running_actions_output_is_readable_live_through_its_log_streams() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::ReadRequest;
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "echo first; echo oops >&2; sleep 3; echo second"], &[], &[], None, &[]).await;
    let mut ops = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    // The metadata names the streams once a worker took the action.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (out_name, err_name, op_name) = loop {
        let op = tokio::time::timeout_at(deadline, ops.message()).await.expect("executing in time").unwrap().unwrap();
        let md = ExecuteOperationMetadata::decode(&op.metadata.as_ref().unwrap().value[..]).unwrap();
        if md.stage == execution_stage::Value::Executing as i32 {
            assert!(!md.stdout_stream_name.is_empty() && !md.stderr_stream_name.is_empty());
            break (md.stdout_stream_name, md.stderr_stream_name, op.name);
        }
        assert!(!op.done, "finished before it was seen executing");
    };
    // The worker creates the streams as it starts the command: retry until they exist.
    let bs = ByteStreamClient::new(c.node.channel.clone());
    let mut live = open_log_stream(&c.node.channel, &out_name, deadline).await;
    let first = tokio::time::timeout_at(deadline, live.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.data, b"first\n");
    // Seen while the action still runs.
    let now = kiln_proto::longrunning::operations_client::OperationsClient::new(c.node.channel.clone())
        .get_operation(kiln_proto::longrunning::GetOperationRequest { name: op_name })
        .await
        .unwrap()
        .into_inner();
    assert!(!now.done, "the first line arrived only after the action ended");
    // The rest arrives, then the stream ends with the action.
    let mut rest = Vec::new();
    while let Some(m) = tokio::time::timeout_at(deadline, live.message()).await.unwrap().unwrap() {
        rest.extend(m.data);
    }
    assert_eq!(rest, b"second\n");
    let last = drain(ops).await;
    assert_eq!(response(last.last().unwrap()).result.unwrap().exit_code, 0);
    // After the end: the whole output, from any offset.
    let read_all = |name: String, offset: i64| {
        let mut bs = bs.clone();
        async move {
            let mut s = bs.read(ReadRequest { resource_name: name, read_offset: offset, read_limit: 0 }).await.unwrap().into_inner();
            let mut all = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                all.extend(m.data);
            }
            all
        }
    };
    assert_eq!(read_all(out_name.clone(), 0).await, b"first\nsecond\n");
    assert_eq!(read_all(out_name.clone(), 6).await, b"second\n");
    assert_eq!(read_all(err_name, 0).await, b"oops\n");
    // Bad names.
    let mut bs = bs;
    let st = bs.read(ReadRequest { resource_name: format!("{out_name}/not-the-token"), ..Default::default() }).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    let st = bs.read(ReadRequest { resource_name: "no-such-op/logstreams/stdout".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound);
    let st = kiln_proto::logstream::log_stream_service_client::LogStreamServiceClient::new(c.node.channel.clone())
        .create_log_stream(kiln_proto::logstream::CreateLogStreamRequest { parent: "op/other".into() })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
}

/// Live streams are for actions that run a while: one that ends sooner gets none (its output is
/// in its result), which spares trivial actions two stream creations and two writes.
#[tokio::test]
async fn an_action_that_ends_at_once_gets_no_live_streams() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::ReadRequest;
    let c = Cluster::start(|_| {}).await;
    let d = action(&c.node, &["sh", "-c", "echo quick"], &[], &[], None, &[]).await;
    let ops = drain(c.exec().execute(req(&d, false)).await.unwrap().into_inner()).await;
    let last = ops.last().unwrap();
    let r = response(last).result.unwrap();
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout_digest.is_some_and(|d| d.size_bytes == 6), "the output is in the result");
    let st = ByteStreamClient::new(c.node.channel.clone())
        .read(ReadRequest { resource_name: format!("{}/logstreams/stdout", last.name), read_offset: 0, read_limit: 0 })
        .await;
    let st = match st {
        Ok(s) => s.into_inner().message().await.map(|_| ()).unwrap_err(),
        Err(st) => st,
    };
    assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");
}

#[tokio::test]
async fn a_lease_whose_answer_was_lost_is_handed_out_again() {
    let c = Cluster::start_with_worker(|_| {}, false).await;
    let d = action(&c.node, &["sh", "-c", "echo ran > out"], &["out"], &[], None, &[]).await;
    let _exec = c.exec().execute(req(&d, false)).await.unwrap().into_inner();
    let mut bots = BotsClient::new(c.node.channel.clone());
    let s = bots
        .create_bot_session(CreateBotSessionRequest { parent: String::new(), bot_session: Some(BotSession { bot_id: "forgetful".into(), ..Default::default() }) })
        .await
        .unwrap()
        .into_inner();
    let idle = s.clone();
    let got = bots.update_bot_session(UpdateBotSessionRequest { name: s.name.clone(), bot_session: Some(s), update_mask: None }).await.unwrap().into_inner();
    assert_eq!(got.leases.len(), 1);
    let lease = got.leases[0].clone();
    // The lease carries the Action itself, as stored: the bot need not fetch it.
    let payload = lease.payload.clone().expect("the lease has a payload");
    assert_eq!(payload.type_url, "type.googleapis.com/build.bazel.remote.execution.v2.Action");
    assert_eq!(kiln_node::digest::DigestFunction::Sha256.digest_of(&payload.value).to_proto(), d);
    // That answer never reached the bot: it calls again as it was, running nothing.
    let again = bots
        .update_bot_session(UpdateBotSessionRequest { name: idle.name.clone(), bot_session: Some(idle), update_mask: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.leases.len(), 1, "the lease the cluster says it holds comes back");
    assert_eq!((again.leases[0].id.as_str(), again.leases[0].state), (lease.id.as_str(), LeaseState::Pending as i32));
    assert_eq!(again.leases[0].payload, lease.payload);
}
