//! REAPI Execution: Execute and WaitExecution.
//!
//! Execute answers from the Action Cache when it can; otherwise it checks that every input is
//! in the CAS (FAILED_PRECONDITION listing what is missing), proposes `Enqueue` through Raft (an
//! identical action already queued or running is joined), and streams the operation as this
//! node applies its changes.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use kiln_proto::longrunning::Operation as LroOperation;
use kiln_proto::reapi::execution_server::Execution;
use kiln_proto::reapi::{
    execution_stage, Action, Command as ReCommand, Directory, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse,
    RequestMetadata, WaitExecutionRequest,
};
use kiln_raft::command::{ActionKey, Command, CommandResult, EnqueueCmd, RequestInfo};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{check_instance_name, observe};
use crate::storage::{Inline, Storage};
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::scheduler::{to_longrunning, Scheduler, EXECUTE_METADATA, EXECUTE_RESPONSE};
use crate::server::NodeState;

/// Directories an input tree may have at most before Execute refuses it.
const MAX_INPUT_DIRECTORIES: usize = 1_000_000;
/// The header carrying REAPI RequestMetadata.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

pub struct ExecutionService {
    state: Arc<NodeState>,
}

type OpStream = Pin<Box<dyn Stream<Item = Result<LroOperation, Status>> + Send>>;

impl ExecutionService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    fn scheduler(&self) -> &Arc<Scheduler> {
        &self.state.scheduler
    }

    async fn execute(&self, meta: Option<RequestMetadata>, req: ExecuteRequest) -> Result<OpStream> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let d = BlobDigest::from_proto_opt(f, req.action_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("action_digest: {e}")))?;
        if !req.skip_cache_lookup {
            let inline = Inline { stdout: req.inline_stdout, stderr: req.inline_stderr, output_files: &req.inline_output_files };
            let hit = self.state.storage.ac_get(&req.instance_name, &d, inline).await?;
            if let Some(result) = hit {
                let resp = ExecuteResponse { result: Some(result), cached_result: true, ..Default::default() };
                let metadata = ExecuteOperationMetadata {
                    stage: execution_stage::Value::Completed as i32,
                    action_digest: Some(d.to_proto()),
                    digest_function: f.to_proto(),
                    ..Default::default()
                };
                let op = LroOperation {
                    name: uuid::Uuid::new_v4().to_string(),
                    metadata: Some(kiln_proto::pack_any(EXECUTE_METADATA, &metadata)),
                    done: true,
                    result: Some(kiln_proto::longrunning::operation::Result::Response(kiln_proto::pack_any(
                        EXECUTE_RESPONSE,
                        &resp,
                    ))),
                };
                return Ok(Box::pin(futures::stream::iter([Ok(op)])));
            }
        }
        let action = load_and_check_inputs(&self.state.storage, d).await?;
        let platform = action
            .platform
            .map(|p| p.properties.into_iter().map(|p| (p.name, p.value)).collect())
            .unwrap_or_default();
        let timeout_ms = action.timeout.map(|t| (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000);
        let request = meta
            .map(|m| RequestInfo {
                tool_name: m.tool_details.as_ref().map(|t| t.tool_name.clone()).unwrap_or_default(),
                tool_version: m.tool_details.map(|t| t.tool_version).unwrap_or_default(),
                invocation_id: m.tool_invocation_id,
                correlated_invocations_id: m.correlated_invocations_id,
            })
            .unwrap_or_default();
        let cmd = Command::Enqueue(EnqueueCmd {
            name: uuid::Uuid::new_v4().to_string(),
            action: ActionKey { instance_name: req.instance_name.clone(), hash: d.hex(), size: d.size as i64, digest_function: f.to_proto() },
            platform,
            priority: req.execution_policy.map(|p| p.priority).unwrap_or(0),
            do_not_cache: action.do_not_cache,
            skip_cache_lookup: req.skip_cache_lookup,
            timeout_ms: timeout_ms.unwrap_or(0),
            request,
            now_ms: kiln_actors::context::now_ms(),
        });
        let name = match self.scheduler().propose(cmd).await? {
            CommandResult::Enqueued { name, joined } => {
                tracing::info!(operation = %name, action = %d, joined, "execution queued");
                name
            }
            other => return Err(KilnError::Internal(format!("unexpected enqueue result {other:?}"))),
        };
        self.follow(&name).await
    }

    /// A stream of the operation's states: the current one, then each change, ending once done.
    /// An operation this node has not applied yet (created through another node a moment ago)
    /// is waited for through a read barrier before NOT_FOUND.
    async fn follow(&self, name: &str) -> Result<OpStream> {
        let sched = self.scheduler().clone();
        if sched.shared.operation(name).is_none() {
            sched.consensus.catch_up(std::time::Duration::from_secs(5)).await;
        }
        let rx = sched.shared.watch(name).ok_or_else(|| KilnError::NotFound(format!("operation {name:?} not found")))?;
        let guard = sched.watch_guard(name);
        let s = futures::stream::unfold((rx, Some(guard), true), |(mut rx, guard, first)| async move {
            let guard = guard?; // dropped after the final message
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let op = rx.borrow_and_update().clone();
            match op {
                None => Some((Err(Status::not_found("operation was deleted")), (rx, None, false))),
                Some(op) => {
                    let done = op.is_done();
                    let next = if done { None } else { Some(guard) };
                    Some((Ok(to_longrunning(&op)), (rx, next, false)))
                }
            }
        });
        Ok(Box::pin(s))
    }
}

/// Loads the Action and checks that its Command and its whole input tree are in the CAS.
async fn load_and_check_inputs(storage: &Storage, d: BlobDigest) -> Result<Action> {
    let missing = |what: &str, ds: Vec<BlobDigest>| KilnError::MissingBlobs { context: what.into(), missing: ds };
    let bytes = storage.read_small(&d).await?.ok_or_else(|| missing(&format!("action {d}"), vec![d]))?;
    let action = Action::decode(bytes).map_err(|e| KilnError::invalid(format!("action {d} does not decode: {e}")))?;
    let f = d.function;
    let cmd = BlobDigest::from_proto_opt(f, action.command_digest.as_ref())
        .map_err(|e| KilnError::invalid(format!("action {d}: command_digest: {e}")))?;
    let root = BlobDigest::from_proto_opt(f, action.input_root_digest.as_ref())
        .map_err(|e| KilnError::invalid(format!("action {d}: input_root_digest: {e}")))?;
    let mut absent = Vec::new();
    match storage.read_small(&cmd).await? {
        Some(b) => {
            ReCommand::decode(b).map_err(|e| KilnError::invalid(format!("command {cmd} does not decode: {e}")))?;
        }
        None => absent.push(cmd),
    }
    let mut files = Vec::new();
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    while let Some(dd) = queue.pop_front() {
        let Some(b) = storage.read_small(&dd).await? else {
            absent.push(dd);
            continue;
        };
        let dir = Directory::decode(b).map_err(|e| KilnError::invalid(format!("input directory {dd} does not decode: {e}")))?;
        for file in &dir.files {
            files.push(
                BlobDigest::from_proto_opt(f, file.digest.as_ref())
                    .map_err(|e| KilnError::invalid(format!("input file {:?} in {dd}: {e}", file.name)))?,
            );
        }
        for sub in &dir.directories {
            let sd = BlobDigest::from_proto_opt(f, sub.digest.as_ref())
                .map_err(|e| KilnError::invalid(format!("input directory {:?} in {dd}: {e}", sub.name)))?;
            if seen.len() >= MAX_INPUT_DIRECTORIES {
                return Err(KilnError::invalid(format!("input tree of action {d} has over {MAX_INPUT_DIRECTORIES} directories")));
            }
            if seen.insert(sd) {
                queue.push_back(sd);
            }
        }
    }
    files.sort();
    files.dedup();
    absent.extend(storage.find_missing(files).await?);
    if !absent.is_empty() {
        return Err(missing(&format!("inputs of action {d}"), absent));
    }
    Ok(action)
}

fn request_metadata<T>(req: &Request<T>) -> Option<RequestMetadata> {
    let v = req.metadata().get_bin(REQUEST_METADATA_HEADER)?;
    let bytes = v.to_bytes().ok()?;
    RequestMetadata::decode(bytes).ok()
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OpStream;

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name,
        action = ?request.get_ref().action_digest.as_ref().map(|d| &d.hash)))]
    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<Self::ExecuteStream>, Status> {
        let start = Instant::now();
        let meta = request_metadata(&request);
        let r = self.execute(meta, request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("Execution.Execute", start, r)
    }

    type WaitExecutionStream = OpStream;

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn wait_execution(&self, request: Request<WaitExecutionRequest>) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let start = Instant::now();
        let r = self.follow(&request.get_ref().name).await.map(Response::new).map_err(Status::from);
        observe("Execution.WaitExecution", start, r)
    }
}
