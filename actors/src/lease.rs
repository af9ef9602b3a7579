//! `LeaseActor`: one per bot session, on the node the bot talks to. It keeps the session's
//! liveness: every UpdateBotSession is a keep-alive; a bot silent for longer than
//! `bot_silence` is declared gone (its lease requeued). `LeaseSupervisor` spawns one when a
//! session first shows up on this node (also a bot that failed over from another node) and
//! restarts any that crashes.

use std::collections::HashMap;
use std::time::Instant;

use kiln_raft::command::Command;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::context::{now_ms, ActorContext};

pub const BOTS_LOST: &str = "kiln_bots_lost_total";

pub enum LeaseMsg {
    Seen,
    Tick,
    ProposalDone,
}

pub struct LeaseActor;

pub struct LeaseState {
    session: String,
    ctx: ActorContext,
    last_seen: Instant,
    proposing: bool,
}

impl Actor for LeaseActor {
    type Msg = LeaseMsg;
    type State = LeaseState;
    type Arguments = (String, ActorContext);

    async fn pre_start(&self, myself: ActorRef<LeaseMsg>, (session, ctx): Self::Arguments) -> Result<LeaseState, ActorProcessingErr> {
        myself.send_interval(ctx.timeouts.tick, || LeaseMsg::Tick);
        Ok(LeaseState { session, ctx, last_seen: Instant::now(), proposing: false })
    }

    async fn handle(&self, myself: ActorRef<LeaseMsg>, msg: LeaseMsg, st: &mut LeaseState) -> Result<(), ActorProcessingErr> {
        match msg {
            LeaseMsg::Seen => st.last_seen = Instant::now(),
            LeaseMsg::ProposalDone => {
                st.proposing = false;
            }
            LeaseMsg::Tick => {
                let exists = st.ctx.shared.read(|s| s.sched.bots.contains_key(&st.session));
                if !exists {
                    myself.stop(None);
                    return Ok(());
                }
                if st.proposing || st.last_seen.elapsed() <= st.ctx.timeouts.bot_silence {
                    return Ok(());
                }
                tracing::warn!(session = %st.session, silent_s = st.last_seen.elapsed().as_secs(), "bot went silent");
                metrics::counter!(BOTS_LOST).increment(1);
                st.proposing = true;
                let cmd = Command::BotGone {
                    session: st.session.clone(),
                    reason: format!("the bot made no call for {} s", st.ctx.timeouts.bot_silence.as_secs()),
                    max_attempts: st.ctx.timeouts.max_attempts,
                    now_ms: now_ms(),
                };
                let proposer = st.ctx.proposer.clone();
                let me = myself.clone();
                tokio::spawn(async move {
                    if let Err(e) = proposer.propose(cmd).await {
                        tracing::warn!(error = %e, "proposing a lost bot failed");
                    }
                    let _ = me.cast(LeaseMsg::ProposalDone);
                });
            }
        }
        Ok(())
    }
}

pub enum LeaseSupervisorMsg {
    /// A call from this bot session arrived on this node.
    Seen(String),
    /// The bot ended its session (BOT_TERMINATING): stop following it.
    Forget(String),
    Count(ractor::RpcReplyPort<usize>),
}

pub struct LeaseSupervisor;

pub struct LeaseSupervisorState {
    ctx: ActorContext,
    leases: HashMap<String, ActorRef<LeaseMsg>>,
    by_cell: HashMap<ractor::ActorId, String>,
}

impl LeaseSupervisor {
    async fn spawn_lease(myself: &ActorRef<LeaseSupervisorMsg>, st: &mut LeaseSupervisorState, session: &str) {
        match Actor::spawn_linked(None, LeaseActor, (session.to_string(), st.ctx.clone()), myself.get_cell()).await {
            Ok((r, _)) => {
                st.by_cell.insert(r.get_id(), session.to_string());
                st.leases.insert(session.to_string(), r);
            }
            Err(e) => tracing::error!(session, error = %e, "spawning a lease actor failed"),
        }
    }
}

impl Actor for LeaseSupervisor {
    type Msg = LeaseSupervisorMsg;
    type State = LeaseSupervisorState;
    type Arguments = ActorContext;

    async fn pre_start(&self, _: ActorRef<LeaseSupervisorMsg>, ctx: ActorContext) -> Result<LeaseSupervisorState, ActorProcessingErr> {
        Ok(LeaseSupervisorState { ctx, leases: HashMap::new(), by_cell: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<LeaseSupervisorMsg>,
        msg: LeaseSupervisorMsg,
        st: &mut LeaseSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LeaseSupervisorMsg::Seen(session) => match st.leases.get(&session) {
                Some(a) => {
                    let _ = a.cast(LeaseMsg::Seen);
                }
                None => Self::spawn_lease(&myself, st, &session).await,
            },
            LeaseSupervisorMsg::Forget(session) => {
                if let Some(a) = st.leases.remove(&session) {
                    st.by_cell.remove(&a.get_id());
                    a.stop(None);
                }
            }
            LeaseSupervisorMsg::Count(reply) => {
                let _ = reply.send(st.leases.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<LeaseSupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut LeaseSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(s) = st.by_cell.remove(&cell.get_id()) {
                    st.leases.remove(&s);
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(s) = st.by_cell.remove(&cell.get_id()) {
                    st.leases.remove(&s);
                    tracing::warn!(session = %s, error = %err, "lease actor failed: restarting it");
                    Self::spawn_lease(&myself, st, &s).await;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
