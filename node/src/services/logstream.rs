//! build.bazel.remote.logstream.v1 LogStreamService: workers create the streams of a running
//! action's stdout and stderr here; see [`crate::logstream`] for names, reads and writes.

use std::sync::Arc;
use std::time::Instant;

use kiln_proto::logstream::log_stream_service_server::LogStreamService;
use kiln_proto::logstream::{CreateLogStreamRequest, LogStream};
use tonic::{Request, Response, Status};

use super::observe;
use crate::logstream::name_for_parent;
use crate::server::NodeState;

pub struct LogStreamServiceImpl {
    state: Arc<NodeState>,
}

impl LogStreamServiceImpl {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl LogStreamService for LogStreamServiceImpl {
    async fn create_log_stream(&self, request: Request<CreateLogStreamRequest>) -> Result<Response<LogStream>, Status> {
        let start = Instant::now();
        let r = name_for_parent(&request.into_inner().parent).map_err(Status::from).map(|name| {
            let token = self.state.logs.create(&name);
            Response::new(LogStream { write_resource_name: format!("{name}/{token}"), name })
        });
        observe("CreateLogStream", start, r)
    }
}
