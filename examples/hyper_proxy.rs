//! The baseline of the head-to-head benchmark (`benches/proxy/run.sh`): a
//! round-robin reverse proxy written with hyper's server and hyper-util's
//! pooled client alone, without tower-ha (no failover, no health checks, no
//! `X-Forwarded-For`, hop-by-hop headers passed on as they came). It shows
//! what the HTTP stack costs by itself; it is not a proxy to deploy.
//!
//! ```sh
//! cargo run --release --example hyper_proxy -- \
//!     --listen 127.0.0.1:8080 http://127.0.0.1:9001 http://127.0.0.1:9002
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, Uri};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

// The same allocator as `reverse_proxy`, so that the two differ only in
// what serves the requests.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// How to call the example.
const USAGE: &str = "usage: hyper_proxy [--listen ADDR] http://HOST:PORT...";

/// Prints what went wrong and how to call the example, and exits.
fn usage(problem: &str) -> ! {
    eprintln!("{problem}\n{USAGE}");
    std::process::exit(2);
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mut backends = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_else(|| usage("--listen needs a socket address"));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => {
                let authority = arg
                    .parse::<Uri>()
                    .ok()
                    .filter(|uri| uri.scheme_str() == Some("http"))
                    .and_then(|uri| uri.into_parts().authority)
                    .unwrap_or_else(|| usage(&format!("not a backend URL: {arg}")));
                backends.push(authority);
            }
        }
    }
    if backends.is_empty() {
        usage("give at least one backend URL");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(serve(listen, backends));
}

async fn serve(listen: SocketAddr, backends: Vec<Authority>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let backends: Arc<[(Authority, HeaderValue)]> = backends
        .into_iter()
        .map(|a| {
            let host = HeaderValue::from_str(a.as_str()).expect("an authority is a valid Host");
            (a, host)
        })
        .collect();
    let next = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| usage(&format!("cannot listen on {listen}: {e}")));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: retrying at once would
            // spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, backends, next) = (client.clone(), backends.clone(), next.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (authority, host) =
                    &backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(authority.clone())
                    .path_and_query(path)
                    .build()
                    .expect("a URI from a valid authority and path");
                *req.uri_mut() = uri;
                req.headers_mut().insert(http::header::HOST, host.clone());
                let client = client.clone();
                async move {
                    Ok::<_, Infallible>(match client.request(req).await {
                        Ok(resp) => resp.map(|b| b.boxed()),
                        Err(_) => status(StatusCode::BAD_GATEWAY),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = code;
    resp
}
