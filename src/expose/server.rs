//! The HTTP server: `/metrics`, `/healthz`, `/readyz`, with graceful shutdown; paths under
//! `/api/` go to the management API when one is given.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

/// Text exposition format 0.0.4, what Prometheus and VictoriaMetrics scrape.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long in-flight scrapes may take to finish after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the server asks the rest of the exporter.
pub trait Probes: Send + Sync + 'static {
    /// The `/metrics` body, in pieces sent one after another.
    fn metrics(&self) -> Vec<Bytes>;
    /// `Ok` when ready to be scraped, or what is still missing.
    fn ready(&self) -> Result<(), String>;
}

/// Handles every request whose path starts with `/api/` (the management API).
#[async_trait]
pub trait ApiHandler: Send + Sync {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>>;
}

/// A response body of shared pieces: the scores, rendered once per cycle, go out to every
/// concurrent scrape without being copied into a buffer per scrape.
pub struct Chunks {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl Chunks {
    pub fn new(chunks: Vec<Bytes>) -> Chunks {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Chunks { chunks, remaining }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.pop_front().map(|chunk| {
            this.remaining -= chunk.len() as u64;
            Ok(Frame::data(chunk))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// What the server answers with: a plain body, or `/metrics` in pieces.
type ResponseBody = Either<Full<Bytes>, Chunks>;

/// Serves until `shutdown` completes, then lets open connections finish.
pub async fn serve_http<P: Probes>(
    listener: TcpListener,
    probes: Arc<P>,
    api: Option<Arc<dyn ApiHandler>>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let http = hyper::server::conn::http1::Builder::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let probes = probes.clone();
                let api = api.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let probes = probes.clone();
                    let api = api.clone();
                    async move {
                        let response = match api {
                            Some(api) if req.uri().path().starts_with("/api/") => {
                                let had_body = !req.body().is_end_stream();
                                let mut response = api.handle(req).await;
                                let refused = response.status().is_client_error()
                                    || response.status().is_server_error();
                                if had_body && refused {
                                    // A refusal may leave the body unread (too large, no token),
                                    // and hyper then drops the connection; saying so stops a
                                    // client from reusing it and getting a broken reply.
                                    response
                                        .headers_mut()
                                        .insert(CONNECTION, HeaderValue::from_static("close"));
                                }
                                response.map(Either::Left)
                            }
                            _ => route(&*probes, &req),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open connections did not finish within the grace period");
    }
}

fn route<P: Probes>(probes: &P, req: &Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Either::Right(Chunks::new(probes.metrics())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match probes.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/" => text(
            StatusCode::OK,
            "mad exporter: /metrics, /healthz, /readyz\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn chunks_send_every_piece_in_order_with_the_exact_length() {
        let pieces = vec![
            Bytes::from_static(b"# HELP a\n"),
            Bytes::new(),
            Bytes::from_static(b"a 1\n"),
            Bytes::from_static(b"a{x=\"y\"} 2\n"),
        ];
        let body = Chunks::new(pieces);
        assert_eq!(body.size_hint().exact(), Some(24));
        let collected = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(&collected[..], b"# HELP a\na 1\na{x=\"y\"} 2\n");
        assert!(Chunks::new(Vec::new()).is_end_stream());
    }
}
