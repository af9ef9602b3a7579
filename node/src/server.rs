//! Assembles a node: opens storage, binds the gRPC and HTTP ports, serves until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::ac::ActionCacheStore;
use crate::cas::BlobStore;
use crate::config::Config;
use crate::services::bytestream_read;
use crate::services::find_missing;
use crate::services::{action_cache::ActionCacheService, bytestream::ByteStreamService};
use crate::services::{capabilities::CapabilitiesService, cas::CasService};
use crate::services::{bots::BotsService, execution::ExecutionService, operations::OperationsService};
use crate::scheduler::Scheduler;
use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_proto::remoteworkers::BotsServer;
use kiln_proto::peer::peer_server::PeerServer;
use crate::services::peer::PeerService;
use crate::services::build_events::BuildEventService;

/// How long the sled index may lag in memory before its background flush.
const INDEX_FLUSH_EVERY: Duration = Duration::from_millis(200);
/// gRPC HTTP/2 keep-alive, so dead clients free their streams.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);
/// Largest HTTP/2 frame a client may send (SETTINGS_MAX_FRAME_SIZE). Above the 16 KiB default
/// a client streaming a blob makes one write per MiB instead of one per 16 KiB; the cost is at
/// most one frame buffered per connection.
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Everything the services share.
pub struct NodeState {
    pub cfg: Config,
    pub cas: BlobStore,
    pub ac: ActionCacheStore,
    /// The cluster's view of CAS and Action Cache: use this, not `cas`/`ac`, to serve clients.
    pub storage: crate::storage::Storage,
    pub scheduler: Arc<Scheduler>,
    pub placement: crate::placement::Placement,
    /// Build events, replicated over the ring.
    pub events: crate::build_events::ClusterEvents,
    pub event_streams: ractor::ActorRef<kiln_actors::event_stream::StreamSupervisorMsg>,
    /// Streams every action this node completes to a receiver, when one is configured.
    pub completed_actions: Option<crate::completed_actions::CompletedActionLogger>,
    /// Live stdout/stderr of actions whose workers write to this node.
    pub logs: crate::logstream::LogStreams,
    pub started: Instant,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

/// A node serving in the background; dropping the handle does not stop it, [`Self::shutdown`] does.
pub struct RunningNode {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: Arc<NodeState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stops accepting calls, lets running ones finish, flushes storage.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.state.event_streams.stop(None);
        self.state.scheduler.shutdown().await;
        if let Err(e) = self.state.ac.close() {
            tracing::error!(error = %e, "checkpointing the Action Cache log at shutdown");
        }
        if let Err(e) = self.state.cas.close() {
            tracing::error!(error = %e, "closing the blob index at shutdown");
        }
    }

    /// Waits until the node stops (after [`Self::shutdown`] from elsewhere, or a fatal error).
    pub async fn wait(&mut self) {
        for t in self.tasks.iter_mut() {
            let _ = t.await;
        }
    }
}

fn open_db(cfg: &Config) -> anyhow::Result<sled::Db> {
    let path = cfg.node.data_dir.join("index");
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(cfg.storage.index_cache_bytes)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(Some(INDEX_FLUSH_EVERY.as_millis() as u64))
        .open()
        .map_err(|e| anyhow::anyhow!("opening the index at {} (is another kiln using this data dir?): {e}", path.display()))?;
    Ok(db)
}

/// Opens storage, binds both ports (port 0 picks a free one) and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<RunningNode> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.node.data_dir)?;
    crate::metrics::describe();
    let db = open_db(&cfg)?;
    let cas = BlobStore::open(&cfg, &db)?;
    let ac = ActionCacheStore::open(&db, cas.group_flush(), &cfg)?;

    let incoming = TcpIncoming::bind(cfg.node.listen)
        .map_err(|e| anyhow::anyhow!("binding gRPC on {}: {e}", cfg.node.listen))?
        .with_nodelay(Some(true));
    let grpc_addr = incoming.local_addr()?;
    let http_listener = tokio::net::TcpListener::bind(cfg.node.http)
        .await
        .map_err(|e| anyhow::anyhow!("binding HTTP on {}: {e}", cfg.node.http))?;
    let http_addr = http_listener.local_addr()?;

    let advertise = cfg.advertise_address(grpc_addr);
    let members: std::collections::BTreeMap<u64, String> = if cfg.cluster.join {
        // Joining: no cluster of our own; the leader adds us.
        std::collections::BTreeMap::new()
    } else if cfg.cluster.peers.is_empty() {
        [(cfg.node.id, advertise.clone())].into()
    } else {
        cfg.cluster.peers.iter().map(|p| (p.id, p.address.clone())).collect()
    };
    let placement = crate::placement::Placement::new(cfg.cluster.replication_factor, members.clone());
    let scheduler = Scheduler::start(
        cfg.node.id,
        members,
        &db,
        &cfg.raft_settings(),
        cfg.timeouts(),
        Duration::from_secs(cfg.scheduler.operation_retention_secs),
    )
    .await?;
    tokio::spawn(follow_membership(scheduler.consensus.raft.metrics(), placement.clone()));
    let storage = crate::storage::Storage::new(
        cas.clone(),
        ac.clone(),
        placement.clone(),
        scheduler.consensus.channels.clone(),
        cfg.node.id,
        cfg.action_cache.clone(),
    );
    let events = crate::build_events::ClusterEvents::new(
        crate::build_events::EventStore::open(&db)?,
        placement.clone(),
        scheduler.consensus.channels.clone(),
        cfg.node.id,
    );
    let limits = kiln_actors::event_stream::StreamLimits {
        idle: Duration::from_secs(cfg.build_events.stream_idle_secs.max(1)),
        max_active: cfg.build_events.max_active_streams,
        max_indexed: cfg.build_events.max_indexed_streams,
    };
    let persistence: Arc<dyn kiln_actors::event_stream::EventPersistence> = Arc::new(crate::build_events::Persistence(events.clone()));
    let (event_streams, _) =
        ractor::Actor::spawn(None, kiln_actors::event_stream::EventStreamSupervisor, (scheduler.actor_context(), persistence, limits)).await?;
    let completed_actions = cfg
        .completed_action_logger
        .endpoint
        .clone()
        .map(|e| crate::completed_actions::CompletedActionLogger::start(e, cfg.completed_action_logger.buffer));
    let state = Arc::new(NodeState {
        completed_actions,
        logs: Default::default(),
        cfg,
        cas,
        ac,
        storage,
        scheduler,
        placement,
        events,
        event_streams,
        started: Instant::now(),
        grpc_addr,
        http_addr,
    });
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(repair_loop(
        state.storage.clone(),
        state.events.clone(),
        Duration::from_secs(state.cfg.cluster.repair_interval_secs.max(1)),
        Duration::from_secs(state.cfg.cluster.repair_full_interval_secs.max(1)),
        rx.clone(),
    ));
    tokio::spawn(crate::build_events::sweep_loop(state.events.local.clone(), state.scheduler.shared.clone(), rx.clone()));
    let max_msg = state.cfg.limits.max_grpc_message_bytes;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(4 << 20))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .add_service(health_service)
        .add_service(
            CapabilitiesServer::new(CapabilitiesService::new(state.clone()))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .add_service(find_missing::router(CasService::new(state.clone()), max_msg))
        .add_service(
            bytestream_read::router(ByteStreamService::new(state.clone()), |s| {
                s.max_decoding_message_size(max_msg).max_encoding_message_size(max_msg)
            }),
        )
        .add_service(
            ActionCacheServer::new(ActionCacheService::new(state.clone()))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .add_service(ExecutionServer::new(ExecutionService::new(state.clone())).max_decoding_message_size(max_msg))
        .add_service(OperationsServer::new(OperationsService::new(state.clone())))
        .add_service(kiln_proto::logstream::log_stream_service_server::LogStreamServiceServer::new(
            crate::services::logstream::LogStreamServiceImpl::new(state.clone()),
        ))
        .add_service(BotsServer::new(BotsService::new(state.clone())).max_decoding_message_size(max_msg))
        .add_service(
            kiln_proto::bes::PublishBuildEventServer::new(BuildEventService::new(state.clone()))
                .max_decoding_message_size(max_msg),
        )
        .add_service(kiln_proto::events::build_events_server::BuildEventsServer::new(BuildEventService::new(state.clone())).max_encoding_message_size(max_msg))
        .add_service(
            PeerServer::new(PeerService::new(state.clone()))
                .max_decoding_message_size(kiln_raft::network::MAX_PEER_MESSAGE)
                .max_encoding_message_size(kiln_raft::network::MAX_PEER_MESSAGE),
        );

    let mut grpc_rx = rx.clone();
    let grpc = tokio::spawn(async move {
        let stop = async move {
            let _ = grpc_rx.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let http = tokio::spawn(crate::http::serve(http_listener, state.clone(), rx));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, data = %state.cfg.node.data_dir.display(), "kiln node serving");
    Ok(RunningNode { grpc_addr, http_addr, state, shutdown, tasks: vec![grpc, http] })
}

/// Rebuilds the placement ring whenever the committed membership changes.
async fn follow_membership(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, openraft::BasicNode>>,
    placement: crate::placement::Placement,
) {
    loop {
        let (version, members) = {
            let m = metrics.borrow_and_update();
            let cfg = &m.membership_config;
            let version = cfg.log_id().map(|l| l.index).unwrap_or(0);
            let members: std::collections::BTreeMap<u64, String> =
                cfg.membership().voter_ids().filter_map(|id| cfg.membership().get_node(&id).map(|n| (id, n.addr.clone()))).collect();
            (version, members)
        };
        if !members.is_empty() {
            placement.update(version, members);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Every `every` until shutdown: a full repair pass of the blobs if one is due, and a step of
/// the build events' repair.
async fn repair_loop(
    storage: crate::storage::Storage,
    events: crate::build_events::ClusterEvents,
    every: Duration,
    full_every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut events_from = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = storage.repair_if_due(full_every).await {
            tracing::warn!(error = %e, "repair pass failed");
        }
        match events.repair_pass(events_from.take()).await {
            Ok(next) => events_from = next,
            Err(e) => tracing::warn!(error = %e, "build-event repair pass failed"),
        }
    }
}
