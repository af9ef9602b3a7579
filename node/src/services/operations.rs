//! google.longrunning Operations over the replicated operation table.

use std::sync::Arc;
use std::time::Instant;

use kiln_proto::longrunning::operations_server::Operations;
use kiln_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest, ListOperationsResponse,
    Operation as LroOperation, WaitOperationRequest,
};
use kiln_raft::command::{Command, CommandResult};
use tonic::{Request, Response, Status};

use super::observe;
use crate::error::{KilnError, Result};
use crate::scheduler::to_longrunning;
use crate::server::NodeState;

/// Operations per page when the client sets no page size, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub struct OperationsService {
    state: Arc<NodeState>,
}

impl OperationsService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    async fn get(&self, name: &str) -> Result<LroOperation> {
        if self.state.scheduler.shared.operation(name).is_none() {
            self.state.scheduler.consensus.catch_up(std::time::Duration::from_secs(5)).await;
        }
        let op = self.state.scheduler.shared.operation(name).ok_or_else(|| KilnError::NotFound(format!("operation {name:?} not found")))?;
        Ok(to_longrunning(&op))
    }

    /// Lists operations by name order, `page_token` being the last name of the previous page.
    fn list(&self, req: &ListOperationsRequest) -> Result<ListOperationsResponse> {
        if req.page_size < 0 {
            return Err(KilnError::invalid(format!("page_size {} is negative", req.page_size)));
        }
        if !req.filter.is_empty() {
            return Err(KilnError::Unimplemented(format!("filter {:?}: operation filters are not supported yet", req.filter)));
        }
        let size = if req.page_size == 0 { DEFAULT_PAGE } else { (req.page_size as usize).min(MAX_PAGE) };
        let (ops, more) = self.state.scheduler.shared.read(|s| {
            use std::ops::Bound;
            let start = if req.page_token.is_empty() { Bound::Unbounded } else { Bound::Excluded(req.page_token.clone()) };
            let mut it = s.sched.ops.range((start, Bound::Unbounded)).map(|(_, o)| to_longrunning(o));
            let page: Vec<LroOperation> = it.by_ref().take(size).collect();
            (page, it.next().is_some())
        });
        let next_page_token = if more { ops.last().map(|o| o.name.clone()).unwrap_or_default() } else { String::new() };
        Ok(ListOperationsResponse { operations: ops, next_page_token, unreachable: vec![] })
    }

    async fn cancel(&self, name: &str) -> Result<()> {
        if self.state.scheduler.shared.operation(name).is_none() {
            return Err(KilnError::NotFound(format!("operation {name:?} not found")));
        }
        let cmd = Command::Cancel { op: name.to_string(), now_ms: kiln_actors::context::now_ms() };
        match self.state.scheduler.propose(cmd).await? {
            CommandResult::Applied(_) => Ok(()), // already finished: cancelling is a no-op
            other => Err(KilnError::Internal(format!("unexpected cancel result {other:?}"))),
        }
    }

    async fn delete(&self, name: &str) -> Result<()> {
        let op = self.state.scheduler.shared.operation(name).ok_or_else(|| KilnError::NotFound(format!("operation {name:?} not found")))?;
        if !op.is_done() {
            // The client is no longer interested: stop the work first, then forget it.
            self.cancel(name).await?;
        }
        self.state.scheduler.propose(Command::Delete { op: name.to_string() }).await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(&self, request: Request<ListOperationsRequest>) -> Result<Response<ListOperationsResponse>, Status> {
        let start = Instant::now();
        let r = self.list(request.get_ref()).map(Response::new).map_err(Status::from);
        observe("Operations.ListOperations", start, r)
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn get_operation(&self, request: Request<GetOperationRequest>) -> Result<Response<LroOperation>, Status> {
        let start = Instant::now();
        let r = self.get(&request.get_ref().name).await.map(Response::new).map_err(Status::from);
        observe("Operations.GetOperation", start, r)
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn delete_operation(&self, request: Request<DeleteOperationRequest>) -> Result<Response<kiln_proto::protobuf::Empty>, Status> {
        let start = Instant::now();
        let r = self.delete(&request.get_ref().name).await.map(|()| Response::new(kiln_proto::protobuf::Empty {})).map_err(Status::from);
        observe("Operations.DeleteOperation", start, r)
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn cancel_operation(&self, request: Request<CancelOperationRequest>) -> Result<Response<kiln_proto::protobuf::Empty>, Status> {
        let start = Instant::now();
        let r = self.cancel(&request.get_ref().name).await.map(|()| Response::new(kiln_proto::protobuf::Empty {})).map_err(Status::from);
        observe("Operations.CancelOperation", start, r)
    }

    async fn wait_operation(&self, request: Request<WaitOperationRequest>) -> Result<Response<LroOperation>, Status> {
        let start = Instant::now();
        let name = request.get_ref().name.clone();
        let timeout = request
            .get_ref()
            .timeout
            .as_ref()
            .map(|t| std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .unwrap_or(std::time::Duration::from_secs(60));
        let r = async {
            let mut rx = self
                .state
                .scheduler
                .shared
                .watch(&name)
                .ok_or_else(|| KilnError::NotFound(format!("operation {name:?} not found")))?;
            let _ = tokio::time::timeout(timeout, rx.wait_for(|o| o.as_ref().is_none_or(|o| o.is_done()))).await;
            self.get(&name).await
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("Operations.WaitOperation", start, r)
    }
}
