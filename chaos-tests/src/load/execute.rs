//! The `execute-trivial` workload: remote execution of unique trivial actions.
//!
//! Every action runs `/bin/true` with an environment variable `KILN_LOAD_SALT` unique to the
//! action (run nonce + counter), so every Command, hence every Action digest, is new to the
//! server: nothing is answered from the Action Cache and no in-flight action is joined. The
//! input root is the empty Directory (the empty blob), uploaded once. Each round's Commands
//! and Actions are uploaded with BatchUpdateBlobs *before* the round's clock starts.
//!
//! One operation is one `Execute` call (cache lookup allowed, as a build tool does), its
//! stream read to the `done` Operation. Its latency is from sending the ExecuteRequest to
//! receiving that Operation: queueing, scheduling, the worker's run and the result's way
//! back. The done Operation must carry an ExecuteResponse with an OK status, `exit_code` 0
//! and `cached_result` false; anything else is a failed operation ([`OpFailed`]), counted and
//! reported with the workload, never timed as a success.
//!
//! Each success also yields a breakdown from the timestamps the server and worker put in the
//! result's `ExecutedActionMetadata` (same machine, same clock as this client):
//!
//! | phase | from | to |
//! |---|---|---|
//! | `1 sent→queued` | ExecuteRequest sent (client clock) | `queued_timestamp` (ms resolution: may read up to 1 ms short) |
//! | `2 queued→worker` | `queued_timestamp` | `worker_start_timestamp` |
//! | `3 worker fetch` | `input_fetch_start_timestamp` | `input_fetch_completed_timestamp` |
//! | `4 worker run` | `execution_start_timestamp` | `execution_completed_timestamp` |
//! | `5 worker upload` | `output_upload_start_timestamp` | `output_upload_completed_timestamp` |
//! | `6 worker total` | `worker_start_timestamp` | `worker_completed_timestamp` |
//! | `7 worker→client` | `worker_completed_timestamp` | the done Operation received (client clock) |
//!
//! Negative spans (clock resolution) are recorded as zero.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{
    batch_update_blobs_request, command::EnvironmentVariable, digest_function, Action,
    BatchUpdateBlobsRequest, Command, Digest, ExecuteRequest, ExecuteResponse,
    ExecutedActionMetadata, RequestMetadata, ToolDetails,
};
use prost::Message;

use super::blobs::digest_of;
use super::client::Clients;
use super::limits::TRIVIAL_PROGRAM;
use super::runner::{run_rounds_async, Bounds, OpFailed, OpOutcome, RunTotals};
use super::stats::Samples;

const SHA256: i32 = digest_function::Value::Sha256 as i32;
/// Blobs per BatchUpdateBlobs of the untimed uploads (a Command and an Action are ~100 bytes).
const BLOBS_PER_UPLOAD: usize = 500;
/// Time one action may take, from ExecuteRequest to the done Operation, before it counts as
/// failed (a trivial action takes milliseconds; this only keeps a stuck one from hanging the
/// run).
const ACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable that makes each action unique.
pub const SALT_VARIABLE: &str = "KILN_LOAD_SALT";
/// The header that carries REAPI RequestMetadata.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";
const EXECUTE_RESPONSE_TYPE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";

/// Phase names of the breakdown (see the module docs), in report order.
pub const PHASES: [&str; 7] = [
    "1 sent→queued",
    "2 queued→worker",
    "3 worker fetch",
    "4 worker run",
    "5 worker upload",
    "6 worker total",
    "7 worker→client",
];

/// Makes and uploads unique trivial actions for one run.
pub struct TrivialActions {
    clients: Arc<Clients>,
    nonce: u64,
    counter: AtomicU64,
    empty_root: Digest,
}

/// One prepared (uploaded) action.
pub struct PreparedAction {
    digest: Digest,
    salt: String,
}

impl TrivialActions {
    /// Uploads the empty input root (the empty blob) once.
    pub async fn new(clients: Arc<Clients>, nonce: u64) -> anyhow::Result<Self> {
        let empty_root = digest_of(&[]);
        upload(&clients, vec![(empty_root.clone(), Vec::new())])
            .await
            .context("uploading the empty input root")?;
        Ok(Self {
            clients,
            nonce,
            counter: AtomicU64::new(0),
            empty_root,
        })
    }

    /// Builds `n` new actions and uploads their Commands and Actions (untimed, in batches).
    pub async fn prepare(&self, n: usize) -> anyhow::Result<Vec<PreparedAction>> {
        let mut blobs = Vec::with_capacity(2 * n);
        let mut actions = Vec::with_capacity(n);
        for _ in 0..n {
            let i = self.counter.fetch_add(1, Ordering::Relaxed);
            let salt = format!("{:016x}-{i}", self.nonce);
            let cmd = Command {
                arguments: vec![TRIVIAL_PROGRAM.into()],
                environment_variables: vec![EnvironmentVariable {
                    name: SALT_VARIABLE.into(),
                    value: salt.clone(),
                }],
                ..Default::default()
            }
            .encode_to_vec();
            let cmd_digest = digest_of(&cmd);
            let action = Action {
                command_digest: Some(cmd_digest.clone()),
                input_root_digest: Some(self.empty_root.clone()),
                ..Default::default()
            }
            .encode_to_vec();
            let digest = digest_of(&action);
            blobs.push((cmd_digest, cmd));
            blobs.push((digest.clone(), action));
            actions.push(PreparedAction { digest, salt });
        }
        upload(&self.clients, blobs)
            .await
            .context("untimed upload of Commands and Actions")?;
        Ok(actions)
    }
}

async fn upload(clients: &Clients, mut blobs: Vec<(Digest, Vec<u8>)>) -> anyhow::Result<()> {
    while !blobs.is_empty() {
        let rest = blobs.split_off(blobs.len().min(BLOBS_PER_UPLOAD));
        let n = blobs.len();
        let req = BatchUpdateBlobsRequest {
            instance_name: clients.instance.clone(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| batch_update_blobs_request::Request {
                    digest: Some(d),
                    data,
                    compressor: 0,
                })
                .collect(),
            digest_function: SHA256,
        };
        let resp = clients
            .cas()
            .batch_update_blobs(req)
            .await
            .context("BatchUpdateBlobs")?
            .into_inner();
        anyhow::ensure!(
            resp.responses.len() == n,
            "BatchUpdateBlobs answered {} of {n} blobs",
            resp.responses.len()
        );
        if let Some(bad) = resp
            .responses
            .iter()
            .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        {
            anyhow::bail!(
                "BatchUpdateBlobs refused {:?}: {:?}",
                bad.digest,
                bad.status
            );
        }
        blobs = rest;
    }
    Ok(())
}

fn failed(msg: String) -> anyhow::Error {
    OpFailed(msg).into()
}

fn wall_of(t: &Timestamp) -> SystemTime {
    UNIX_EPOCH
        + Duration::new(
            t.seconds.max(0) as u64,
            t.nanos.clamp(0, 999_999_999) as u32,
        )
}

/// `to - from`, zero when negative.
fn span(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

/// The breakdown of one action (module docs); phases whose timestamps are missing are left out.
fn phases(
    sent: SystemTime,
    received: SystemTime,
    m: &ExecutedActionMetadata,
) -> Vec<(&'static str, Duration)> {
    let ts = |t: &Option<Timestamp>| t.as_ref().map(wall_of);
    let mut out = Vec::new();
    let mut add = |i: usize, from: Option<SystemTime>, to: Option<SystemTime>| {
        if let (Some(f), Some(t)) = (from, to) {
            out.push((PHASES[i], span(f, t)));
        }
    };
    let queued = ts(&m.queued_timestamp);
    add(0, Some(sent), queued);
    add(1, queued, ts(&m.worker_start_timestamp));
    add(
        2,
        ts(&m.input_fetch_start_timestamp),
        ts(&m.input_fetch_completed_timestamp),
    );
    add(
        3,
        ts(&m.execution_start_timestamp),
        ts(&m.execution_completed_timestamp),
    );
    add(
        4,
        ts(&m.output_upload_start_timestamp),
        ts(&m.output_upload_completed_timestamp),
    );
    add(
        5,
        ts(&m.worker_start_timestamp),
        ts(&m.worker_completed_timestamp),
    );
    add(6, ts(&m.worker_completed_timestamp), Some(received));
    out
}

/// Checks a done Operation: an ExecuteResponse, status OK, exit code 0, not from the cache.
fn check_done(op: &Operation) -> Result<ExecuteResponse, String> {
    let any = match &op.result {
        Some(operation::Result::Response(any)) => any,
        Some(operation::Result::Error(e)) => {
            return Err(format!("operation error {}: {}", e.code, e.message))
        }
        None => return Err("done operation without a result".into()),
    };
    if any.type_url != EXECUTE_RESPONSE_TYPE {
        return Err(format!("done operation carries a {}", any.type_url));
    }
    let resp = ExecuteResponse::decode(&any.value[..])
        .map_err(|e| format!("ExecuteResponse does not decode: {e}"))?;
    if let Some(s) = resp.status.as_ref().filter(|s| s.code != 0) {
        return Err(format!("ExecuteResponse status {}: {}", s.code, s.message));
    }
    let Some(result) = resp.result.as_ref() else {
        return Err("ExecuteResponse without an ActionResult".into());
    };
    if result.exit_code != 0 {
        return Err(format!("the action exited with {}", result.exit_code));
    }
    if resp.cached_result {
        return Err("a unique action was answered from the cache".into());
    }
    Ok(resp)
}

/// Runs one action: Execute, read the stream to the done Operation, check it.
async fn execute_one(
    clients: &Clients,
    a: PreparedAction,
    phase_samples: &Mutex<BTreeMap<&'static str, Samples>>,
) -> anyhow::Result<OpOutcome> {
    let mut req = tonic::Request::new(ExecuteRequest {
        instance_name: clients.instance.clone(),
        skip_cache_lookup: false,
        action_digest: Some(a.digest.clone()),
        digest_function: SHA256,
        ..Default::default()
    });
    let meta = RequestMetadata {
        tool_details: Some(ToolDetails {
            tool_name: "kiln-load".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
        }),
        action_id: a.digest.hash.clone(),
        tool_invocation_id: a.salt.clone(),
        ..Default::default()
    };
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        tonic::metadata::MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    let mut exec = clients.execution();
    let sent = SystemTime::now();
    let run = async {
        let mut stream = exec
            .execute(req)
            .await
            .map_err(|s| failed(format!("Execute: {}: {}", s.code(), s.message())))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(op)) if op.done => return Ok(op),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(failed(
                        "the Execute stream ended before the operation was done".into(),
                    ))
                }
                Err(s) => {
                    return Err(failed(format!(
                        "Execute stream: {}: {}",
                        s.code(),
                        s.message()
                    )))
                }
            }
        }
    };
    let op = tokio::time::timeout(ACTION_TIMEOUT, run)
        .await
        .map_err(|_| failed(format!("not done within {ACTION_TIMEOUT:?}")))??;
    let received = SystemTime::now();
    let resp =
        check_done(&op).map_err(|e| failed(format!("action {}: {e}", &a.digest.hash[..12])))?;
    if let Some(m) = resp
        .result
        .as_ref()
        .and_then(|r| r.execution_metadata.as_ref())
    {
        let mut samples = phase_samples
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker panicked holding the phase samples"))?;
        for (phase, d) in phases(sent, received, m) {
            samples.entry(phase).or_default().record(d);
        }
    }
    Ok(OpOutcome {
        bytes: 0,
        items: 1,
        kind: "execute",
    })
}

/// Runs the workload at `concurrency` within `bounds`; the totals' per-kind latencies are the
/// phases of the breakdown.
pub async fn run(
    actions: Arc<TrivialActions>,
    concurrency: usize,
    bounds: Bounds,
) -> anyhow::Result<RunTotals> {
    let phase_samples: Arc<Mutex<BTreeMap<&'static str, Samples>>> = Arc::default();
    let prep = actions.clone();
    let clients = actions.clients.clone();
    let samples = phase_samples.clone();
    let mut totals = run_rounds_async(
        concurrency,
        bounds,
        move |n| {
            let prep = prep.clone();
            async move { prep.prepare(n).await }
        },
        move |a: PreparedAction| {
            let clients = clients.clone();
            let samples = samples.clone();
            async move { execute_one(&clients, a, &samples).await }
        },
    )
    .await?;
    let phases = std::mem::take(
        &mut *phase_samples
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker panicked holding the phase samples"))?,
    );
    totals.latencies_by_kind = phases;
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::ActionResult;

    fn done(resp: &ExecuteResponse) -> Operation {
        Operation {
            name: "op".into(),
            metadata: None,
            done: true,
            result: Some(operation::Result::Response(kiln_proto::pack_any(
                "build.bazel.remote.execution.v2.ExecuteResponse",
                resp,
            ))),
        }
    }

    fn ok_response() -> ExecuteResponse {
        ExecuteResponse {
            result: Some(ActionResult::default()),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_fresh_successful_result_passes() {
        assert!(check_done(&done(&ok_response())).is_ok());
        let mut cached = ok_response();
        cached.cached_result = true;
        assert!(check_done(&done(&cached)).unwrap_err().contains("cache"));
        let mut exited = ok_response();
        exited.result.as_mut().unwrap().exit_code = 1;
        assert!(check_done(&done(&exited))
            .unwrap_err()
            .contains("exited with 1"));
        let mut status = ok_response();
        status.status = Some(kiln_proto::rpc_status(
            tonic::Code::Internal,
            "boom",
            vec![],
        ));
        assert!(check_done(&done(&status)).unwrap_err().contains("boom"));
        let no_result = ExecuteResponse::default();
        assert!(check_done(&done(&no_result)).is_err());
        let mut err = done(&ok_response());
        err.result = Some(operation::Result::Error(kiln_proto::rpc_status(
            tonic::Code::Unavailable,
            "gone",
            vec![],
        )));
        assert!(check_done(&err).unwrap_err().contains("gone"));
    }

    #[test]
    fn phases_follow_the_timestamps_and_clamp_negative_spans() {
        let t = |ms: u64| {
            let d = Duration::from_millis(1_000_000 + ms);
            Timestamp {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }
        };
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(1_000_000 + ms);
        let m = ExecutedActionMetadata {
            queued_timestamp: Some(t(0)),
            worker_start_timestamp: Some(t(3)),
            input_fetch_start_timestamp: Some(t(3)),
            input_fetch_completed_timestamp: Some(t(4)),
            execution_start_timestamp: Some(t(4)),
            execution_completed_timestamp: Some(t(6)),
            output_upload_start_timestamp: Some(t(6)),
            output_upload_completed_timestamp: Some(t(7)),
            worker_completed_timestamp: Some(t(8)),
            ..Default::default()
        };
        // Sent "after" the truncated queued timestamp: clamped to zero.
        let p: BTreeMap<_, _> = phases(at(1), at(10), &m).into_iter().collect();
        let ms = |name: &str| p[name].as_millis();
        assert_eq!(ms("1 sent→queued"), 0);
        assert_eq!(ms("2 queued→worker"), 3);
        assert_eq!(ms("3 worker fetch"), 1);
        assert_eq!(ms("4 worker run"), 2);
        assert_eq!(ms("5 worker upload"), 1);
        assert_eq!(ms("6 worker total"), 5);
        assert_eq!(ms("7 worker→client"), 2);
    }
}
