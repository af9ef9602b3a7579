//! `EventStreamActor`: one per build-event stream, on the node receiving it. It is the stream's
//! order: batches of events are handled one after the other, each persisted (replicated by the
//! node's [`EventPersistence`]) before its sequence number is acknowledged.
//!
//! - An event at or below the last stored sequence number is a resend (the client reconnected,
//!   perhaps to another node): it is acknowledged again and not stored twice.
//! - The next number is stored; a larger one is a gap and is refused.
//! - The stream's index entry in Raft (`UpdateStream`) is written before the first event and the
//!   finishing event are acknowledged, and at most once a second in between.
//!
//! The actor awaits persistence inside `handle` on purpose: that is what keeps a stream's events
//! in order. What it knows it reloads from the replicas when it starts, so a crashed or stopped
//! actor loses nothing; `EventStreamSupervisor` spawns one on demand and forgets it when it
//! stops (after `idle` without events).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kiln_raft::command::Command;
use kiln_raft::streams::{StreamRecord, StreamUpdate};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::context::ActorContext;

pub const EVENTS_STORED: &str = "kiln_build_events_stored_total";
pub const EVENTS_RESENT: &str = "kiln_build_events_resent_total";
pub const STREAMS_ACTIVE: &str = "kiln_build_event_streams_active";

/// Where a node keeps events: replicated, durable before `persist` returns.
pub trait EventPersistence: Send + Sync + 'static {
    /// The largest sequence number any reachable replica stores for `stream` (0: none).
    fn last_sequence(&self, stream: &str) -> BoxFuture<'static, Result<i64, String>>;
    /// Stores `(sequence_number, encoded OrderedBuildEvent)` on the stream's replicas.
    fn persist(&self, stream: &str, events: Vec<(i64, Vec<u8>)>) -> BoxFuture<'static, Result<(), String>>;
}

/// Identity of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKey {
    /// `build_id.component.invocation_id`.
    pub stream_id: String,
    pub build_id: String,
    pub invocation_id: String,
    pub component: String,
}

/// One event as received, already validated by the service.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub sequence_number: i64,
    pub event_ms: u64,
    pub encoded: Vec<u8>,
    /// The stream's last event (ComponentStreamFinished, BuildFinished, InvocationAttemptFinished).
    pub finishes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Sequence numbers must follow the last stored one without a gap.
    Gap { expected: i64, got: i64 },
    /// Persisting or indexing failed; nothing past `acks` was acknowledged.
    Unavailable(String),
}

/// The outcome of one batch: the sequence numbers acknowledged, in order, then maybe an error
/// that ends the batch.
#[derive(Debug, Default)]
pub struct Published {
    pub acks: Vec<i64>,
    pub error: Option<PublishError>,
}

pub enum StreamMsg {
    Publish(Vec<IncomingEvent>, RpcReplyPort<Published>),
    /// Write the index entry if it is behind.
    FlushIndex,
    Tick,
}

pub struct EventStreamActor;

pub struct StreamState {
    key: StreamKey,
    ctx: ActorContext,
    store: Arc<dyn EventPersistence>,
    cfg: StreamLimits,
    /// Last stored sequence number, once loaded from the replicas.
    last: Option<i64>,
    first_ms: u64,
    last_ms: u64,
    finished: bool,
    indexed_count: Option<u64>,
    indexed_finished: bool,
    indexed_at: Instant,
    flush_scheduled: bool,
    last_activity: Instant,
}

/// Bounds of the stream actors.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// An actor with no event for this long stops (the next event spawns a new one).
    pub idle: Duration,
    /// At most this many streams are served at once on a node.
    pub max_active: usize,
    /// The index keeps at most this many streams.
    pub max_indexed: u64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self { idle: Duration::from_secs(120), max_active: 10_000, max_indexed: 100_000 }
    }
}

impl StreamState {
    fn update(&self) -> StreamUpdate {
        let record = StreamRecord {
            stream_id: self.key.stream_id.clone(),
            build_id: self.key.build_id.clone(),
            invocation_id: self.key.invocation_id.clone(),
            component: self.key.component.clone(),
            first_event_ms: self.first_ms,
            last_event_ms: self.last_ms,
            event_count: self.last.unwrap_or(0).max(0) as u64,
            finished: self.finished,
        };
        StreamUpdate { record, max_streams: self.cfg.max_indexed }
    }

    fn index_behind(&self) -> bool {
        self.indexed_count != Some(self.last.unwrap_or(0).max(0) as u64) || self.indexed_finished != self.finished
    }

    async fn write_index(&mut self) -> Result<(), String> {
        let u = self.update();
        self.ctx.proposer.propose(Command::UpdateStream(u.clone())).await.map_err(|e| e.to_string())?;
        self.indexed_count = Some(u.record.event_count);
        self.indexed_finished = u.record.finished;
        self.indexed_at = Instant::now();
        Ok(())
    }

    async fn publish(&mut self, events: Vec<IncomingEvent>) -> Published {
        let mut out = Published::default();
        let last = match self.last {
            Some(l) => l,
            None => match self.store.last_sequence(&self.key.stream_id).await {
                Ok(l) => {
                    let indexed = self.ctx.shared.read(|s| s.streams.get(&self.key.stream_id).map(|r| (r.finished, r.first_event_ms)));
                    if let Some((finished, first)) = indexed {
                        self.finished |= finished;
                        self.first_ms = first;
                    }
                    self.last = Some(l);
                    l
                }
                Err(e) => {
                    out.error = Some(PublishError::Unavailable(format!("reading the stream's stored events: {e}")));
                    return out;
                }
            },
        };
        let was_new = last == 0;
        let mut next = last;
        let mut fresh: Vec<(i64, Vec<u8>)> = Vec::new();
        let mut resent = Vec::new();
        let mut finishes = false;
        let mut times = Vec::new();
        for e in events {
            if e.sequence_number <= last {
                resent.push(e.sequence_number);
                continue;
            }
            if e.sequence_number != next + 1 {
                // A gap, or a number repeated within the batch.
                out.error = Some(PublishError::Gap { expected: next + 1, got: e.sequence_number });
                break;
            }
            next = e.sequence_number;
            finishes |= e.finishes;
            times.push(e.event_ms);
            fresh.push((e.sequence_number, e.encoded));
        }
        metrics::counter!(EVENTS_RESENT).increment(resent.len() as u64);
        if !fresh.is_empty() {
            let n = fresh.len() as u64;
            if let Err(e) = self.store.persist(&self.key.stream_id, fresh).await {
                // What the replicas hold now is unknown: reload before the next batch.
                self.last = None;
                out.acks = resent;
                out.error = Some(PublishError::Unavailable(format!("storing events: {e}")));
                return out;
            }
            metrics::counter!(EVENTS_STORED).increment(n);
            self.last = Some(next);
            for t in times {
                if self.first_ms == 0 || t < self.first_ms {
                    self.first_ms = t;
                }
                self.last_ms = self.last_ms.max(t);
            }
            self.finished |= finishes;
        }
        // Before the first and the last event are acknowledged, the index lists the stream.
        if self.index_behind() && (was_new || finishes || self.indexed_count.is_none() || self.indexed_at.elapsed() >= Duration::from_secs(1)) {
            if let Err(e) = self.write_index().await {
                out.error = Some(PublishError::Unavailable(format!("indexing the stream: {e}")));
                return out;
            }
        }
        // Acks in sequence order: resends are all at or below `last`, new ones follow it.
        resent.sort_unstable();
        out.acks = resent;
        out.acks.extend(last + 1..=next);
        out
    }
}

impl Actor for EventStreamActor {
    type Msg = StreamMsg;
    type State = StreamState;
    type Arguments = (StreamKey, ActorContext, Arc<dyn EventPersistence>, StreamLimits);

    async fn pre_start(&self, myself: ActorRef<StreamMsg>, (key, ctx, store, cfg): Self::Arguments) -> Result<StreamState, ActorProcessingErr> {
        myself.send_interval(Duration::from_secs(1), || StreamMsg::Tick);
        Ok(StreamState {
            key,
            ctx,
            store,
            cfg,
            last: None,
            first_ms: 0,
            last_ms: 0,
            finished: false,
            indexed_count: None,
            indexed_finished: false,
            indexed_at: Instant::now(),
            flush_scheduled: false,
            last_activity: Instant::now(),
        })
    }

    async fn handle(&self, myself: ActorRef<StreamMsg>, msg: StreamMsg, st: &mut StreamState) -> Result<(), ActorProcessingErr> {
        match msg {
            StreamMsg::Publish(events, reply) => {
                st.last_activity = Instant::now();
                let out = st.publish(events).await;
                let _ = reply.send(out);
                if st.index_behind() && !st.flush_scheduled {
                    st.flush_scheduled = true;
                    myself.send_after(Duration::from_secs(1), || StreamMsg::FlushIndex);
                }
            }
            StreamMsg::FlushIndex => {
                st.flush_scheduled = false;
                if st.index_behind() {
                    if let Err(e) = st.write_index().await {
                        tracing::warn!(stream = %st.key.stream_id, error = %e, "indexing a build-event stream failed; retrying");
                        st.flush_scheduled = true;
                        myself.send_after(Duration::from_secs(1), || StreamMsg::FlushIndex);
                    }
                }
            }
            StreamMsg::Tick => {
                if st.last_activity.elapsed() >= st.cfg.idle && !st.index_behind() {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

pub enum StreamSupervisorMsg {
    /// The actor of a stream, spawned if needed (None when `max_active` are running).
    Get(StreamKey, RpcReplyPort<Option<ActorRef<StreamMsg>>>),
    Count(RpcReplyPort<usize>),
}

pub struct EventStreamSupervisor;

pub struct StreamSupervisorState {
    ctx: ActorContext,
    store: Arc<dyn EventPersistence>,
    cfg: StreamLimits,
    streams: HashMap<String, ActorRef<StreamMsg>>,
    by_cell: HashMap<ractor::ActorId, String>,
}

impl Actor for EventStreamSupervisor {
    type Msg = StreamSupervisorMsg;
    type State = StreamSupervisorState;
    type Arguments = (ActorContext, Arc<dyn EventPersistence>, StreamLimits);

    async fn pre_start(&self, _: ActorRef<StreamSupervisorMsg>, (ctx, store, cfg): Self::Arguments) -> Result<StreamSupervisorState, ActorProcessingErr> {
        Ok(StreamSupervisorState { ctx, store, cfg, streams: HashMap::new(), by_cell: HashMap::new() })
    }

    async fn handle(&self, myself: ActorRef<StreamSupervisorMsg>, msg: StreamSupervisorMsg, st: &mut StreamSupervisorState) -> Result<(), ActorProcessingErr> {
        match msg {
            StreamSupervisorMsg::Get(key, reply) => {
                if let Some(a) = st.streams.get(&key.stream_id) {
                    let _ = reply.send(Some(a.clone()));
                    return Ok(());
                }
                if st.streams.len() >= st.cfg.max_active {
                    let _ = reply.send(None);
                    return Ok(());
                }
                let id = key.stream_id.clone();
                let args = (key, st.ctx.clone(), st.store.clone(), st.cfg.clone());
                match Actor::spawn_linked(None, EventStreamActor, args, myself.get_cell()).await {
                    Ok((a, _)) => {
                        st.by_cell.insert(a.get_id(), id.clone());
                        st.streams.insert(id, a.clone());
                        metrics::gauge!(STREAMS_ACTIVE).set(st.streams.len() as f64);
                        let _ = reply.send(Some(a));
                    }
                    Err(e) => {
                        tracing::error!(stream = %id, error = %e, "spawning a build-event stream actor failed");
                        let _ = reply.send(None);
                    }
                }
            }
            StreamSupervisorMsg::Count(reply) => {
                let _ = reply.send(st.streams.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, _: ActorRef<StreamSupervisorMsg>, evt: SupervisionEvent, st: &mut StreamSupervisorState) -> Result<(), ActorProcessingErr> {
        let gone = match &evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => Some((cell.get_id(), None)),
            SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), Some(err.to_string()))),
            _ => None,
        };
        if let Some((id, err)) = gone {
            if let Some(s) = st.by_cell.remove(&id) {
                st.streams.remove(&s);
                metrics::gauge!(STREAMS_ACTIVE).set(st.streams.len() as f64);
                if let Some(err) = err {
                    // Its state is in the replicas: the next event of the stream spawns a new one.
                    tracing::warn!(stream = %s, error = %err, "build-event stream actor failed");
                }
            }
        }
        Ok(())
    }
}
