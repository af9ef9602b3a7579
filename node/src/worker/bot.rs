//! The bot loop of `kiln worker`: one Remote Workers API bot session per concurrency slot.
//!
//! Each slot creates a session with a stable bot id (`<name>-<slot>`: a restarted worker
//! replaces its stale sessions at once, and their actions are requeued instead of waiting for
//! a timeout), long-polls UpdateBotSession for a lease, runs it with the [`Executor`], sends
//! keep-alives while it runs (and learns of cancellation from them), and reports the
//! `ExecuteResponse` as the lease's result. Endpoints are tried in turn: a node that goes away
//! only costs a reconnect, and a lease in progress is reported on the next node.

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::reapi::{Action, Digest, ExecuteResponse};
use kiln_proto::remoteworkers::{
    bots_client::BotsClient, worker, BotSession, BotStatus, CreateBotSessionRequest, Lease, LeaseState,
    UpdateBotSessionRequest, Worker,
};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{Executor, ExecutorConfig};

/// Time between keep-alives while an action runs: well under the server's bot silence limit.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Deadline of a long-polling UpdateBotSession.
const LONG_POLL: Duration = Duration::from_secs(25);
/// Deadline of other calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub const LEASES_RUN: &str = "kiln_worker_leases_total";

/// What a worker is told on the command line (or by `kiln dev`).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// gRPC endpoints of cluster nodes, tried in turn (`http://host:port` or `grpc://host:port`).
    pub endpoints: Vec<String>,
    pub concurrency: usize,
    /// Bot sessions beyond `concurrency`: each may hold a lease while every slot is busy, so
    /// that a slot that frees up starts its next action at once instead of first reporting the
    /// result and waiting for the next lease. The actions themselves never exceed `concurrency`.
    pub prefetch: usize,
    pub work_dir: std::path::PathBuf,
    pub platform: Vec<(String, String)>,
    /// Stable name of this worker; bot ids are `<name>-<slot>`.
    pub name: String,
    /// Instance name the bot sessions are created under and the CAS is read through.
    pub instance_name: String,
    pub cache_max_bytes: u64,
}

fn channel_for(endpoint: &str) -> anyhow::Result<Channel> {
    let url = match endpoint.strip_prefix("grpc://") {
        Some(rest) => format!("http://{rest}"),
        None if endpoint.contains("://") => endpoint.to_string(),
        None => format!("http://{endpoint}"),
    };
    Ok(tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(1 << 20)
        .connect_lazy())
}

/// Runs the worker until `shutdown` turns true; then ends its sessions (BOT_TERMINATING).
pub async fn run(opts: WorkerOptions, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    anyhow::ensure!(!opts.endpoints.is_empty(), "the worker needs at least one endpoint");
    let executor = Arc::new(Executor::new(ExecutorConfig {
        work_dir: opts.work_dir.clone(),
        cache_max_bytes: opts.cache_max_bytes,
        worker_name: opts.name.clone(),
    })?);
    let channels: Vec<Channel> = opts.endpoints.iter().map(|e| channel_for(e)).collect::<anyhow::Result<_>>()?;
    let opts = Arc::new(opts);
    tracing::info!(endpoints = ?opts.endpoints, concurrency = opts.concurrency, prefetch = opts.prefetch, work_dir = %opts.work_dir.display(), "worker starting");
    let run_slots = Arc::new(tokio::sync::Semaphore::new(opts.concurrency));
    let mut slots = Vec::new();
    for slot in 0..opts.concurrency + opts.prefetch {
        let s = Slot {
            bot_id: format!("{}-{slot}", opts.name),
            opts: opts.clone(),
            channels: channels.clone(),
            endpoint: slot % channels.len(),
            executor: executor.clone(),
            run_slots: run_slots.clone(),
            shutdown: shutdown.clone(),
            running: None,
            finished: None,
            last_finished: None,
            version: String::new(),
            keepalive: KEEPALIVE,
        };
        slots.push(tokio::spawn(s.run()));
    }
    for s in slots {
        let _ = s.await;
    }
    Ok(())
}

struct Running {
    lease_id: String,
    task: JoinHandle<ExecuteResponse>,
    cancel: CancellationToken,
}

struct Slot {
    bot_id: String,
    opts: Arc<WorkerOptions>,
    channels: Vec<Channel>,
    endpoint: usize,
    executor: Arc<Executor>,
    /// `concurrency` permits: a lease's action runs only while it holds one.
    run_slots: Arc<tokio::sync::Semaphore>,
    shutdown: watch::Receiver<bool>,
    running: Option<Running>,
    /// A result not yet accepted by a node.
    finished: Option<(String, ExecuteResponse)>,
    /// The lease whose result was accepted last: a server that still lists it is not asking
    /// for it to run again.
    last_finished: Option<String>,
    /// The session version the server gave last, sent back with every update (BuildGrid
    /// long-polls only a bot that returns the version it was given).
    version: String,
    /// Time between keep-alives while an action runs: [`KEEPALIVE`], or less when the server's
    /// `expire_time` says the session lapses sooner.
    keepalive: Duration,
}

/// Half the time until `expire_time`, between 250 ms and [`KEEPALIVE`]; [`KEEPALIVE`] without one.
fn keepalive_for(expire_time: Option<&prost_types::Timestamp>) -> Duration {
    let Some(t) = expire_time else { return KEEPALIVE };
    let expire = std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32);
    let left = expire.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    (left / 2).clamp(Duration::from_millis(250), KEEPALIVE)
}

enum SessionEnd {
    Shutdown,
    /// Reconnect (to the next endpoint) and open a new session.
    Reconnect,
}

impl Slot {
    fn worker(&self) -> Worker {
        Worker {
            properties: self.opts.platform.iter().map(|(k, v)| worker::Property { key: k.clone(), value: v.clone() }).collect(),
            ..Default::default()
        }
    }

    fn session(&self, name: &str, status: BotStatus) -> BotSession {
        let mut leases = Vec::new();
        if let Some(r) = &self.running {
            leases.push(Lease { id: r.lease_id.clone(), state: LeaseState::Active as i32, ..Default::default() });
        }
        if let Some((id, resp)) = &self.finished {
            // The result as the Remote Workers API's REAPI convention has it: the ActionResult,
            // with the outcome in the lease's status (BuildGrid reads nothing else).
            leases.push(Lease {
                id: id.clone(),
                state: LeaseState::Completed as i32,
                result: resp
                    .result
                    .as_ref()
                    .map(|r| kiln_proto::convert::any_to_prost(kiln_proto::pack_any(crate::scheduler::ACTION_RESULT_TYPE, r))),
                status: resp.status.clone().map(kiln_proto::convert::status_to_google),
                ..Default::default()
            });
        }
        BotSession {
            name: name.to_string(),
            bot_id: self.bot_id.clone(),
            status: status as i32,
            worker: Some(self.worker()),
            leases,
            version: self.version.clone(),
            ..Default::default()
        }
    }

    /// Shutdown was asked for, or whoever could ask is gone.
    fn stopping(&self) -> bool {
        *self.shutdown.borrow() || self.shutdown.has_changed().is_err()
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopping() {
                return;
            }
            let channel = self.channels[self.endpoint].clone();
            match self.session_loop(channel).await {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Reconnect) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(bot = %self.bot_id, endpoint = %self.opts.endpoints[self.endpoint], error = %e, "bot session failed; trying the next endpoint");
                    self.endpoint = (self.endpoint + 1) % self.channels.len();
                    let mut sd = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = sd.wait_for(|s| *s) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn session_loop(&mut self, channel: Channel) -> Result<SessionEnd, tonic::Status> {
        let mut bots = BotsClient::new(channel.clone());
        let mut req = tonic::Request::new(CreateBotSessionRequest {
            parent: self.opts.instance_name.clone(),
            bot_session: Some(self.session("", BotStatus::Ok)),
        });
        req.set_timeout(CALL_TIMEOUT);
        let created = bots.create_bot_session(req).await?.into_inner();
        let name = created.name.clone();
        tracing::info!(bot = %self.bot_id, session = %name, "bot session open");
        // A server may hand out work in its answer already.
        self.version = created.version.clone();
        self.keepalive = keepalive_for(created.expire_time.as_ref());
        self.take_leases(&channel, created.leases);
        loop {
            let terminating = self.stopping();
            if terminating {
                if let Some(r) = self.running.take() {
                    r.cancel.cancel();
                    let _ = r.task.await;
                }
            }
            let idle = self.running.is_none() && self.finished.is_none();
            let status = if terminating { BotStatus::BotTerminating } else { BotStatus::Ok };
            let mut req = tonic::Request::new(UpdateBotSessionRequest {
                name: name.clone(),
                bot_session: Some(self.session(&name, status)),
                update_mask: None,
            });
            req.set_timeout(if idle { LONG_POLL } else { CALL_TIMEOUT });
            let resp = match bots.update_bot_session(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::info!(bot = %self.bot_id, "session unknown to the server; opening a new one");
                    return Ok(SessionEnd::Reconnect);
                }
                Err(s) if s.code() == tonic::Code::DeadlineExceeded && idle => continue,
                Err(s) => return Err(s),
            };
            // The result we sent was accepted.
            if let Some((id, _)) = self.finished.take() {
                self.last_finished = Some(id);
            }
            if terminating {
                return Ok(SessionEnd::Shutdown);
            }
            self.version = resp.version.clone();
            self.keepalive = keepalive_for(resp.expire_time.as_ref());
            self.take_leases(&channel, resp.leases);
            self.wait_for_progress().await;
        }
    }

    /// Acts on the leases a server sent: starts a new one when idle (PENDING, or ACTIVE as
    /// BuildGrid hands them out), cancels the running one when told to.
    fn take_leases(&mut self, channel: &Channel, leases: Vec<Lease>) {
        for lease in leases {
            let state = LeaseState::try_from(lease.state).unwrap_or(LeaseState::Unspecified);
            match (&self.running, state) {
                (Some(r), LeaseState::Cancelled) if r.lease_id == lease.id => {
                    tracing::info!(lease = %lease.id, "lease cancelled by the server");
                    r.cancel.cancel();
                }
                (None, LeaseState::Pending | LeaseState::Active)
                    if self.last_finished.as_deref() != Some(lease.id.as_str())
                        && self.finished.as_ref().is_none_or(|(id, _)| *id != lease.id) =>
                {
                    self.start(channel, lease)
                }
                _ => {}
            }
        }
    }

    fn start(&mut self, channel: &Channel, lease: Lease) {
        // The payload is the Action's digest (Kiln) or the Action itself (BuildGrid), which then
        // runs as sent.
        let (digest, action) = match lease.payload.as_ref() {
            // Addressed by the digest of these bytes, used only to name it in logs.
            Some(p) if p.type_url.ends_with("/build.bazel.remote.execution.v2.Action") => match Action::decode(&p.value[..]) {
                Ok(a) => (Some(crate::digest::DigestFunction::Sha256.digest_of(&p.value).to_proto()), Some(a)),
                Err(_) => (None, None),
            },
            Some(p) => (Digest::decode(&p.value[..]).ok(), None),
            None => (None, None),
        };
        let cancel = CancellationToken::new();
        let (executor, channel, instance, token) =
            (self.executor.clone(), channel.clone(), self.opts.instance_name.clone(), cancel.clone());
        let run_slots = self.run_slots.clone();
        let operation = lease.id.split('#').next().unwrap_or(&lease.id).to_string();
        let task = tokio::spawn(async move {
            // A prefetched lease waits here for a slot (keep-alives go on meanwhile).
            let _slot = tokio::select! {
                p = run_slots.acquire_owned() => p.ok(), // never closed
                _ = token.cancelled() => {
                    return ExecuteResponse {
                        status: Some(kiln_proto::rpc_status(tonic::Code::Cancelled, "cancelled before it started", vec![])),
                        ..Default::default()
                    };
                }
            };
            match digest {
                Some(d) => {
                    let logs = super::livelog::LiveTarget { channel: channel.clone(), operation };
                    executor.execute_live(channel, &instance, d, action, token, Some(logs)).await
                }
                None => ExecuteResponse {
                    status: Some(kiln_proto::rpc_status(tonic::Code::InvalidArgument, "lease payload is not an Action digest", vec![])),
                    ..Default::default()
                },
            }
        });
        metrics::counter!(LEASES_RUN).increment(1);
        tracing::info!(bot = %self.bot_id, lease = %lease.id, "running lease");
        self.running = Some(Running { lease_id: lease.id, task, cancel });
    }

    /// Waits until there is something to tell the server: the running action finished, a
    /// keep-alive is due, or shutdown began. Returns at once when idle (the next call
    /// long-polls).
    async fn wait_for_progress(&mut self) {
        let Some(r) = self.running.as_mut() else { return };
        let mut sd = self.shutdown.clone();
        tokio::select! {
            res = &mut r.task => {
                let resp = res.unwrap_or_else(|e| ExecuteResponse {
                    status: Some(kiln_proto::rpc_status(tonic::Code::Internal, format!("action task failed: {e}"), vec![])),
                    ..Default::default()
                });
                let r = self.running.take().expect("running");
                self.finished = Some((r.lease_id, resp));
            }
            _ = tokio::time::sleep(self.keepalive) => {}
            _ = sd.wait_for(|s| *s) => {}
        }
        if self.stopping() {
            // Let the next update say BOT_TERMINATING at once.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_ms(ms: i64) -> prost_types::Timestamp {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap() + Duration::from_millis(ms.max(0) as u64);
        prost_types::Timestamp { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 }
    }

    #[test]
    fn keepalives_come_well_before_the_session_expires() {
        assert_eq!(keepalive_for(None), KEEPALIVE);
        assert_eq!(keepalive_for(Some(&in_ms(60_000))), KEEPALIVE);
        let k = keepalive_for(Some(&in_ms(1_000)));
        assert!(k >= Duration::from_millis(400) && k <= Duration::from_millis(500), "{k:?}");
        assert_eq!(keepalive_for(Some(&in_ms(0))), Duration::from_millis(250));
        assert_eq!(keepalive_for(Some(&prost_types::Timestamp { seconds: -5, nanos: -1 })), Duration::from_millis(250));
    }
}
