//! One method of a gRPC service served by a handler of Kiln's own, every other call by the
//! service's generated server: the paths where tonic's decoding or encoding was the cost
//! (ByteStream Read in `bytestream_read.rs`, FindMissingBlobs in `find_missing.rs`).
//!
//! Only uncompressed calls (no `grpc-encoding`) take the handler; the generated server handles
//! compression, as for every other method.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::Status;

/// Serves one method; `G` is the generated server it may hand a call back to.
pub trait Handler<G>: Clone + Send + Sync + 'static {
    /// The method's path, `/package.Service/Method`.
    const PATH: &'static str;

    fn handle(&self, generated: G, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible>;
}

/// A gRPC service whose method [`Handler::PATH`] goes to `H`, the rest to the generated `G`.
#[derive(Clone)]
pub struct FastPath<G, H> {
    generated: G,
    handler: H,
}

impl<G, H> FastPath<G, H> {
    pub fn new(generated: G, handler: H) -> Self {
        Self { generated, handler }
    }
}

impl<G: NamedService, H> NamedService for FastPath<G, H> {
    const NAME: &'static str = G::NAME;
}

impl<G, H> Service<http::Request<Body>> for FastPath<G, H>
where
    G: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    G::Future: Send + 'static,
    H: Handler<G>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != H::PATH || !plain_grpc(req.headers()) {
            return Box::pin(self.generated.call(req));
        }
        self.handler.handle(self.generated.clone(), req)
    }
}

/// A gRPC request whose messages are not compressed.
fn plain_grpc(headers: &http::HeaderMap) -> bool {
    let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let grpc = content_type == "application/grpc" || content_type == "application/grpc+proto";
    let encoding = headers.get("grpc-encoding").and_then(|v| v.to_str().ok()).unwrap_or("identity");
    grpc && encoding == "identity"
}

/// The one length-prefixed message of a unary request body (`method` names the call in errors).
pub fn unary_message<'a>(body: &'a [u8], method: &str) -> Result<&'a [u8], Status> {
    let Some((head, message)) = body.split_first_chunk::<5>() else {
        return Err(Status::invalid_argument(format!("{method} request has no message")));
    };
    if head[0] != 0 {
        return Err(Status::invalid_argument(format!("{method} request is compressed without a grpc-encoding")));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len != message.len() {
        return Err(Status::invalid_argument(format!(
            "{method} request body holds {} bytes after a message of {len}: one message expected",
            message.len()
        )));
    }
    Ok(message)
}
