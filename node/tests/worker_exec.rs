//! The worker's action execution engine against a real node: inputs fetched from its CAS and
//! materialized, commands run with their environment, working directory and timeout, outputs
//! uploaded and read back, and every kind of refusal reported in the ExecuteResponse.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{batch_upload, blob_resource, bs_read, pseudo_random, sha256, TestNode};
use kiln_node::worker::{Executor, ExecutorConfig};
use kiln_proto::reapi::command::EnvironmentVariable;
use kiln_proto::reapi::{Action, Command, Digest, Directory, DirectoryNode, ExecuteResponse, FileNode, SymlinkNode, Tree};
use kiln_proto::rpc_details::PreconditionFailure;
use prost::Message;
use tokio_util::sync::CancellationToken;

/// Bound on one `execute` call in these tests.
const EXECUTE_BOUND: Duration = Duration::from_secs(30);
const PATH: &str = "/usr/bin:/bin";

struct Harness {
    node: TestNode,
    exec: Executor,
    work: tempfile::TempDir,
}

async fn harness() -> Harness {
    harness_with_cache(64 << 20).await
}

async fn harness_with_cache(cache_max_bytes: u64) -> Harness {
    let node = TestNode::start().await;
    let work = tempfile::tempdir().unwrap();
    let cfg = ExecutorConfig { work_dir: work.path().to_path_buf(), cache_max_bytes, worker_name: "test-worker".into() };
    let exec = Executor::new(cfg).unwrap();
    Harness { node, exec, work }
}

fn file(name: &str, data: &[u8], executable: bool) -> FileNode {
    FileNode { name: name.into(), digest: Some(sha256(data)), is_executable: executable, node_properties: None }
}

fn dir(name: &str, d: &Directory) -> DirectoryNode {
    DirectoryNode { name: name.into(), digest: Some(sha256(&d.encode_to_vec())) }
}

fn symlink(name: &str, target: &str) -> SymlinkNode {
    SymlinkNode { name: name.into(), target: target.into(), node_properties: None }
}

fn env(vars: &[(&str, &str)]) -> Vec<EnvironmentVariable> {
    vars.iter().map(|(n, v)| EnvironmentVariable { name: n.to_string(), value: v.to_string() }).collect()
}

/// `/bin/sh -c script`, with only PATH set.
fn sh(script: &str) -> Command {
    Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: env(&[("PATH", PATH)]),
        ..Default::default()
    }
}

impl Harness {
    /// Uploads the command, the directories (the first is the input root), the file contents
    /// and the action; returns the action digest.
    async fn action(&self, command: &Command, dirs: &[&Directory], files: &[&[u8]], timeout: Option<Duration>) -> Digest {
        for f in files {
            batch_upload(&self.node, "", &[f]).await;
        }
        let encoded: Vec<Vec<u8>> = dirs.iter().map(|d| d.encode_to_vec()).collect();
        let refs: Vec<&[u8]> = encoded.iter().map(|d| &d[..]).collect();
        batch_upload(&self.node, "", &refs).await;
        let command_bytes = command.encode_to_vec();
        batch_upload(&self.node, "", &[&command_bytes]).await;
        let action = Action {
            command_digest: Some(sha256(&command_bytes)),
            input_root_digest: Some(sha256(&encoded[0])),
            timeout: timeout.map(|t| kiln_proto::protobuf::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 }),
            ..Default::default()
        };
        let action_bytes = action.encode_to_vec();
        batch_upload(&self.node, "", &[&action_bytes]).await;
        sha256(&action_bytes)
    }

    async fn run(&self, digest: &Digest) -> ExecuteResponse {
        self.run_with(digest, CancellationToken::new()).await
    }

    async fn run_with(&self, digest: &Digest, cancel: CancellationToken) -> ExecuteResponse {
        let r = tokio::time::timeout(EXECUTE_BOUND, self.exec.execute(self.node.channel.clone(), "", digest.clone(), cancel))
            .await
            .expect("execute returns within its bound");
        self.exec.settled().await;
        self.assert_no_action_dir_left();
        r
    }

    async fn blob(&self, d: &Digest) -> Vec<u8> {
        let data = bs_read(&self.node, &blob_resource("", d), 0, 0).await.unwrap();
        assert_eq!(sha256(&data), *d);
        data
    }

    /// Action directories are emptied for reuse: what stays is an empty `root` and empty
    /// `stdout` and `stderr` files, nothing of the action.
    fn assert_no_action_dir_left(&self) {
        for dir in std::fs::read_dir(self.work.path().join("actions")).unwrap() {
            let dir = dir.unwrap().path();
            let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            assert_eq!(names, ["root", "stderr", "stdout"], "{} holds more than an emptied action directory", dir.display());
            assert_eq!(std::fs::read_dir(dir.join("root")).unwrap().count(), 0, "{}/root is not empty", dir.display());
            for f in ["stdout", "stderr"] {
                assert_eq!(std::fs::metadata(dir.join(f)).unwrap().len(), 0, "{}/{f} is not empty", dir.display());
            }
        }
    }
}

fn code(r: &ExecuteResponse) -> tonic::Code {
    tonic::Code::from_i32(r.status.as_ref().map_or(0, |s| s.code))
}

fn message(r: &ExecuteResponse) -> &str {
    r.status.as_ref().map_or("", |s| s.message.as_str())
}

fn assert_ok(r: &ExecuteResponse) {
    assert_eq!(code(r), tonic::Code::Ok, "{:?}", r.status);
}

/// Pids of live processes whose command line contains `marker` (zombies have none).
fn processes_with(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until no process carries `marker`.
async fn assert_all_gone(marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "processes still running: {:?}", processes_with(marker));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `sleep` duration unique to this test run, used as the marker of its processes.
fn unique_sleep(salt: u32) -> String {
    format!("{}", 700_000 + (std::process::id() % 50_000) * 4 + salt)
}

#[tokio::test]
async fn output_paths_of_every_kind_come_back_through_the_cas() {
    let h = harness().await;
    let tool = b"#!/bin/sh\necho tool-ran\n";
    let input = b"hello input\n";
    let root = Directory { files: vec![file("in.txt", input, false), file("tool.sh", tool, true)], ..Default::default() };
    let script = "cat in.txt > out/file.txt \
        && mkdir -p out/dir/sub && echo nested > out/dir/sub/n.txt && printf x > out/dir/exe && chmod +x out/dir/exe \
        && ln -s ../file.txt out/dir/up && ln -s file.txt out/link \
        && ./tool.sh > out/tool_out && cp tool.sh out/run.sh \
        && head -c 3000000 /dev/urandom > out/big.bin \
        && echo to-stdout && echo to-stderr >&2";
    let mut cmd = sh(script);
    cmd.output_paths =
        ["out/big.bin", "out/dir", "out/file.txt", "out/link", "out/missing", "out/run.sh", "out/tool_out"].map(String::from).to_vec();
    let digest = h.action(&cmd, &[&root], &[input, tool], None).await;
    let r = h.run(&digest).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    assert_eq!(res.exit_code, 0);
    assert_eq!(h.blob(res.stdout_digest.as_ref().unwrap()).await, b"to-stdout\n");
    assert_eq!(h.blob(res.stderr_digest.as_ref().unwrap()).await, b"to-stderr\n");

    let files: HashMap<&str, _> = res.output_files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut names: Vec<&str> = files.keys().copied().collect();
    names.sort();
    assert_eq!(names, ["out/big.bin", "out/file.txt", "out/run.sh", "out/tool_out"]);
    assert_eq!(h.blob(files["out/file.txt"].digest.as_ref().unwrap()).await, input);
    assert_eq!(h.blob(files["out/tool_out"].digest.as_ref().unwrap()).await, b"tool-ran\n");
    assert!(!files["out/file.txt"].is_executable);
    assert!(files["out/run.sh"].is_executable, "the executable bit of an output file is reported");
    // Over the batch size: uploaded through ByteStream Write.
    let big = h.blob(files["out/big.bin"].digest.as_ref().unwrap()).await;
    assert_eq!(big.len(), 3_000_000);

    assert_eq!(res.output_symlinks.len(), 1);
    assert_eq!((res.output_symlinks[0].path.as_str(), res.output_symlinks[0].target.as_str()), ("out/link", "file.txt"));

    assert_eq!(res.output_directories.len(), 1);
    let od = &res.output_directories[0];
    assert_eq!(od.path, "out/dir");
    let tree = Tree::decode(&h.blob(od.tree_digest.as_ref().unwrap()).await[..]).unwrap();
    let root_dir = tree.root.unwrap();
    assert_eq!(root_dir.files.len(), 1);
    assert_eq!(root_dir.files[0].name, "exe");
    assert!(root_dir.files[0].is_executable);
    assert_eq!(h.blob(root_dir.files[0].digest.as_ref().unwrap()).await, b"x");
    assert_eq!(root_dir.symlinks, vec![symlink("up", "../file.txt")]);
    assert_eq!(root_dir.directories.len(), 1);
    assert_eq!(root_dir.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    let sub = &tree.children[0];
    assert_eq!(sha256(&sub.encode_to_vec()), *root_dir.directories[0].digest.as_ref().unwrap());
    assert_eq!(h.blob(sub.files[0].digest.as_ref().unwrap()).await, b"nested\n");
    assert!(od.is_topologically_sorted);

    let m = res.execution_metadata.unwrap();
    assert_eq!(m.worker, "test-worker");
    let stamps = [
        m.worker_start_timestamp,
        m.input_fetch_start_timestamp,
        m.input_fetch_completed_timestamp,
        m.execution_start_timestamp,
        m.execution_completed_timestamp,
        m.output_upload_start_timestamp,
        m.output_upload_completed_timestamp,
        m.worker_completed_timestamp,
    ];
    let stamps: Vec<(i64, i32)> =
        stamps.iter().map(|t| t.as_ref().map(|t| (t.seconds, t.nanos)).expect("every timestamp is set")).collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "timestamps in phase order: {stamps:?}");
}

#[tokio::test]
#[allow(deprecated)] // output_files, output_directories and their symlink fields: v2.0 clients
async fn legacy_output_fields_and_output_parents() {
    let h = harness().await;
    let root = Directory::default();
    // No mkdir: the worker creates the parents of every output before the command runs.
    let mut cmd = sh("echo f > deep/er/f.txt && mkdir -p d2/d && echo g > d2/d/g && ln -s deep/er/f.txt lnk && ln -s d2 dlink");
    cmd.output_files = vec!["deep/er/f.txt".into(), "lnk".into()];
    cmd.output_directories = vec!["d2/d".into(), "dlink".into(), "never/made".into()];
    let digest = h.action(&cmd, &[&root], &[], None).await;
    let r = h.run(&digest).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    assert_eq!(res.output_files.len(), 1);
    assert_eq!(res.output_files[0].path, "deep/er/f.txt");
    assert_eq!(h.blob(res.output_files[0].digest.as_ref().unwrap()).await, b"f\n");
    assert_eq!(res.output_file_symlinks.len(), 1);
    assert_eq!(res.output_file_symlinks[0].target, "deep/er/f.txt");
    assert_eq!(res.output_directory_symlinks.len(), 1);
    assert_eq!(res.output_directory_symlinks[0].path, "dlink");
    assert!(res.output_symlinks.is_empty(), "output_symlinks is for output_paths only");
    assert_eq!(res.output_directories.len(), 1);
    let tree = Tree::decode(&h.blob(res.output_directories[0].tree_digest.as_ref().unwrap()).await[..]).unwrap();
    assert_eq!(tree.root.unwrap().files[0].name, "g");

    // A directory where a file was asked for is FAILED_PRECONDITION.
    let mut cmd = sh("mkdir x");
    cmd.output_files = vec!["x".into()];
    let r = h.run(&h.action(&cmd, &[&root], &[], None).await).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{:?}", r.status);
    assert!(message(&r).contains("\"x\""));
}

#[tokio::test]
async fn environment_working_directory_and_argv0_are_the_commands() {
    let h = harness().await;
    let run = b"#!/bin/sh\necho \"ran $1 in $(pwd)\"\n";
    let here = b"here\n";
    let wd = Directory { files: vec![file("here.txt", here, false), file("run.sh", run, true)], ..Default::default() };
    let sub = Directory { directories: vec![dir("wd", &wd)], ..Default::default() };
    let root = Directory { directories: vec![dir("sub", &sub)], ..Default::default() };

    // argv[0] without '/' is found through the command's own PATH; the environment is exactly
    // the command's.
    let cmd = Command {
        arguments: vec!["env".into()],
        environment_variables: env(&[("FOO", "bar baz"), ("PATH", PATH)]),
        working_directory: "sub/wd".into(),
        ..Default::default()
    };
    let r = h.run(&h.action(&cmd, &[&root, &sub, &wd], &[here, run], None).await).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    assert_eq!(String::from_utf8(h.blob(res.stdout_digest.as_ref().unwrap()).await).unwrap(), format!("FOO=bar baz\nPATH={PATH}\n"));

    // argv[0] with '/' is relative to the working directory; output paths too.
    let mut cmd = Command {
        arguments: vec!["./run.sh".into(), "arg1".into()],
        environment_variables: env(&[("PATH", PATH)]),
        working_directory: "sub/wd".into(),
        ..Default::default()
    };
    cmd.output_paths = vec!["../../top.txt".into(), "here.txt".into()];
    let mut cmd2 = cmd.clone();
    let r = h.run(&h.action(&cmd, &[&root, &sub, &wd], &[here, run], None).await).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    let out = String::from_utf8(h.blob(res.stdout_digest.as_ref().unwrap()).await).unwrap();
    assert!(out.starts_with("ran arg1 in /") && out.trim_end().ends_with("/root/sub/wd"), "{out}");
    assert_eq!(res.output_files.len(), 1, "here.txt is an input and an output; top.txt was not made");
    assert_eq!(res.output_files[0].path, "here.txt");

    cmd2.arguments = vec!["/bin/sh".into(), "-c".into(), "echo top > ../../top.txt".into()];
    let r = h.run(&h.action(&cmd2, &[&root, &sub, &wd], &[here, run], None).await).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    let top = res.output_files.iter().find(|f| f.path == "../../top.txt").expect("reported with the path as asked");
    assert_eq!(h.blob(top.digest.as_ref().unwrap()).await, b"top\n");
}

#[tokio::test]
async fn failing_commands_report_their_exit_code() {
    let h = harness().await;
    let root = Directory::default();
    let r = h.run(&h.action(&sh("echo oops >&2; exit 3"), &[&root], &[], None).await).await;
    assert_ok(&r);
    let res = r.result.unwrap();
    assert_eq!(res.exit_code, 3);
    assert_eq!(h.blob(res.stderr_digest.as_ref().unwrap()).await, b"oops\n");

    let r = h.run(&h.action(&sh("kill -9 $$"), &[&root], &[], None).await).await;
    assert_ok(&r);
    assert_eq!(r.result.unwrap().exit_code, 128 + 9);

    // A program that does not exist cannot start.
    let cmd =
        Command { arguments: vec!["no-such-program-kiln".into()], environment_variables: env(&[("PATH", PATH)]), ..Default::default() };
    let r = h.run(&h.action(&cmd, &[&root], &[], None).await).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{:?}", r.status);
    assert!(message(&r).contains("no-such-program-kiln"));
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group_and_keeps_the_partial_result() {
    let h = harness().await;
    let marker = unique_sleep(1);
    let mut cmd = sh(&format!("echo started; echo partial > out.txt; sleep {marker} & sleep {marker}"));
    cmd.output_paths = vec!["out.txt".into()];
    let digest = h.action(&cmd, &[&Directory::default()], &[], Some(Duration::from_secs(1))).await;
    let started = Instant::now();
    let r = h.run(&digest).await;
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
    assert_eq!(code(&r), tonic::Code::DeadlineExceeded, "{:?}", r.status);
    let res = r.result.unwrap();
    assert_eq!(res.exit_code, 128 + 9);
    assert_eq!(h.blob(res.stdout_digest.as_ref().unwrap()).await, b"started\n");
    assert_eq!(res.output_files.len(), 1);
    assert_eq!(h.blob(res.output_files[0].digest.as_ref().unwrap()).await, b"partial\n");
    assert_all_gone(&format!("sleep {marker}")).await;
}

#[tokio::test]
async fn cancel_kills_the_process_group_and_reports_cancelled() {
    let h = harness().await;
    let marker = unique_sleep(2);
    let digest = h.action(&sh(&format!("sleep {marker} & sleep {marker}")), &[&Directory::default()], &[], None).await;
    let cancel = CancellationToken::new();
    let (r, ()) = tokio::join!(h.run_with(&digest, cancel.clone()), async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while processes_with(&format!("sleep {marker}")).len() < 2 {
            assert!(Instant::now() < deadline, "the command never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
    });
    assert_eq!(code(&r), tonic::Code::Cancelled, "{:?}", r.status);
    assert!(r.result.unwrap().execution_metadata.unwrap().execution_start_timestamp.is_some());
    assert_all_gone(&format!("sleep {marker}")).await;
}

#[tokio::test]
async fn escaping_names_paths_and_symlinks_are_refused_by_name() {
    let h = harness().await;
    let data = b"data";
    let cases: Vec<(Command, Directory, &str)> = vec![
        (sh("true"), Directory { files: vec![file("..", data, false)], ..Default::default() }, "\"..\""),
        (sh("true"), Directory { files: vec![file("a/b", data, false)], ..Default::default() }, "\"a/b\""),
        (sh("true"), Directory { symlinks: vec![symlink("abs", "/etc/passwd")], ..Default::default() }, "\"abs\""),
        (sh("true"), Directory { symlinks: vec![symlink("up", "../outside")], ..Default::default() }, "\"up\""),
        (Command { output_paths: vec!["../x".into()], ..sh("true") }, Directory::default(), "\"../x\""),
        (Command { working_directory: "../w".into(), ..sh("true") }, Directory::default(), "\"../w\""),
        (Command { output_paths: vec!["/abs".into()], ..sh("true") }, Directory::default(), "\"/abs\""),
    ];
    for (cmd, root, named) in cases {
        let r = h.run(&h.action(&cmd, &[&root], &[data], None).await).await;
        assert_eq!(code(&r), tonic::Code::InvalidArgument, "{named}: {:?}", r.status);
        assert!(message(&r).contains(named), "{named} not in {:?}", message(&r));
    }

    // Made by the command: an output symlink pointing out of the root, and an output reached
    // through a symlink to outside.
    for (script, out) in [("ln -s ../../../etc out", "out"), ("rm -r l && ln -s / l", "l/etc/passwd")] {
        let mut cmd = sh(script);
        cmd.output_paths = vec![out.into()];
        let r = h.run(&h.action(&cmd, &[&Directory::default()], &[], None).await).await;
        assert_eq!(code(&r), tonic::Code::InvalidArgument, "{out}: {:?}", r.status);
        assert!(message(&r).contains(&format!("{out:?}")), "{:?}", message(&r));
    }
}

#[tokio::test]
async fn missing_blobs_are_named_in_a_precondition_failure() {
    let h = harness().await;
    let absent = b"never uploaded";
    let root = Directory { files: vec![file("f", absent, false)], ..Default::default() };
    let r = h.run(&h.action(&sh("true"), &[&root], &[], None).await).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{:?}", r.status);
    let details = &r.status.as_ref().unwrap().details;
    assert_eq!(details.len(), 1);
    assert_eq!(details[0].type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
    let pf = PreconditionFailure::decode(&details[0].value[..]).unwrap();
    assert_eq!(pf.violations.len(), 1);
    assert_eq!(pf.violations[0].r#type, "MISSING");
    let d = sha256(absent);
    assert_eq!(pf.violations[0].subject, format!("blobs/{}/{}", d.hash, d.size_bytes));

    // The action itself missing.
    let ghost = sha256(b"no such action");
    let r = h.run(&ghost).await;
    assert_eq!(code(&r), tonic::Code::FailedPrecondition, "{:?}", r.status);
    let pf = PreconditionFailure::decode(&r.status.unwrap().details[0].value[..]).unwrap();
    assert_eq!(pf.violations[0].subject, format!("blobs/{}/{}", ghost.hash, ghost.size_bytes));
}

#[tokio::test]
async fn inputs_are_served_from_the_cache_the_second_time() {
    let h = harness().await;
    let small = b"small input\n";
    let same = b"#!/bin/sh\necho same\n";
    let big = pseudo_random(2 << 20, 7); // over the batch size: fetched through ByteStream Read
    let nested = Directory { files: vec![file("plain.sh", same, false)], ..Default::default() };
    let root = Directory {
        files: vec![file("big.bin", &big, false), file("exec.sh", same, true), file("small.txt", small, false)],
        directories: vec![dir("nested", &nested)],
        symlinks: vec![symlink("link", "nested/plain.sh")],
        ..Default::default()
    };
    let big_sum = format!("{}  big.bin", sha256(&big).hash);
    // Same content, two modes: two cache files, so the plain copy stays non-executable.
    let script = format!(
        "test -x exec.sh && test ! -x nested/plain.sh && cmp exec.sh link && ./exec.sh \
         && test \"$(sha256sum big.bin)\" = '{big_sum}' && test \"$(cat small.txt)\" = 'small input'"
    );
    let digest = h.action(&sh(&script), &[&root, &nested], &[small, same, &big], None).await;

    let before = h.exec.stats();
    let r = h.run(&digest).await;
    assert_ok(&r);
    assert_eq!(r.result.unwrap().exit_code, 0);
    let first = h.exec.stats();
    assert_eq!(first.cache_misses - before.cache_misses, 4, "{first:?}");
    assert_eq!(first.blobs_fetched - before.blobs_fetched, 3, "each content fetched once: {first:?}");
    assert_eq!(first.bytes_fetched - before.bytes_fetched, (small.len() + same.len() + big.len()) as u64);

    let r = h.run(&digest).await;
    assert_ok(&r);
    assert_eq!(r.result.unwrap().exit_code, 0);
    let second = h.exec.stats();
    assert_eq!(second.blobs_fetched, first.blobs_fetched, "nothing fetched the second time: {second:?}");
    assert_eq!(second.bytes_fetched, first.bytes_fetched);
    assert_eq!(second.cache_hits - first.cache_hits, 4);
    assert_eq!(second.actions_executed, 2);

    // A new executor on the same work dir keeps the cache and clears stale action dirs.
    let stale = h.work.path().join("actions/stale-from-a-crash/x");
    std::fs::create_dir_all(&stale).unwrap();
    let again = Executor::new(h.exec.config().clone()).unwrap();
    assert!(!stale.exists());
    let r = again.execute(h.node.channel.clone(), "", digest.clone(), CancellationToken::new()).await;
    assert_ok(&r);
    assert_eq!(again.stats().blobs_fetched, 0);
    assert_eq!(again.stats().cache_hits, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_actions_share_the_cache() {
    let h = harness().await;
    let shared = pseudo_random(100_000, 11);
    let tool = b"#!/bin/sh\ncat shared.bin\n";
    let root = Directory { files: vec![file("shared.bin", &shared, false), file("tool", tool, true)], ..Default::default() };
    let mut digests = Vec::new();
    for i in 0..3 {
        let mut cmd = sh(&format!("./tool > out.bin && echo {i}"));
        cmd.output_paths = vec!["out.bin".into()];
        digests.push(h.action(&cmd, &[&root], &[&shared, tool], None).await);
    }
    let runs = digests.iter().map(|d| h.exec.execute(h.node.channel.clone(), "", d.clone(), CancellationToken::new()));
    let results = tokio::time::timeout(EXECUTE_BOUND, futures::future::join_all(runs)).await.unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_ok(r);
        let res = r.result.as_ref().unwrap();
        assert_eq!(h.blob(res.stdout_digest.as_ref().unwrap()).await, format!("{i}\n").as_bytes());
        assert_eq!(h.blob(res.output_files[0].digest.as_ref().unwrap()).await, shared);
    }
    h.assert_no_action_dir_left();
}

#[tokio::test]
async fn the_cache_stays_within_its_bound_once_actions_are_done() {
    let h = harness_with_cache(1000).await;
    let big = pseudo_random(300_000, 3);
    let root = Directory { files: vec![file("big.bin", &big, false)], ..Default::default() };
    let digest = h.action(&sh("cmp big.bin big.bin"), &[&root], &[&big], None).await;
    let r = h.run(&digest).await;
    assert_ok(&r);
    assert_eq!(r.result.unwrap().exit_code, 0);
    let s = h.exec.stats();
    assert!(s.cache_bytes <= 1000, "{s:?}");
    assert_eq!(s.cache_evictions, 1);
    // Evicted, so fetched again.
    assert_ok(&h.run(&digest).await);
    assert_eq!(h.exec.stats().blobs_fetched, 2);
}

/// Action directories are reused: a worker running actions one after another keeps a single
/// one, and an action that took away its own write permissions leaves nothing to the next.
#[tokio::test]
async fn the_next_action_gets_an_empty_reused_directory() {
    let h = harness().await;
    let dirty = sh("mkdir -p sub && echo x > sub/f && echo y > top && chmod 555 sub . && echo left-things");
    let r = h.run(&h.action(&dirty, &[&Directory::default()], &[], None).await).await;
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{r:?}");
    let look = sh("ls -A");
    let r = h.run(&h.action(&look, &[&Directory::default()], &[], None).await).await;
    let result = r.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.stdout_digest.unwrap().size_bytes, 0, "the second action saw what the first left");
    assert_eq!(std::fs::read_dir(h.work.path().join("actions")).unwrap().count(), 1, "one directory, reused");
}
