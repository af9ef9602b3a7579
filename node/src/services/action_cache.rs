//! REAPI ActionCache: results of executed actions, by action digest and instance name.

use std::sync::Arc;
use std::time::Instant;

use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use tonic::{Request, Response, Status};

use super::{check_instance_name, observe};
use crate::storage::Inline;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::metrics as m;
use crate::server::NodeState;

pub struct ActionCacheService {
    state: Arc<NodeState>,
}

impl ActionCacheService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    async fn get(&self, req: GetActionResultRequest) -> Result<ActionResult> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let d = BlobDigest::from_proto_opt(f, req.action_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("action_digest: {e}")))?;
        let instance = req.instance_name.clone();
        let inline = Inline { stdout: req.inline_stdout, stderr: req.inline_stderr, output_files: &req.inline_output_files };
        let found = self.state.storage.ac_get(&req.instance_name, &d, inline).await?;
        match found {
            Some(r) => {
                metrics::counter!(m::AC_HITS).increment(1);
                Ok(r)
            }
            None => {
                metrics::counter!(m::AC_MISSES).increment(1);
                Err(KilnError::NotFound(format!("no action result for action {d} in instance {instance:?}")))
            }
        }
    }

    async fn update(&self, req: UpdateActionResultRequest) -> Result<ActionResult> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let d = BlobDigest::from_proto_opt(f, req.action_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("action_digest: {e}")))?;
        let result = req.action_result.ok_or_else(|| KilnError::invalid(format!("action_result is missing (action {d})")))?;
        let stored = self.state.storage.ac_update(&req.instance_name, &d, result).await?;
        metrics::counter!(m::AC_UPDATES).increment(1);
        Ok(stored)
    }
}

// Debug spans: at the default `info` filter an Action Cache call, the most frequent and
// smallest there is, builds none (they were 3 % of the node's time in the AC mix).
#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    #[tracing::instrument(level = "debug", skip_all, fields(instance = %request.get_ref().instance_name,
        action = ?request.get_ref().action_digest.as_ref().map(|d| &d.hash)))]
    async fn get_action_result(&self, request: Request<GetActionResultRequest>) -> Result<Response<ActionResult>, Status> {
        let start = Instant::now();
        let r = self.get(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ActionCache.GetActionResult", start, r)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(instance = %request.get_ref().instance_name,
        action = ?request.get_ref().action_digest.as_ref().map(|d| &d.hash)))]
    async fn update_action_result(&self, request: Request<UpdateActionResultRequest>) -> Result<Response<ActionResult>, Status> {
        let start = Instant::now();
        let r = self.update(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ActionCache.UpdateActionResult", start, r)
    }
}
