//! Remote Workers API v1test2 Bots: bot sessions and leases.
//!
//! Conventions of independent bots (BuildGrid's) are followed: a lease's payload is the Action
//! digest packed in an `Any` (an `Action` payload from older bots is accepted in results too),
//! the result comes back in `Lease.result` as an `ExecuteResponse` or an `ActionResult`, a bot
//! id is stable so a restarted bot replaces its stale session at once, and `BOT_TERMINATING`
//! ends the session and requeues its work.
//!
//! A bot with nothing to do long-polls: UpdateBotSession waits (bounded by the call's deadline)
//! until work it can run is queued, then claims it with an `Assign` proposal; the first valid
//! claim wins in the state machine, so two nodes never hand one operation to two bots. A bot
//! that reports a result and has nothing else to run claims its next operation in the same
//! Raft entry as the result.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_actors::lease::LeaseSupervisorMsg;
use kiln_proto::reapi::{ActionResult, ExecuteResponse};
use kiln_proto::remoteworkers::{BotSession, BotStatus, Bots, CreateBotSessionRequest, Lease, LeaseState, UpdateBotSessionRequest};
use kiln_raft::command::{Command, CommandResult};
use kiln_raft::scheduler::{Operation, Stage};
use prost::Message;
use tonic::{Request, Response, Status};

use super::observe;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::scheduler::{timestamp, ACTION_RESULT_TYPE, EXECUTE_RESPONSE};
use crate::server::NodeState;

const DIGEST_TYPE: &str = "build.bazel.remote.execution.v2.Digest";
const ACTION_TYPE: &str = "build.bazel.remote.execution.v2.Action";
/// Largest Action sent as a lease's payload; a larger one goes by digest.
const MAX_INLINE_ACTION: i64 = 64 << 10;
/// Longest a bot with no work waits in one UpdateBotSession.
const MAX_LONG_POLL: Duration = Duration::from_secs(20);
/// Time kept in hand before the client's deadline, to answer before it expires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

pub struct BotsService {
    state: Arc<NodeState>,
    /// Operations a bot on this node is proposing `Assign` for: the other idle bots of this
    /// node try other work, so one queued action costs one proposal, not one per idle bot.
    claiming: Arc<Mutex<HashSet<String>>>,
}

/// An operation marked as being claimed by one of this node's bots, until dropped.
struct Claim {
    set: Arc<Mutex<HashSet<String>>>,
    op: String,
}

impl Claim {
    fn take(set: &Arc<Mutex<HashSet<String>>>, op: &str) -> Option<Self> {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(op.to_string()).then(|| Self { set: set.clone(), op: op.to_string() })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.op);
    }
}

/// Whether `o` is executing under the bot session `session`.
fn held_by(o: &Operation, session: &str) -> bool {
    o.stage == Stage::Executing && o.bot_session.as_deref() == Some(session)
}

/// Reorders the candidates of the node at `index` among `members` nodes: the first
/// `same_priority` (the oldest operations of the first priority) are rotated so that each node's
/// bots start at a different place and bots on different nodes claim different work instead of
/// racing for the first one (a lost race is a whole Raft round for nothing).
fn spread(candidates: &mut [String], same_priority: usize, index: usize, members: usize) {
    let n = same_priority.min(candidates.len());
    if n > 1 && members > 1 {
        candidates[..n].rotate_left(n * index.min(members - 1) / members);
    }
}

/// How soon a bot that left work to another bot's claim looks again (the claim may fail).
const CLAIM_RECHECK: Duration = Duration::from_millis(100);

fn platform_of(s: &BotSession) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    if let Some(w) = &s.worker {
        p.extend(w.properties.iter().map(|x| (x.key.clone(), x.value.clone())));
        for d in &w.devices {
            p.extend(d.properties.iter().map(|x| (x.key.clone(), x.value.clone())));
        }
    }
    p.sort();
    p.dedup();
    p
}

fn op_of_lease(lease_id: &str) -> &str {
    lease_id.split('#').next().unwrap_or(lease_id)
}

/// How long this call may wait for work: the client's gRPC deadline less a margin, at most
/// [`MAX_LONG_POLL`].
fn long_poll_budget<T>(req: &Request<T>) -> Duration {
    let header = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
    header.map(|d| d.saturating_sub(DEADLINE_MARGIN)).unwrap_or(MAX_LONG_POLL).min(MAX_LONG_POLL)
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Reads the bot's result: an ExecuteResponse, or a bare ActionResult; a lease status that is
/// not OK becomes the response's status.
fn response_of(lease: &Lease) -> ExecuteResponse {
    let mut resp = match &lease.result {
        Some(any) if any.type_url.strip_prefix("type.googleapis.com/") == Some(EXECUTE_RESPONSE) => {
            ExecuteResponse::decode(&any.value[..]).unwrap_or_else(|e| bad_result(format!("lease result does not decode: {e}")))
        }
        Some(any) if any.type_url.strip_prefix("type.googleapis.com/") == Some(ACTION_RESULT_TYPE) => match ActionResult::decode(&any.value[..]) {
            Ok(r) => ExecuteResponse { result: Some(r), ..Default::default() },
            Err(e) => bad_result(format!("lease result does not decode: {e}")),
        },
        Some(any) => bad_result(format!("lease result has unsupported type {:?}", any.type_url)),
        None => ExecuteResponse::default(),
    };
    if let Some(st) = &lease.status {
        if st.code != 0 {
            if resp.message.is_empty() {
                resp.message = st.message.clone();
            }
            resp.status = Some(kiln_proto::convert::status_from_google(st.clone()));
        }
    }
    if resp.result.is_none() && resp.status.as_ref().is_none_or(|s| s.code == 0) {
        resp = bad_result("the bot completed the lease without a result".into());
    }
    resp
}

fn bad_result(msg: String) -> ExecuteResponse {
    ExecuteResponse { status: Some(kiln_proto::rpc_status(tonic::Code::Internal, msg, vec![])), ..Default::default() }
}

impl BotsService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state, claiming: Default::default() }
    }

    fn expire_time(&self) -> prost_types::Timestamp {
        let ms = kiln_actors::context::now_ms() + self.state.scheduler.timeouts.bot_silence.as_millis() as u64;
        kiln_proto::convert::timestamp_to_prost(timestamp(ms))
    }

    async fn create(&self, req: CreateBotSessionRequest) -> Result<BotSession> {
        let mut s = req.bot_session.ok_or_else(|| KilnError::invalid("bot_session is missing"))?;
        if s.bot_id.is_empty() {
            return Err(KilnError::invalid("bot_session.bot_id is empty: a bot needs a stable id"));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        s.name = if req.parent.is_empty() { id } else { format!("{}/{id}", req.parent) };
        let cmd = Command::CreateBotSession {
            name: s.name.clone(),
            bot_id: s.bot_id.clone(),
            platform: platform_of(&s),
            now_ms: kiln_actors::context::now_ms(),
        };
        self.state.scheduler.propose(cmd).await?;
        let _ = self.state.scheduler.leases.cast(LeaseSupervisorMsg::Seen(s.name.clone()));
        tracing::info!(session = %s.name, bot = %s.bot_id, "bot session created");
        s.leases.clear();
        s.expire_time = Some(self.expire_time());
        Ok(s)
    }

    /// Stores the bot's result: Action Cache first (so a client that sees the operation done
    /// finds the cache entry too), then `Complete`. With `next`, the session's claim of its
    /// next operation goes in the same Raft entry, right after the result: one proposal
    /// instead of two per action. Returns the lease of the claimed operation if the claim won.
    async fn complete(&self, op: &Operation, lease: &Lease, next: Option<(&str, Claim)>) -> Result<Option<Lease>> {
        let mut resp = response_of(lease);
        if let Some(r) = resp.result.as_mut() {
            let m = r.execution_metadata.get_or_insert_with(Default::default);
            m.queued_timestamp = Some(timestamp(op.queued_at_ms));
        }
        let ok = resp.status.as_ref().is_none_or(|s| s.code == 0);
        if ok && !op.do_not_cache {
            if let Some(result) = resp.result.clone().filter(|r| r.exit_code == 0) {
                let f = DigestFunction::from_request(op.action.digest_function)?;
                let d = BlobDigest::parse(f, &op.action.hash, op.action.size)?;
                let started = std::time::Instant::now();
                let written = self.state.storage.ac_update(&op.action.instance_name, &d, result).await;
                metrics::histogram!(crate::metrics::AC_RESULT_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
                if let Err(e) = written {
                    // The build still gets its result; only the cache entry is lost.
                    tracing::warn!(operation = %op.name, error = %e, "writing the action cache failed");
                }
            }
        }
        let now_ms = kiln_actors::context::now_ms();
        let cmd = Command::Complete { op: op.name.clone(), response: resp.encode_to_vec(), now_ms };
        let (done, claimed) = match &next {
            None => (self.state.scheduler.propose(cmd).await?, None),
            Some((session, claim)) => {
                let assign = Command::Assign { session: session.to_string(), op: claim.op.clone(), now_ms };
                let mut results = self.state.scheduler.propose_together(vec![cmd, assign]).await?.into_iter();
                let done = results.next().unwrap_or(CommandResult::None);
                let won = self.claim_won(results.next(), &claim.op, session);
                (done, won.then_some((*session, claim.op.as_str())))
            }
        };
        // Logged once: by the node whose Complete took effect.
        if let (Some(logger), CommandResult::Applied(true)) = (&self.state.completed_actions, done) {
            let digest = kiln_proto::reapi::Digest { hash: op.action.hash.clone(), size_bytes: op.action.size };
            logger.log(&op.action.instance_name, digest, resp);
        }
        match claimed {
            Some((session, op)) => Ok(Some(self.handed_out(op, session).await?)),
            None => Ok(None),
        }
    }

    /// Whether `session` holds `op` after its `Assign` was answered `result`.
    fn claim_won(&self, result: Option<CommandResult>, op: &str, session: &str) -> bool {
        result == Some(CommandResult::Applied(true))
            // A proposal retried after its answer was lost reads as a lost claim although its
            // first attempt won: the state says whose it is.
            || self.state.scheduler.shared.read(|st| st.sched.ops.get(op).is_some_and(|o| held_by(o, session)))
    }

    /// The lease of `op`, just claimed by `session`.
    async fn handed_out(&self, op: &str, session: &str) -> Result<Lease> {
        let o = self.state.scheduler.shared.operation(op).ok_or_else(|| KilnError::Internal("assigned operation vanished".into()))?;
        tracing::info!(operation = %op, session, "lease handed out");
        Ok(self.pending_lease(&o).await)
    }

    async fn update(&self, budget: Duration, req: UpdateBotSessionRequest) -> Result<BotSession> {
        let mut s = req.bot_session.ok_or_else(|| KilnError::invalid("bot_session is missing"))?;
        let name = if req.name.is_empty() { s.name.clone() } else { req.name.clone() };
        s.name = name.clone();
        let sched = self.state.scheduler.clone();
        let known = sched.shared.read(|st| st.sched.bots.get(&name).map(|b| b.platform.clone()));
        let terminating = s.status == BotStatus::BotTerminating as i32;
        // Results first, even from a session the cluster forgot: a finished action is not redone.
        let mut keep = Vec::new();
        let mut finished = Vec::new();
        for lease in std::mem::take(&mut s.leases) {
            let op = sched.shared.operation(op_of_lease(&lease.id));
            match LeaseState::try_from(lease.state).unwrap_or(LeaseState::Unspecified) {
                LeaseState::Completed => {
                    // Only the current attempt's result counts: a lease that was requeued
                    // meanwhile (its bot presumed lost) may be running again elsewhere.
                    if let Some(op) = op.filter(|o| !o.is_done() && o.lease_id() == lease.id) {
                        finished.push((op, lease));
                    }
                }
                LeaseState::Cancelled => {}
                _ => {
                    let mine = op.as_ref().is_some_and(|o| o.stage == Stage::Executing && o.bot_session.as_deref() == Some(name.as_str()));
                    let mut l = lease;
                    if !mine {
                        // Cancelled, finished elsewhere, or requeued after this bot was presumed lost.
                        l.state = LeaseState::Cancelled as i32;
                    }
                    keep.push(l);
                }
            }
        }
        // A bot left with nothing to run claims its next operation along with its result.
        let wants_work = finished.len() == 1 && keep.is_empty() && !terminating;
        for (op, lease) in finished {
            let next = match (&known, wants_work) {
                (Some(platform), true) => self.candidates(platform).into_iter().find_map(|c| Claim::take(&self.claiming, &c)),
                _ => None,
            };
            if let Some(claimed) = self.complete(&op, &lease, next.map(|c| (name.as_str(), c))).await? {
                keep.push(claimed);
            }
        }
        let Some(platform) = known else {
            return Err(KilnError::NotFound(format!("bot session {name:?} is unknown (expired or replaced): create a new one")));
        };
        let _ = sched.leases.cast(LeaseSupervisorMsg::Seen(name.clone()));
        if terminating {
            let _ = sched.leases.cast(LeaseSupervisorMsg::Forget(name.clone()));
            let cmd = Command::BotGone {
                session: name.clone(),
                reason: "the bot is terminating".into(),
                max_attempts: u32::MAX,
                now_ms: kiln_actors::context::now_ms(),
            };
            sched.propose(cmd).await?;
            s.leases = keep.into_iter().map(|mut l| { l.state = LeaseState::Cancelled as i32; l }).collect();
            return Ok(s);
        }
        // A bot that runs nothing while the cluster says it holds a lease never got that lease
        // (an answer lost on the way): it gets it again.
        if keep.is_empty() {
            let held = sched.shared.read(|st| {
                let op = st.sched.bots.get(&name)?.lease.as_ref()?;
                st.sched.ops.get(op).filter(|o| held_by(o, &name)).cloned()
            });
            if let Some(o) = held {
                tracing::warn!(operation = %o.name, session = %name, "the bot does not run the lease it holds: handing it out again");
                keep.push(self.pending_lease(&o).await);
            }
        }
        // Long-poll only a bot with nothing to hear back: a lease being cancelled must reach it
        // now, not when new work arrives.
        let busy = !keep.is_empty() || sched.shared.read(|st| st.sched.bots.get(&name).is_some_and(|b| b.lease.is_some()));
        if !busy {
            if let Some(lease) = self.wait_for_work(&name, &platform, budget).await? {
                keep.push(lease);
            }
        }
        s.leases = keep;
        s.expire_time = Some(self.expire_time());
        Ok(s)
    }

    /// The lease that hands `o` to a bot. Its payload is the Action itself, as stored, when this
    /// node can read it (the Remote Workers convention BuildGrid and its bots follow): the bot
    /// starts on the Command and the input tree without first asking for the Action. Otherwise
    /// it is the Action's digest, which Kiln's worker fetches.
    async fn pending_lease(&self, o: &Operation) -> Lease {
        let digest = kiln_proto::reapi::Digest { hash: o.action.hash.clone(), size_bytes: o.action.size };
        let stored = match DigestFunction::from_request(o.action.digest_function) {
            // Kiln's worker hashes with SHA-256 only; it names an Action sent as bytes by their hash.
            Ok(DigestFunction::Sha256) if o.action.size <= MAX_INLINE_ACTION => match BlobDigest::from_proto_opt(DigestFunction::Sha256, Some(&digest)) {
                Ok(d) => self.state.storage.read_small(&d).await.ok().flatten(),
                Err(_) => None,
            },
            _ => None,
        };
        let payload = match stored {
            Some(bytes) => kiln_proto::protobuf::Any { type_url: kiln_proto::type_url(ACTION_TYPE), value: bytes.to_vec() },
            None => kiln_proto::pack_any(DIGEST_TYPE, &digest),
        };
        Lease { id: o.lease_id(), payload: Some(kiln_proto::convert::any_to_prost(payload)), state: LeaseState::Pending as i32, ..Default::default() }
    }

    /// Queued operations a bot of `platform` may claim, in the order this node's bots try them:
    /// the oldest first, spread over the nodes (see [`spread`]).
    fn candidates(&self, platform: &[(String, String)]) -> Vec<String> {
        let (mut candidates, same_priority) = self.state.scheduler.shared.read(|st| {
            let mut head = None;
            let mut same = 0;
            let names: Vec<String> = st
                .sched
                .queued()
                .filter(|o| kiln_raft::scheduler::platform_matches(&o.platform, platform))
                .take(16)
                .inspect(|o| {
                    if *head.get_or_insert(o.priority) == o.priority {
                        same += 1;
                    }
                })
                .map(|o| o.name.clone())
                .collect();
            (names, same)
        });
        let (index, members) = self.member_position();
        spread(&mut candidates, same_priority, index, members);
        candidates
    }

    /// This node's position among the members (by id) and their number.
    fn member_position(&self) -> (usize, usize) {
        let c = &self.state.scheduler.consensus;
        let membership = c.raft.metrics().borrow().membership_config.clone();
        let ids: Vec<u64> = membership.membership().nodes().map(|(id, _)| *id).collect();
        (ids.iter().position(|id| *id == c.node_id).unwrap_or(0), ids.len())
    }

    /// Long-polls for an operation this bot can run and claims it.
    async fn wait_for_work(&self, session: &str, platform: &[(String, String)], budget: Duration) -> Result<Option<Lease>> {
        let sched = &self.state.scheduler;
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let notified = sched.shared.work_available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let candidates = self.candidates(platform);
            let mut left_to_others = false;
            let mut tried = 0;
            for op in candidates {
                if tried == 4 {
                    break;
                }
                let Some(_claim) = Claim::take(&self.claiming, &op) else {
                    left_to_others = true;
                    continue;
                };
                tried += 1;
                let cmd = Command::Assign { session: session.to_string(), op: op.clone(), now_ms: kiln_actors::context::now_ms() };
                let result = sched.propose(cmd).await?;
                if self.claim_won(Some(result), &op, session) {
                    return Ok(Some(self.handed_out(&op, session).await?));
                }
            }
            let wake = if left_to_others { deadline.min(tokio::time::Instant::now() + CLAIM_RECHECK) } else { deadline };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {
                    if wake == deadline {
                        return Ok(None);
                    }
                }
            }
            // The session may have been replaced meanwhile.
            if !sched.shared.read(|st| st.sched.bots.contains_key(session)) {
                return Ok(None);
            }
        }
    }
}

#[tonic::async_trait]
impl Bots for BotsService {
    #[tracing::instrument(skip_all, fields(parent = %request.get_ref().parent))]
    async fn create_bot_session(&self, request: Request<CreateBotSessionRequest>) -> Result<Response<BotSession>, Status> {
        let start = Instant::now();
        let r = self.create(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("Bots.CreateBotSession", start, r)
    }

    #[tracing::instrument(skip_all, fields(session = %request.get_ref().name))]
    async fn update_bot_session(&self, request: Request<UpdateBotSessionRequest>) -> Result<Response<BotSession>, Status> {
        let start = Instant::now();
        // A long poll must end well within the bot silence limit: the session is seen only when
        // it calls, and a session that is seen too late is dropped and its lease requeued.
        let budget = long_poll_budget(&request).min(self.state.scheduler.timeouts.bot_silence / 2);
        let r = self.update(budget, request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("Bots.UpdateBotSession", start, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_start_at_different_operations_of_the_first_priority_only() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = names(&["a", "b", "c", "d", "e", "f", "low"]);
        let firsts: Vec<String> = (0..3)
            .map(|i| {
                let mut c = all.clone();
                spread(&mut c, 6, i, 3);
                assert_eq!(c[6], "low", "a lower priority stays behind");
                c[0].clone()
            })
            .collect();
        assert_eq!(firsts, names(&["a", "c", "e"]));
        let mut c = all.clone();
        spread(&mut c, 6, 0, 1);
        assert_eq!(c, all, "a lone node keeps the queue order");
        let mut one = names(&["a"]);
        spread(&mut one, 1, 2, 3);
        assert_eq!(one, names(&["a"]));
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn lease_results_are_read_in_both_shapes() {
        let ar = ActionResult { exit_code: 3, ..Default::default() };
        let lease = |any| Lease { result: Some(kiln_proto::convert::any_to_prost(any)), ..Default::default() };
        let r = response_of(&lease(kiln_proto::pack_any(ACTION_RESULT_TYPE, &ar)));
        assert_eq!(r.result.unwrap().exit_code, 3);
        let er = ExecuteResponse { result: Some(ar), ..Default::default() };
        let r = response_of(&lease(kiln_proto::pack_any(EXECUTE_RESPONSE, &er)));
        assert_eq!(r.result.unwrap().exit_code, 3);
        let r = response_of(&Lease::default());
        assert_eq!(r.status.unwrap().code, tonic::Code::Internal as i32);
    }
}
