//! The Build Event Service (google.devtools.build.v1 PublishBuildEvent) and Kiln's query API
//! over the streams it received (kiln.events.v1 BuildEvents).
//!
//! Every event, lifecycle or tool, goes to its stream's `EventStreamActor` on this node, which
//! persists it (replicated) before its sequence number is acknowledged. A tool event stream is
//! read in batches: whatever the client already sent is handed to the actor at once, and the
//! acknowledgements go back in order.
//!
//! A stream id is `build_id.component.invocation_id` with the component's enum number, as
//! BuildGrid forms it (`b1.3.i1` for a TOOL stream, `b1.1.` for build-level lifecycle events).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use kiln_actors::event_stream::{IncomingEvent, PublishError, Published, StreamKey, StreamMsg, StreamSupervisorMsg};
use kiln_proto::bes::{
    build_event, stream_id::BuildComponent, OrderedBuildEvent, PublishBuildEvent, PublishBuildToolEventStreamRequest,
    PublishBuildToolEventStreamResponse, PublishLifecycleEventRequest, StreamId,
};
use kiln_proto::events::build_events_server::BuildEvents;
use kiln_proto::events::{
    Event, GetStreamRequest, ListStreamsRequest, ListStreamsResponse, ReadEventsRequest, ReadEventsResponse, Stream as StreamInfo,
};
use kiln_raft::streams::StreamRecord;
use prost::Message;
use ractor::ActorRef;
use tonic::{Request, Response, Status, Streaming};

use super::observe;
use crate::error::{KilnError, Result};
use crate::server::NodeState;

/// Events handed to the actor in one batch at most.
const MAX_BATCH: usize = 256;
/// How long one batch may take to persist before the client is told to retry.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STREAM_PAGE: usize = 100;
const MAX_STREAM_PAGE: usize = 1000;
const DEFAULT_EVENT_PAGE: usize = 500;
const MAX_EVENT_PAGE: usize = 5000;
/// Index entries a ListStreams call looks at before it returns a (possibly short) page.
const LIST_SCAN_BUDGET: usize = 50_000;

pub struct BuildEventService {
    state: Arc<NodeState>,
}

impl BuildEventService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

/// Ids end up in stream ids and storage keys: letters, digits and `-_:@+=` only, at most 256.
fn check_id(field: &str, id: &str, required: bool) -> Result<()> {
    if id.is_empty() {
        return if required { Err(KilnError::invalid(format!("stream_id.{field} is empty"))) } else { Ok(()) };
    }
    if id.len() > 256 {
        return Err(KilnError::invalid(format!("stream_id.{field} is {} bytes long; at most 256", id.len())));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_:@+=".contains(*c))) {
        return Err(KilnError::invalid(format!(
            "stream_id.{field} {id:?} contains {c:?}; ids may use letters, digits and -_:@+= only"
        )));
    }
    Ok(())
}

/// The stream an event belongs to, validated.
pub fn stream_key(id: Option<&StreamId>) -> Result<StreamKey> {
    let id = id.ok_or_else(|| KilnError::invalid("ordered_build_event.stream_id is missing"))?;
    check_id("build_id", &id.build_id, true)?;
    check_id("invocation_id", &id.invocation_id, false)?;
    let component = match BuildComponent::try_from(id.component) {
        Ok(BuildComponent::UnknownComponent) | Err(_) => {
            return Err(KilnError::invalid(format!(
                "stream_id.component {} is not CONTROLLER (1), WORKER (2) or TOOL (3)",
                id.component
            )))
        }
        Ok(c) => c,
    };
    Ok(StreamKey {
        stream_id: format!("{}.{}.{}", id.build_id, id.component, id.invocation_id),
        build_id: id.build_id.clone(),
        invocation_id: id.invocation_id.clone(),
        component: component.as_str_name().to_string(),
    })
}

/// The event's kind, as the query API names it.
pub fn event_kind(e: Option<&build_event::Event>) -> &'static str {
    use build_event::Event as E;
    match e {
        Some(E::InvocationAttemptStarted(_)) => "invocation_attempt_started",
        Some(E::InvocationAttemptFinished(_)) => "invocation_attempt_finished",
        Some(E::BuildEnqueued(_)) => "build_enqueued",
        Some(E::BuildFinished(_)) => "build_finished",
        Some(E::ConsoleOutput(_)) => "console_output",
        Some(E::ComponentStreamFinished(_)) => "component_stream_finished",
        Some(E::BazelEvent(_)) => "bazel_event",
        Some(E::BuildExecutionEvent(_)) => "build_execution_event",
        Some(E::SourceFetchEvent(_)) => "source_fetch_event",
        None => "unknown",
    }
}

fn to_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    match t {
        Some(t) if t.seconds >= 0 => t.seconds as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000,
        _ => kiln_actors::context::now_ms(),
    }
}

fn from_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// One event, validated: its stream and what the actor stores.
fn incoming(e: &OrderedBuildEvent, max_bytes: usize) -> Result<(StreamKey, IncomingEvent)> {
    let key = stream_key(e.stream_id.as_ref())?;
    if e.sequence_number < 1 {
        return Err(KilnError::invalid(format!("stream {}: sequence_number {} is not positive (the first is 1)", key.stream_id, e.sequence_number)));
    }
    let ev = e.event.as_ref().ok_or_else(|| {
        KilnError::invalid(format!("stream {}: event {} has no build event", key.stream_id, e.sequence_number))
    })?;
    let encoded = e.encode_to_vec();
    if encoded.len() > max_bytes {
        return Err(KilnError::invalid(format!(
            "stream {}: event {} is {} bytes; the limit is {max_bytes} (build_events.max_event_bytes)",
            key.stream_id,
            e.sequence_number,
            encoded.len()
        )));
    }
    use build_event::Event as E;
    let finishes = matches!(ev.event, Some(E::ComponentStreamFinished(_) | E::BuildFinished(_) | E::InvocationAttemptFinished(_)));
    Ok((key, IncomingEvent { sequence_number: e.sequence_number, event_ms: to_ms(ev.event_time.as_ref()), encoded, finishes }))
}

fn publish_error(stream: &str, e: PublishError) -> Status {
    match e {
        PublishError::Gap { expected, got } => Status::failed_precondition(format!(
            "stream {stream}: sequence number {got} does not follow the last stored one; expected {expected} (events must be sent without gaps)"
        )),
        PublishError::Unavailable(m) => Status::unavailable(format!("stream {stream}: {m}")),
    }
}

impl BuildEventService {
    async fn actor(&self, key: StreamKey) -> Result<ActorRef<StreamMsg>> {
        let id = key.stream_id.clone();
        let r = self
            .state
            .event_streams
            .call(|reply| StreamSupervisorMsg::Get(key, reply), Some(Duration::from_secs(10)))
            .await
            .map_err(|e| KilnError::Unavailable(format!("stream {id}: the stream supervisor did not answer: {e}")))?;
        match r {
            ractor::rpc::CallResult::Success(Some(a)) => Ok(a),
            ractor::rpc::CallResult::Success(None) => Err(KilnError::ResourceExhausted(format!(
                "stream {id}: this node serves its maximum number of streams (build_events.max_active_streams)"
            ))),
            _ => Err(KilnError::Unavailable(format!("stream {id}: the stream supervisor did not answer"))),
        }
    }

    async fn publish(actor: &ActorRef<StreamMsg>, stream: &str, events: Vec<IncomingEvent>) -> std::result::Result<Published, Status> {
        match actor.call(|reply| StreamMsg::Publish(events, reply), Some(PUBLISH_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(p)) => Ok(p),
            Ok(ractor::rpc::CallResult::Timeout) => Err(Status::unavailable(format!("stream {stream}: storing events timed out"))),
            _ => Err(Status::unavailable(format!("stream {stream}: the stream's actor stopped; resend"))),
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = std::result::Result<PublishBuildToolEventStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PublishBuildEvent for BuildEventService {
    async fn publish_lifecycle_event(&self, req: Request<PublishLifecycleEventRequest>) -> std::result::Result<Response<()>, Status> {
        let start = Instant::now();
        let r = async {
            let req = req.into_inner();
            let e = req.build_event.as_ref().ok_or_else(|| Status::invalid_argument("build_event is missing"))?;
            let (key, ev) = incoming(e, self.state.cfg.build_events.max_event_bytes)?;
            let seq = ev.sequence_number;
            let stream = key.stream_id.clone();
            let actor = self.actor(key).await?;
            let p = Self::publish(&actor, &stream, vec![ev]).await?;
            if let Some(e) = p.error {
                return Err(publish_error(&stream, e));
            }
            debug_assert_eq!(p.acks, vec![seq]);
            Ok(Response::new(()))
        }
        .await;
        observe("PublishLifecycleEvent", start, r)
    }

    type PublishBuildToolEventStreamStream = AckStream;

    async fn publish_build_tool_event_stream(
        &self,
        req: Request<Streaming<PublishBuildToolEventStreamRequest>>,
    ) -> std::result::Result<Response<AckStream>, Status> {
        let mut inbound = req.into_inner();
        let max_bytes = self.state.cfg.build_events.max_event_bytes;
        let this = BuildEventService { state: self.state.clone() };
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_BATCH);
        tokio::spawn(async move {
            let mut current: Option<(StreamKey, ActorRef<StreamMsg>)> = None;
            loop {
                // Wait for one request, then take what else the client already sent.
                let mut batch = match inbound.next().await {
                    Some(Ok(r)) => vec![r],
                    Some(Err(_)) | None => return,
                };
                while batch.len() < MAX_BATCH {
                    match inbound.next().now_or_never() {
                        Some(Some(Ok(r))) => batch.push(r),
                        _ => break,
                    }
                }
                let mut events = Vec::with_capacity(batch.len());
                for r in &batch {
                    let checked = r
                        .ordered_build_event
                        .as_ref()
                        .ok_or_else(|| KilnError::invalid("ordered_build_event is missing"))
                        .and_then(|e| incoming(e, max_bytes));
                    let (key, ev) = match checked {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    match &current {
                        Some((k, _)) if k.stream_id != key.stream_id => {
                            let _ = tx
                                .send(Err(Status::invalid_argument(format!(
                                    "event {} is for stream {} but this call carries stream {}; one stream per call",
                                    ev.sequence_number, key.stream_id, k.stream_id
                                ))))
                                .await;
                            return;
                        }
                        Some(_) => {}
                        None => match this.actor(key.clone()).await {
                            Ok(a) => current = Some((key, a)),
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        },
                    }
                    events.push(ev);
                }
                let Some((key, actor)) = &current else { return };
                let sid = batch[0].ordered_build_event.as_ref().and_then(|e| e.stream_id.clone());
                let published = match Self::publish(actor, &key.stream_id, events).await {
                    Ok(p) => p,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                for seq in published.acks {
                    let ack = PublishBuildToolEventStreamResponse { stream_id: sid.clone(), sequence_number: seq };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
                if let Some(e) = published.error {
                    let _ = tx.send(Err(publish_error(&key.stream_id, e))).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

// ---- Query ----------------------------------------------------------------------------------

fn stream_info(r: &StreamRecord) -> StreamInfo {
    StreamInfo {
        stream_id: r.stream_id.clone(),
        build_id: r.build_id.clone(),
        invocation_id: r.invocation_id.clone(),
        component: r.component.clone(),
        first_event_time: Some(from_ms(r.first_event_ms)),
        last_event_time: Some(from_ms(r.last_event_ms)),
        event_count: r.event_count as i64,
        finished: r.finished,
    }
}

impl BuildEventService {
    /// The stream's index entry, after catching up with the cluster if this node lacks it.
    async fn record(&self, stream_id: &str) -> Result<StreamRecord> {
        if stream_id.is_empty() {
            return Err(KilnError::invalid("stream_id is empty"));
        }
        let get = || self.state.scheduler.shared.read(|s| s.streams.get(stream_id).cloned());
        if let Some(r) = get() {
            return Ok(r);
        }
        self.state.scheduler.consensus.catch_up(Duration::from_secs(5)).await;
        get().ok_or_else(|| KilnError::NotFound(format!("no build event stream {stream_id:?}")))
    }

    async fn list(&self, req: ListStreamsRequest) -> Result<ListStreamsResponse> {
        let re = regex::RegexBuilder::new(&req.pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| KilnError::invalid(format!("pattern {:?} is not a valid regular expression: {e}", req.pattern)))?;
        if req.page_size < 0 {
            return Err(KilnError::invalid(format!("page_size {} is negative", req.page_size)));
        }
        let page = match req.page_size as usize {
            0 => DEFAULT_STREAM_PAGE,
            n => n.min(MAX_STREAM_PAGE),
        };
        self.state.scheduler.consensus.catch_up(Duration::from_secs(5)).await;
        let (streams, next) = self.state.scheduler.shared.read(|s| {
            use std::ops::Bound;
            let from = if req.page_token.is_empty() { Bound::Unbounded } else { Bound::Excluded(req.page_token.clone()) };
            let mut out = Vec::new();
            let mut last_seen = None;
            let mut exhausted = true;
            for (i, (id, r)) in s.streams.streams.range::<String, _>((from, Bound::Unbounded)).enumerate() {
                if out.len() >= page || i >= LIST_SCAN_BUDGET {
                    exhausted = false;
                    break;
                }
                last_seen = Some(id.clone());
                if re.is_match(id) {
                    out.push(stream_info(r));
                }
            }
            (out, if exhausted { String::new() } else { last_seen.unwrap_or_default() })
        });
        Ok(ListStreamsResponse { streams, next_page_token: next })
    }

    async fn read_events(&self, req: ReadEventsRequest) -> Result<ReadEventsResponse> {
        let record = self.record(&req.stream_id).await?;
        if req.page_size < 0 || req.after_sequence_number < 0 {
            return Err(KilnError::invalid("page_size and after_sequence_number must not be negative"));
        }
        let page = match req.page_size as usize {
            0 => DEFAULT_EVENT_PAGE,
            n => n.min(MAX_EVENT_PAGE),
        };
        let (events, last) = self.state.events.read(&req.stream_id, req.after_sequence_number, page).await?;
        let mut out = Vec::with_capacity(events.len());
        for (seq, data) in events {
            let e = OrderedBuildEvent::decode(&data[..])
                .map_err(|e| KilnError::Internal(format!("stream {}: stored event {seq} does not decode: {e}", req.stream_id)))?;
            let be = e.event.as_ref();
            out.push(Event {
                sequence_number: seq,
                event_time: be.and_then(|b| b.event_time),
                kind: event_kind(be.and_then(|b| b.event.as_ref())).to_string(),
                ordered_build_event: data,
            });
        }
        let next = out.last().map(|e| e.sequence_number).unwrap_or(req.after_sequence_number);
        let total = (record.event_count as i64).max(last);
        Ok(ReadEventsResponse { events: out, next_after_sequence_number: next, complete: record.finished && next >= total })
    }
}

#[tonic::async_trait]
impl BuildEvents for BuildEventService {
    async fn list_streams(&self, req: Request<ListStreamsRequest>) -> std::result::Result<Response<ListStreamsResponse>, Status> {
        let start = Instant::now();
        let r = self.list(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ListStreams", start, r)
    }

    async fn get_stream(&self, req: Request<GetStreamRequest>) -> std::result::Result<Response<StreamInfo>, Status> {
        let start = Instant::now();
        let r = self.record(&req.into_inner().stream_id).await.map(|r| Response::new(stream_info(&r))).map_err(Status::from);
        observe("GetStream", start, r)
    }

    async fn read_events(&self, req: Request<ReadEventsRequest>) -> std::result::Result<Response<ReadEventsResponse>, Status> {
        let start = Instant::now();
        let r = BuildEventService::read_events(self, req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ReadEvents", start, r)
    }
}
