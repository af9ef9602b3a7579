//! Kiln's storage and request errors, and their one mapping to gRPC status codes.
//!
//! Handlers return [`KilnError`]; the `From<KilnError> for tonic::Status` impl below is the only
//! place that picks a code, following the REAPI's documented codes, and every message names the
//! digest, field or limit at fault.

use crate::digest::{BlobDigest, DigestError};

#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("blob {0} not found")]
    BlobNotFound(BlobDigest),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    /// Blobs an action needs are missing: FAILED_PRECONDITION with a PreconditionFailure listing
    /// each as `blobs/{hash}/{size}`, which is what makes clients upload them and retry.
    #[error("{context}: {} blob(s) missing from the CAS, first {}", missing.len(), missing.first().map(|d| d.to_string()).unwrap_or_default())]
    MissingBlobs { context: String, missing: Vec<BlobDigest> },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("index: {0}")]
    Index(#[from] sled::Error),
    #[error("{0}")]
    Internal(String),
}

impl KilnError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::BlobNotFound(_) | Self::NotFound(_) => Code::NotFound,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::FailedPrecondition(_) | Self::MissingBlobs { .. } => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Io { source, .. } if source.raw_os_error() == Some(28) => Code::ResourceExhausted,
            Self::Io { .. } | Self::Index(_) | Self::Internal(_) => Code::Internal,
        }
    }

    /// The `google.rpc.Status` carried inside batch responses and ExecuteResponses.
    pub fn to_rpc_status(&self) -> kiln_proto::rpc::Status {
        kiln_proto::rpc_status(self.code(), self.to_string(), self.details())
    }

    fn details(&self) -> Vec<kiln_proto::protobuf::Any> {
        use kiln_proto::rpc_details::{precondition_failure::Violation, PreconditionFailure, PRECONDITION_FAILURE};
        match self {
            Self::MissingBlobs { missing, .. } => {
                let violations = missing
                    .iter()
                    .map(|d| Violation {
                        r#type: "MISSING".into(),
                        subject: format!("blobs/{}/{}", d.hex(), d.size),
                        description: String::new(),
                    })
                    .collect();
                vec![kiln_proto::pack_any(PRECONDITION_FAILURE, &PreconditionFailure { violations })]
            }
            _ => vec![],
        }
    }
}

impl From<DigestError> for KilnError {
    fn from(e: DigestError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<KilnError> for tonic::Status {
    fn from(e: KilnError) -> Self {
        let code = e.code();
        if code == tonic::Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        let details = e.details();
        if details.is_empty() {
            tonic::Status::new(code, e.to_string())
        } else {
            use prost::Message;
            let status = kiln_proto::rpc_status(code, e.to_string(), details);
            tonic::Status::with_details(code, e.to_string(), status.encode_to_vec().into())
        }
    }
}

pub type Result<T, E = KilnError> = std::result::Result<T, E>;
