//! REAPI Capabilities: what this server supports, so clients pick digest function, batch
//! sizes and compression without guessing.

use std::time::Instant;

use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::{
    self, compressor, priority_capabilities::PriorityRange, symlink_absolute_path_strategy, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities,
};
use kiln_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::digest::DigestFunction;
use crate::server::NodeState;

pub struct CapabilitiesService {
    state: std::sync::Arc<NodeState>,
}

impl CapabilitiesService {
    pub fn new(state: std::sync::Arc<NodeState>) -> Self {
        Self { state }
    }
}

fn semver(major: i32, minor: i32) -> SemVer {
    SemVer { major, minor, patch: 0, prerelease: String::new() }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_capabilities(&self, request: Request<GetCapabilitiesRequest>) -> Result<Response<ServerCapabilities>, Status> {
        let start = Instant::now();
        let r = super::check_instance_name(&request.get_ref().instance_name).map_err(Status::from).map(|()| {
            let functions: Vec<i32> = DigestFunction::ALL.iter().map(|f| f.to_proto()).collect();
            let priorities = Some(PriorityCapabilities { priorities: vec![PriorityRange { min_priority: 0, max_priority: 0 }] });
            Response::new(ServerCapabilities {
                cache_capabilities: Some(CacheCapabilities {
                    digest_functions: functions.clone(),
                    action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities { update_enabled: true }),
                    cache_priority_capabilities: priorities.clone(),
                    max_batch_total_size_bytes: self.state.cfg.limits.max_batch_total_size_bytes as i64,
                    symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                    supported_compressors: vec![compressor::Value::Zstd as i32],
                    supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                    max_cas_blob_size_bytes: 0,
                    split_blob_support: false,
                    splice_blob_support: false,
                    fast_cdc_2020_params: None,
                    rep_max_cdc_params: None,
                }),
                execution_capabilities: Some(ExecutionCapabilities {
                    digest_function: DigestFunction::Sha256.to_proto(),
                    // Every node serves Execution; work runs wherever workers are attached.
                    exec_enabled: true,
                    execution_priority_capabilities: priorities,
                    supported_node_properties: vec![],
                    digest_functions: functions,
                }),
                deprecated_api_version: None,
                low_api_version: Some(semver(2, 0)),
                high_api_version: Some(semver(2, 3)),
            })
        });
        super::observe("Capabilities.GetCapabilities", start, r)
    }
}
