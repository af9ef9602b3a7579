//! `JobActor`: one per unfinished operation, holding its timers; `JobSupervisor` spawns them as
//! operations appear in the replicated state and restarts any that crashes.
//!
//! Every node runs them, but only the leader's propose: a new leader therefore already has an
//! actor for every unfinished operation, with nothing to rebuild but its timers, which are
//! derived from the operation's replicated timestamps, not from the actor's own memory.

use std::collections::HashMap;

use kiln_raft::command::Command;
use kiln_raft::scheduler::{code, platform_matches, Operation, Stage};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::context::{now_ms, ActorContext};

pub const JOB_RESTARTS: &str = "kiln_job_actor_restarts_total";
pub const JOB_TIMEOUTS: &str = "kiln_job_timeouts_total";

pub enum JobMsg {
    Tick,
    /// The operation changed in the replicated state.
    Changed,
    /// A proposal this actor made finished.
    ProposalDone,
    /// Fault injection: the actor panics (tests show the supervisor recovers the job).
    Crash,
}

pub struct JobActor;

pub struct JobState {
    op: String,
    ctx: ActorContext,
    proposing: bool,
}

/// What a job's timers say should happen now, if anything.
fn due(op: &Operation, ctx: &ActorContext, now: u64) -> Option<Command> {
    let t = &ctx.timeouts;
    if op.is_done() {
        return None;
    }
    if now.saturating_sub(op.last_watched_ms) > t.orphan_grace.as_millis() as u64 {
        return Some(Command::Cancel { op: op.name.clone(), now_ms: now });
    }
    match op.stage {
        Stage::Queued => {
            let waited = now.saturating_sub(op.queued_at_ms);
            if waited > t.unmatched_platform.as_millis() as u64 {
                let any = ctx.shared.read(|s| s.sched.bots.values().any(|b| platform_matches(&op.platform, &b.platform)));
                if !any {
                    let props: Vec<String> = op.platform.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    return Some(Command::Fail {
                        op: op.name.clone(),
                        code: code::FAILED_PRECONDITION,
                        message: format!(
                            "no connected worker offers the platform properties [{}] after {} s",
                            props.join(", "),
                            waited / 1000
                        ),
                        now_ms: now,
                    });
                }
            }
            None
        }
        Stage::Executing => {
            let limit = if op.timeout_ms > 0 { op.timeout_ms } else { t.default_exec_timeout.as_millis() as u64 };
            let started = op.started_at_ms.unwrap_or(now);
            if now.saturating_sub(started) > limit + t.exec_grace.as_millis() as u64 {
                return Some(Command::Requeue {
                    op: op.name.clone(),
                    reason: "no result within the execution timeout".into(),
                    max_attempts: t.max_attempts,
                    now_ms: now,
                });
            }
            None
        }
        Stage::Completed => None,
    }
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobState;
    type Arguments = (String, ActorContext);

    async fn pre_start(&self, myself: ActorRef<JobMsg>, (op, ctx): Self::Arguments) -> Result<JobState, ActorProcessingErr> {
        myself.send_interval(ctx.timeouts.tick, || JobMsg::Tick);
        Ok(JobState { op, ctx, proposing: false })
    }

    async fn handle(&self, myself: ActorRef<JobMsg>, msg: JobMsg, st: &mut JobState) -> Result<(), ActorProcessingErr> {
        match msg {
            JobMsg::Crash => panic!("fault injection: job actor {} crashed", st.op),
            JobMsg::ProposalDone => st.proposing = false,
            JobMsg::Tick | JobMsg::Changed => {
                let Some(op) = st.ctx.shared.operation(&st.op) else {
                    myself.stop(None);
                    return Ok(());
                };
                if op.is_done() {
                    myself.stop(None);
                    return Ok(());
                }
                if st.proposing || !st.ctx.proposer.is_leader() {
                    return Ok(());
                }
                if let Some(cmd) = due(&op, &st.ctx, now_ms()) {
                    tracing::info!(operation = %st.op, action = cmd.kind(), "job timer fired");
                    metrics::counter!(JOB_TIMEOUTS, "action" => cmd.kind()).increment(1);
                    st.proposing = true;
                    // Never await a proposal inside `handle`: the actor must stay responsive.
                    let proposer = st.ctx.proposer.clone();
                    let me = myself.clone();
                    tokio::spawn(async move {
                        if let Err(e) = proposer.propose(cmd).await {
                            tracing::warn!(error = %e, "job timer proposal failed");
                        }
                        let _ = me.cast(JobMsg::ProposalDone);
                    });
                }
            }
        }
        Ok(())
    }
}

pub enum SupervisorMsg {
    /// Operations changed in the replicated state.
    Changed(std::sync::Arc<Vec<String>>),
    /// Spawn actors for every unfinished operation not yet followed.
    Rescan,
    /// Fault injection: crash the actor of this operation.
    CrashJob(String),
    /// How many job actors run (for status pages and tests).
    Count(ractor::RpcReplyPort<usize>),
}

pub struct JobSupervisor;

pub struct SupervisorState {
    ctx: ActorContext,
    jobs: HashMap<String, ActorRef<JobMsg>>,
    by_cell: HashMap<ractor::ActorId, String>,
}

impl JobSupervisor {
    async fn spawn_job(myself: &ActorRef<SupervisorMsg>, st: &mut SupervisorState, op: &str) {
        if st.jobs.contains_key(op) {
            return;
        }
        match Actor::spawn_linked(None, JobActor, (op.to_string(), st.ctx.clone()), myself.get_cell()).await {
            Ok((r, _)) => {
                st.by_cell.insert(r.get_id(), op.to_string());
                st.jobs.insert(op.to_string(), r);
            }
            Err(e) => tracing::error!(operation = op, error = %e, "spawning a job actor failed"),
        }
    }
}

impl Actor for JobSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ActorContext;

    async fn pre_start(&self, myself: ActorRef<SupervisorMsg>, ctx: ActorContext) -> Result<SupervisorState, ActorProcessingErr> {
        let mut events = ctx.shared.subscribe_events();
        let me = myself.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(names) => {
                        if me.cast(SupervisorMsg::Changed(names)).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if me.cast(SupervisorMsg::Rescan).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        myself.cast(SupervisorMsg::Rescan)?;
        Ok(SupervisorState { ctx, jobs: HashMap::new(), by_cell: HashMap::new() })
    }

    async fn handle(&self, myself: ActorRef<SupervisorMsg>, msg: SupervisorMsg, st: &mut SupervisorState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Changed(names) => {
                for n in names.iter() {
                    let unfinished = st.ctx.shared.read(|s| s.sched.ops.get(n).is_some_and(|o| !o.is_done()));
                    match st.jobs.get(n) {
                        Some(job) => {
                            let _ = job.cast(JobMsg::Changed);
                        }
                        None if unfinished => Self::spawn_job(&myself, st, n).await,
                        None => {}
                    }
                }
            }
            SupervisorMsg::Rescan => {
                let open: Vec<String> =
                    st.ctx.shared.read(|s| s.sched.ops.values().filter(|o| !o.is_done()).map(|o| o.name.clone()).collect());
                for n in open {
                    Self::spawn_job(&myself, st, &n).await;
                }
            }
            SupervisorMsg::CrashJob(op) => {
                if let Some(j) = st.jobs.get(&op) {
                    let _ = j.cast(JobMsg::Crash);
                }
            }
            SupervisorMsg::Count(reply) => {
                let _ = reply.send(st.jobs.len());
            }
        }
        Ok(())
    }

    // The default stops the supervisor when a child stops: here a child stopping is normal
    // (its operation finished) and a child failing is restarted from the replicated state.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(op) = st.by_cell.remove(&cell.get_id()) {
                    st.jobs.remove(&op);
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(op) = st.by_cell.remove(&cell.get_id()) {
                    st.jobs.remove(&op);
                    tracing::warn!(operation = %op, error = %err, "job actor failed: restarting it");
                    metrics::counter!(JOB_RESTARTS).increment(1);
                    let unfinished = st.ctx.shared.read(|s| s.sched.ops.get(&op).is_some_and(|o| !o.is_done()));
                    if unfinished {
                        Self::spawn_job(&myself, st, &op).await;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
