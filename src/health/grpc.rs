//! [`GrpcProbe`]: the gRPC health checking protocol's `Check`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE, TE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use super::error::{NotServing, UnexpectedStatus};
use super::probe::{send, Probe, ProbeFuture};
use crate::backend::BackendId;
use crate::classify::{parse_grpc_status, GRPC_STATUS};
use crate::error::BoxError;

/// The method every gRPC health service answers.
const CHECK: &str = "/grpc.health.v1.Health/Check";

/// The most of an answer read: a `HealthCheckResponse` takes a few bytes.
const MAX_ANSWER: usize = 64 * 1024;

/// `ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// The [gRPC health checking protocol]'s `Check`
/// (`grpc.health.v1.Health`), sent *through the backend's own service*, as
/// an [`HttpProbe`](super::HttpProbe) is: the backend passes when the call
/// succeeds and the status it answers is `SERVING`.
///
/// The backend must speak gRPC, over HTTP/2: an
/// [`HttpBackend`](crate::http::HttpBackend) of a client made
/// `http2_only` (feature `http2`), say. The request (`POST
/// /grpc.health.v1.Health/Check`, under the backend's base path if it has
/// one) asks about the server as a whole, or about one service of it
/// ([`service`](Self::service)); its body is made with `B::from(bytes)`.
/// At most 64 KiB of the answer is read.
///
/// A call that fails (a server without the health service answers
/// `UNIMPLEMENTED`, 12; one that does not know the service, `NOT_FOUND`,
/// 5), or whose status is `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`,
/// fails the probe with [`NotServing`]; an answer that is not a gRPC one
/// (another HTTP status, a message cut short or compressed, no
/// `grpc-status`) fails it with an error that says what was wrong.
///
/// ```
/// # #[cfg(feature = "http2")] {
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_ha::health::{GrpcProbe, HealthChecker};
/// use tower_ha::http::{HttpBackend, HttpClient};
/// use tower_ha::Pool;
///
/// let client = HttpClient::<Full<Bytes>>::new().http2_only(true);
/// let pool = Pool::new();
/// pool.insert("a", HttpBackend::new(&client, "http://10.0.0.5:50051")?);
/// // Checks the `inventory.Stock` service of each backend.
/// let checker = HealthChecker::new(pool, GrpcProbe::new().service("inventory.Stock"));
/// # drop(checker);
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [gRPC health checking protocol]: https://github.com/grpc/grpc/blob/master/doc/health-checking.md
pub struct GrpcProbe<B> {
    /// The service asked about; empty for the server as a whole.
    service: Arc<str>,
    /// The request's body: one message, framed.
    request: Bytes,
    _body: PhantomData<fn() -> B>,
}

impl<B> GrpcProbe<B> {
    /// Asks about the server as a whole (the empty service name).
    pub fn new() -> Self {
        GrpcProbe::for_service(Arc::from(""))
    }

    /// Asks about `service` (a fully qualified name such as
    /// `"inventory.Stock"`) instead.
    pub fn service(self, service: &str) -> Self {
        GrpcProbe::for_service(Arc::from(service))
    }

    fn for_service(service: Arc<str>) -> Self {
        GrpcProbe {
            request: check_request(&service),
            service,
            _body: PhantomData,
        }
    }

    /// The service asked about; empty for the server as a whole.
    pub fn service_name(&self) -> &str {
        &self.service
    }
}

impl<B> Default for GrpcProbe<B> {
    fn default() -> Self {
        GrpcProbe::new()
    }
}

impl<B> Clone for GrpcProbe<B> {
    fn clone(&self) -> Self {
        GrpcProbe {
            service: self.service.clone(),
            request: self.request.clone(),
            _body: PhantomData,
        }
    }
}

impl<B> fmt::Debug for GrpcProbe<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcProbe")
            .field("service", &self.service)
            .finish()
    }
}

impl<S, B, RB> Probe<S> for GrpcProbe<B>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    fn probe(&self, _id: &BackendId, service: &S) -> ProbeFuture {
        let mut request = Request::new(B::from(self.request.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(CHECK);
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        let mut service = service.clone();
        Box::pin(async move {
            let response = send(&mut service, request).await?;
            if response.status() != StatusCode::OK {
                return Err(UnexpectedStatus::new(response.status()).into());
            }
            // A call that failed at once ends in its head.
            if let Some(code) = grpc_status(response.headers())? {
                return Err(match code {
                    0 => malformed("no message"),
                    code => NotServing::new(code, None).into(),
                });
            }
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await?;
            let code = match answer.trailers() {
                Some(trailers) => grpc_status(trailers)?,
                None => None,
            };
            match code {
                Some(0) => {}
                Some(code) => return Err(NotServing::new(code, None).into()),
                None => return Err(malformed("no grpc-status")),
            }
            let status = serving_status(answer.to_bytes())?;
            if status == SERVING {
                Ok(())
            } else {
                Err(NotServing::new(0, Some(status)).into())
            }
        })
    }
}

/// A `HealthCheckRequest` for `service`, [framed]: field 1 (`service`, a
/// string), left out when empty as proto3 does.
fn check_request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(1 << 3 | 2);
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    framed(&message)
}

/// `message`, framed as gRPC sends one: a byte saying it is not
/// compressed, then its length (4 bytes, big-endian).
fn framed(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(message);
    framed.freeze()
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Reads a varint; `None` when `buf` ends before it does, or it runs past
/// 64 bits (ten bytes, the last of which holds one bit): a longer one
/// would be read with its high bits dropped, as a `SERVING` perhaps.
fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *buf.first()?;
        buf.advance(1);
        if i == 9 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// The `grpc-status` of `headers`, if they have one; an error when it is
/// not a number.
fn grpc_status(headers: &HeaderMap) -> Result<Option<u32>, BoxError> {
    match headers.get(GRPC_STATUS) {
        None => Ok(None),
        Some(value) => parse_grpc_status(value)
            .map(Some)
            .ok_or_else(|| malformed("a grpc-status that is not a number")),
    }
}

/// The `status` (field 1) of the first message of `body`, a
/// `HealthCheckResponse`: `UNKNOWN` (0) when the message leaves it out;
/// the last one when it has several, as protobuf reads them.
fn serving_status(mut body: Bytes) -> Result<u64, BoxError> {
    if body.len() < 5 {
        return Err(malformed("no message"));
    }
    if body.get_u8() != 0 {
        return Err(malformed(
            "a compressed message, which the probe did not ask for",
        ));
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err(malformed("a message cut short"));
    }
    let mut message = body.split_to(len);
    let mut status = 0;
    while !message.is_empty() {
        let key = get_varint(&mut message).ok_or_else(|| malformed("a field cut short"))?;
        let skipped = match (key >> 3, key & 7) {
            (1, 0) => {
                status = get_varint(&mut message).ok_or_else(|| malformed("a field cut short"))?;
                continue;
            }
            (_, 0) => get_varint(&mut message).map(|_| 0),
            (_, 1) => Some(8),
            (_, 2) => get_varint(&mut message).and_then(|n| usize::try_from(n).ok()),
            (_, 5) => Some(4),
            _ => return Err(malformed("a field of an unknown wire type")),
        };
        match skipped {
            Some(n) if n <= message.len() => message.advance(n),
            _ => return Err(malformed("a field cut short")),
        }
    }
    Ok(status)
}

fn malformed(what: &str) -> BoxError {
    format!("not a gRPC health check answer: {what}").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_health_check_requests() {
        assert_eq!(&check_request("")[..], [0, 0, 0, 0, 0]);
        assert_eq!(
            &check_request("inventory.Stock")[..],
            b"\x00\x00\x00\x00\x11\x0a\x0finventory.Stock"
        );
        let long = "s".repeat(300);
        let request = check_request(&long);
        // A length of 300 takes two bytes of varint.
        assert_eq!(&request[..8], [0, 0, 0, 1, 47, 0x0a, 0xac, 0x02]);
        assert_eq!(request.len(), 5 + 3 + 300);
    }

    #[test]
    fn the_status_is_read_from_its_field() {
        assert_eq!(serving_status(framed(b"\x08\x01")).unwrap(), 1);
        assert_eq!(serving_status(framed(b"\x08\x02")).unwrap(), 2);
        // Left out: UNKNOWN.
        assert_eq!(serving_status(framed(b"")).unwrap(), 0);
        // Fields of other numbers and of every wire type are skipped; the
        // last status wins.
        let message = b"\x08\x02\x10\x96\x01\x19\x01\x02\x03\x04\x05\x06\x07\x08\
                        \x22\x03abc\x2d\x01\x02\x03\x04\x08\x01";
        assert_eq!(serving_status(framed(message)).unwrap(), 1);
        // Bytes after the first message are not read.
        let mut two = BytesMut::from(&framed(b"\x08\x01")[..]);
        two.put_slice(&framed(b"\x08\x02"));
        assert_eq!(serving_status(two.freeze()).unwrap(), 1);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for (body, why) in [
            (Bytes::new(), "no message"),
            (Bytes::from_static(b"\x00\x00\x00"), "no message"),
            (
                Bytes::from_static(b"\x01\x00\x00\x00\x02\x08\x01"),
                "compressed",
            ),
            (
                Bytes::from_static(b"\x00\x00\x00\x00\x09\x08\x01"),
                "cut short",
            ),
            (framed(b"\x08"), "cut short"),
            (
                framed(b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
                "cut short",
            ),
            // 1 with bits past 64: not read as 1.
            (
                framed(b"\x08\x81\x80\x80\x80\x80\x80\x80\x80\x80\x02"),
                "cut short",
            ),
            (framed(b"\x22\x05ab"), "cut short"),
            (
                framed(b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
                "cut short",
            ),
            (framed(b"\x19\x01"), "cut short"),
            (framed(b"\x0b"), "unknown wire type"),
            (framed(b"\x0c"), "unknown wire type"),
        ] {
            let err = serving_status(body.clone()).unwrap_err().to_string();
            assert!(err.contains(why), "{body:?}: {err}");
        }
    }

    #[test]
    fn grpc_status_must_be_a_number() {
        let status = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(GRPC_STATUS, HeaderValue::from_bytes(value).unwrap());
            grpc_status(&headers)
        };
        assert_eq!(status(b"0").unwrap(), Some(0));
        assert_eq!(status(b"14").unwrap(), Some(14));
        for bad in [&b""[..], b"+1", b"-1", b"1 ", b"x", b"99999999999"] {
            assert!(status(bad).is_err(), "{bad:?}");
        }
        assert_eq!(grpc_status(&HeaderMap::new()).unwrap(), None);
    }
}
