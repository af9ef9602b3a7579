//! The ByteStream Read path without copies in user space.
//!
//! Through tonic's generated server, a 1 MiB chunk read from a blob file was copied twice more
//! before the socket: into the `Vec<u8>` of a `ReadResponse`, then into the encoding buffer. Here
//! the chunk mapped from the file is itself an HTTP/2 DATA frame's payload: each `ReadResponse`
//! goes out as a few bytes of gRPC and protobuf header followed by the chunk, which h2 hands
//! to the socket by vectored write. A `ReadResponse` holds one field, `data` (field 10), so its
//! encoding is that header and the bytes.
//!
//! [`ByteStreamRouter`] serves `google.bytestream.ByteStream`: blob Reads of uncompressed gRPC
//! requests take this path, everything else (Write, QueryWriteStatus, log stream Reads,
//! requests with a `grpc-encoding`) goes to the generated server unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited};
use kiln_proto::bytestream_server::ByteStreamServer;
use kiln_proto::bytestream::ReadRequest;
use prost::Message;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::Status;
use tracing::Instrument;

use super::bytestream::ByteStreamService;
use super::fast_path::{unary_message, FastPath, Handler};
use super::observe;
use crate::cas::BlobChunks;
use crate::logstream;
use crate::metrics as m;

/// A ReadRequest is a resource name and two integers; anything larger is refused unread.
const MAX_READ_REQUEST_BYTES: usize = 64 << 10;
/// Chunks up to this size go out in one buffer with their header: one frame instead of two.
const COALESCE_BYTES: usize = 32 << 10;
/// Protobuf key of `ReadResponse.data`: field 10, length-delimited.
const DATA_KEY: u8 = (10 << 3) | 2;

/// `google.bytestream.ByteStream`, with blob Reads served by [`read`].
pub type ByteStreamRouter = FastPath<ByteStreamServer<ByteStreamService>, BlobRead>;

/// `configure` sets the generated server's limits (message sizes).
pub fn router(
    service: ByteStreamService,
    configure: impl FnOnce(ByteStreamServer<ByteStreamService>) -> ByteStreamServer<ByteStreamService>,
) -> ByteStreamRouter {
    let service = Arc::new(service);
    FastPath::new(configure(ByteStreamServer::from_arc(service.clone())), BlobRead(service))
}

/// The handler of ByteStream Read.
#[derive(Clone)]
pub struct BlobRead(Arc<ByteStreamService>);

impl Handler<ByteStreamServer<ByteStreamService>> for BlobRead {
    const PATH: &'static str = "/google.bytestream.ByteStream/Read";

    fn handle(&self, generated: ByteStreamServer<ByteStreamService>, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        Box::pin(read(self.0.clone(), generated, req))
    }
}

async fn read(
    service: Arc<ByteStreamService>,
    mut generated: ByteStreamServer<ByteStreamService>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let message = match Limited::new(body, MAX_READ_REQUEST_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let status = match e.downcast::<Status>() {
                Ok(s) => *s,
                Err(e) => Status::invalid_argument(format!("ByteStream.Read request: {e}")),
            };
            return Ok(status.into_http());
        }
    };
    let request = match decode_request(&message) {
        Ok(r) => r,
        Err(status) => return Ok(status.into_http()),
    };
    if logstream::classify(&request.resource_name).is_some() {
        // Log streams are followed as they grow: the generated server's path.
        let req = http::Request::from_parts(parts, Body::new(Full::new(message)));
        return generated.call(req).await;
    }
    let start = Instant::now();
    let span = tracing::info_span!("read", resource = %request.resource_name);
    let opened = service.open_read(&request).instrument(span).await.map_err(Status::from);
    Ok(match observe("ByteStream.Read", start, opened) {
        Ok(chunks) => {
            let mut response = http::Response::new(Body::new(ReadBody { chunks, payload: None, done: false }));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            response
        }
        Err(status) => status.into_http(),
    })
}

/// The request's one message, decoded.
fn decode_request(body: &[u8]) -> Result<ReadRequest, Status> {
    let message = unary_message(body, "ByteStream.Read")?;
    ReadRequest::decode(message).map_err(|e| Status::invalid_argument(format!("ByteStream.Read request: {e}")))
}

/// The gRPC message prefix and protobuf field header of a `ReadResponse` holding `len` bytes.
fn response_head(len: usize, capacity: usize) -> BytesMut {
    let field = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
    let mut head = BytesMut::with_capacity(capacity.max(16));
    head.put_u8(0);
    head.put_u32(field as u32);
    head.put_u8(DATA_KEY);
    prost::encoding::encode_varint(len as u64, &mut head);
    head
}

/// The response body: each chunk as one `ReadResponse`, then the status as trailers.
struct ReadBody {
    chunks: BlobChunks,
    /// A chunk whose message header was the last frame sent.
    payload: Option<Bytes>,
    done: bool,
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(p) = this.payload.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let status = match ready!(this.chunks.poll_recv(cx)) {
            Some(Ok(chunk)) => {
                metrics::counter!(m::CAS_BYTES_READ).increment(chunk.len() as u64);
                if chunk.len() <= COALESCE_BYTES {
                    let mut message = response_head(chunk.len(), 16 + chunk.len());
                    message.extend_from_slice(&chunk);
                    return Poll::Ready(Some(Ok(Frame::data(message.freeze()))));
                }
                let head = response_head(chunk.len(), 0).freeze();
                this.payload = Some(chunk);
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Some(Err(e)) => Status::from(e),
            None => Status::ok(""),
        };
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(s) = status.add_header(&mut trailers) {
            tracing::warn!(error = %s, "ByteStream.Read status could not be sent as trailers");
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.payload.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::bytestream::ReadResponse;

    #[test]
    fn a_response_head_and_its_bytes_decode_as_a_read_response() {
        for len in [0usize, 1, 127, 128, 40_000, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = response_head(len, 0).to_vec();
            wire.extend_from_slice(&data);
            assert_eq!(wire[0], 0, "uncompressed");
            let n = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(n, wire.len() - 5, "message length of a {len}-byte chunk");
            let r = ReadResponse::decode(&wire[5..]).unwrap();
            assert_eq!(r.data, data);
        }
    }

    #[test]
    fn a_request_body_must_hold_exactly_one_uncompressed_message() {
        let req = ReadRequest { resource_name: "blobs/ab/1".into(), read_offset: 3, read_limit: 0 };
        let m = req.encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(m.len() as u32).to_be_bytes());
        body.extend_from_slice(&m);
        assert_eq!(decode_request(&body).unwrap(), req);

        let mut compressed = body.clone();
        compressed[0] = 1;
        assert_eq!(decode_request(&compressed).unwrap_err().code(), tonic::Code::InvalidArgument);
        let mut two = body.clone();
        two.extend_from_slice(&body);
        assert_eq!(decode_request(&two).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(decode_request(&body[..3]).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(decode_request(&[]).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
