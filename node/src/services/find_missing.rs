//! FindMissingBlobs without a string per digest.
//!
//! Through tonic's generated server, each of the (often 10,000) digests of a FindMissingBlobs
//! became a `String` (allocation, copy, UTF-8 check) before its hex was decoded, and each
//! missing one was encoded again for the answer: together a quarter of the node's time in
//! profiles of that call. Here the request is walked where it was received: each hash is
//! decoded from the bytes it arrived in, and each missing digest is answered with the very
//! bytes of its field (`missing_blob_digests` in the response has the field number of
//! `blob_digests` in the request, 2, and the same message type).
//!
//! [`CasRouter`] serves `build.bazel.remote.execution.v2.ContentAddressableStorage`:
//! uncompressed FindMissingBlobs calls take this path, every other method (and requests with a
//! `grpc-encoding`) goes to the generated server unchanged ([`super::fast_path`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use kiln_proto::reapi::FindMissingBlobsResponse;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture};
use tonic::Status;
use tracing::Instrument;

use super::cas::CasService;
use super::fast_path::{unary_message, FastPath, Handler};
use super::observe;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::KilnError;

/// `build.bazel.remote.execution.v2.ContentAddressableStorage`, with FindMissingBlobs served
/// by [`find_missing`].
pub type CasRouter = FastPath<ContentAddressableStorageServer<CasService>, FindMissing>;

/// `max_message` bounds requests and answers of every method.
pub fn router(service: CasService, max_message: usize) -> CasRouter {
    let service = Arc::new(service);
    let generated = ContentAddressableStorageServer::from_arc(service.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    FastPath::new(generated, FindMissing { service, max_message })
}

/// The handler of FindMissingBlobs.
#[derive(Clone)]
pub struct FindMissing {
    service: Arc<CasService>,
    /// Largest request accepted, as the generated server's decoding limit.
    max_message: usize,
}

impl Handler<ContentAddressableStorageServer<CasService>> for FindMissing {
    const PATH: &'static str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

    fn handle(&self, _generated: ContentAddressableStorageServer<CasService>, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        Box::pin(find_missing(self.service.clone(), self.max_message, req))
    }
}

async fn find_missing(service: Arc<CasService>, max_message: usize, req: http::Request<Body>) -> Result<http::Response<Body>, Infallible> {
    let start = Instant::now();
    let answer = match Limited::new(req.into_body(), max_message.saturating_add(5)).collect().await {
        Ok(c) => {
            let body = c.to_bytes();
            match parse_request(&body) {
                Ok(request) => {
                    let span = tracing::info_span!("find_missing_blobs", instance = %request.instance_name, n = request.digests.len());
                    answer(&service, request).instrument(span).await
                }
                Err(status) => Err(status),
            }
        }
        Err(e) => Err(match e.downcast::<Status>() {
            Ok(s) => *s,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Status::out_of_range(format!("FindMissingBlobs request is over the limit of {max_message} bytes"))
            }
            Err(e) => Status::invalid_argument(format!("FindMissingBlobs request: {e}")),
        }),
    };
    Ok(match observe("CAS.FindMissingBlobs", start, answer) {
        Ok(message) => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = [Ok::<_, Status>(Frame::data(message)), Ok(Frame::trailers(trailers))];
            let mut response = http::Response::new(Body::new(StreamBody::new(futures::stream::iter(frames))));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            response
        }
        Err(status) => status.into_http(),
    })
}

/// The checks and the lookup, then the answer as one length-prefixed message.
async fn answer(service: &CasService, request: RawRequest<'_>) -> Result<Bytes, Status> {
    super::check_instance_name(request.instance_name)?;
    let f = DigestFunction::from_request(request.digest_function).map_err(KilnError::from)?;
    let digests: Vec<BlobDigest> = request
        .digests
        .iter()
        .enumerate()
        .map(|(i, d)| BlobDigest::parse_ascii(f, d.hash, d.size).map_err(|e| KilnError::invalid(format!("blob_digests[{i}]: {e}"))))
        .collect::<Result<_, _>>()?;
    let missing = service.missing(digests.clone()).await?;
    // The missing ones come back in request order: each is answered with its request field.
    let mut next = missing.iter().peekable();
    let taken: Vec<bool> = digests.iter().map(|d| next.next_if_eq(&d).is_some()).collect();
    if next.peek().is_some() {
        // Not a subsequence after all: answer plainly rather than drop a missing digest.
        let plain = FindMissingBlobsResponse { missing_blob_digests: missing.iter().map(BlobDigest::to_proto).collect() };
        return Ok(framed(plain.encoded_len(), |out| plain.encode_raw(out)));
    }
    let fields = || request.digests.iter().zip(&taken).filter(|(_, t)| **t).map(|(d, _)| d.field);
    let len = fields().map(<[u8]>::len).sum();
    Ok(framed(len, |out| fields().for_each(|f| out.put_slice(f))))
}

/// A gRPC message of `len` bytes written by `write`, after its 5-byte prefix.
fn framed(len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    write(&mut out);
    debug_assert_eq!(out.len(), 5 + len);
    out.freeze()
}

/// A FindMissingBlobsRequest as slices of the bytes it arrived in.
#[derive(Debug, PartialEq)]
struct RawRequest<'a> {
    instance_name: &'a str,
    digest_function: i32,
    digests: Vec<RawDigest<'a>>,
}

#[derive(Debug, PartialEq)]
struct RawDigest<'a> {
    /// The whole `blob_digests` field: key, length and message.
    field: &'a [u8],
    hash: &'a [u8],
    size: i64,
}

fn bad(what: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("FindMissingBlobs request does not decode: {what}"))
}

/// The one message of a unary request body, walked as protobuf does: unknown fields are
/// skipped, the last value of a repeated scalar wins.
fn parse_request(body: &[u8]) -> Result<RawRequest<'_>, Status> {
    let message = unary_message(body, "FindMissingBlobs")?;
    let mut request = RawRequest { instance_name: "", digest_function: 0, digests: Vec::with_capacity(message.len() / 72) };
    let mut buf = message;
    while !buf.is_empty() {
        let field_start = message.len() - buf.len();
        let (tag, wire_type) = decode_key(&mut buf).map_err(bad)?;
        match (tag, wire_type) {
            (1, WireType::LengthDelimited) => {
                let s = length_delimited(&mut buf)?;
                request.instance_name = std::str::from_utf8(s).map_err(|_| Status::invalid_argument("instance_name is not UTF-8"))?;
            }
            (2, WireType::LengthDelimited) => {
                let i = request.digests.len();
                let m = length_delimited(&mut buf)?;
                let field = &message[field_start..message.len() - buf.len()];
                let (hash, size) = parse_digest(m).map_err(|e| Status::invalid_argument(format!("blob_digests[{i}] does not decode: {e}")))?;
                request.digests.push(RawDigest { field, hash, size });
            }
            (3, WireType::Varint) => request.digest_function = decode_varint(&mut buf).map_err(bad)? as i32,
            (1..=3, w) => return Err(bad(format!("field {tag} has wire type {w:?}"))),
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(bad)?,
        }
    }
    Ok(request)
}

/// A length-delimited field's bytes, after its key.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Status> {
    let len = decode_varint(buf).map_err(bad)?;
    if len > buf.len() as u64 {
        return Err(bad("a field is longer than the message"));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

/// A `Digest` message: its hash bytes (field 1) and size (field 2).
fn parse_digest(mut buf: &[u8]) -> Result<(&[u8], i64), String> {
    let (mut hash, mut size): (&[u8], i64) = (&[], 0);
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        match (tag, wire_type) {
            (1, WireType::LengthDelimited) => hash = length_delimited(&mut buf).map_err(|s| s.message().to_string())?,
            (2, WireType::Varint) => size = decode_varint(&mut buf).map_err(|e| e.to_string())? as i64,
            (1..=2, w) => return Err(format!("field {tag} has wire type {w:?}")),
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|e| e.to_string())?,
        }
    }
    Ok((hash, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{Digest, FindMissingBlobsRequest};

    fn body(m: &impl Message) -> Vec<u8> {
        let mut b = vec![0u8];
        b.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        b.extend_from_slice(&m.encode_to_vec());
        b
    }

    #[test]
    fn requests_parse_in_place_as_prost_decodes_them() {
        let digests: Vec<Digest> = (0..300).map(|i| Digest { hash: format!("{i:064x}"), size_bytes: i * 1000 }).collect();
        let req = FindMissingBlobsRequest { instance_name: "main/x".into(), blob_digests: digests.clone(), digest_function: 1 };
        let b = body(&req);
        let raw = parse_request(&b).unwrap();
        assert_eq!(raw.instance_name, "main/x");
        assert_eq!(raw.digest_function, 1);
        assert_eq!(raw.digests.len(), 300);
        for (r, d) in raw.digests.iter().zip(&digests) {
            assert_eq!(r.hash, d.hash.as_bytes());
            assert_eq!(r.size, d.size_bytes);
            // A field is a whole response entry: it decodes as a response holding that digest.
            let one = FindMissingBlobsResponse::decode(r.field).unwrap();
            assert_eq!(one.missing_blob_digests, vec![d.clone()]);
        }
        // Unknown fields are skipped, a repeated scalar's last value wins, defaults are empty.
        let mut m = Vec::new();
        prost::encoding::string::encode(9, &"ignored".to_string(), &mut m);
        prost::encoding::int32::encode(3, &2, &mut m);
        prost::encoding::int32::encode(3, &1, &mut m);
        let mut d = Vec::new();
        prost::encoding::int64::encode(2, &5, &mut d);
        prost::encoding::string::encode(7, &"x".to_string(), &mut d);
        prost::encoding::string::encode(1, &"ab".to_string(), &mut d);
        prost::encoding::bytes::encode(2, &d, &mut m);
        let mut b = vec![0u8];
        b.extend_from_slice(&(m.len() as u32).to_be_bytes());
        b.extend_from_slice(&m);
        let raw = parse_request(&b).unwrap();
        assert_eq!((raw.instance_name, raw.digest_function), ("", 1));
        assert_eq!((raw.digests[0].hash, raw.digests[0].size), (&b"ab"[..], 5));
        let empty = parse_request(&[0, 0, 0, 0, 0]).unwrap();
        assert!(empty.digests.is_empty());
    }

    #[test]
    fn malformed_requests_are_invalid_arguments() {
        let good = body(&FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![Digest { hash: "a".repeat(64), size_bytes: 1 }],
            digest_function: 0,
        });
        let mut compressed = good.clone();
        compressed[0] = 1;
        let mut two = good.clone();
        two.extend_from_slice(&good);
        let mut cut = good[..good.len() - 3].to_vec();
        cut[1..5].copy_from_slice(&((good.len() - 8) as u32).to_be_bytes());
        let bad_utf8 = {
            let mut m = vec![0x0a, 2, 0xff, 0xfe];
            let mut b = vec![0u8];
            b.extend_from_slice(&(m.len() as u32).to_be_bytes());
            b.append(&mut m);
            b
        };
        let wrong_wire = vec![0, 0, 0, 0, 2, 0x10, 1]; // field 2 as a varint
        for (what, b) in [("compressed", compressed), ("two messages", two), ("cut", cut), ("utf8", bad_utf8), ("wire type", wrong_wire), ("short", vec![0, 0])] {
            let s = parse_request(&b).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
        }
    }
}
