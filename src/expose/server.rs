//! The HTTP server: `/metrics`, `/healthz`, `/readyz`, with graceful shutdown; paths under
//! `/api/` go to the management API when one is given.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
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
    /// The full `/metrics` body.
    fn metrics(&self) -> String;
    /// `Ok` when ready to be scraped, or what is still missing.
    fn ready(&self) -> Result<(), String>;
}

/// Handles every request whose path starts with `/api/` (the management API).
#[async_trait]
pub trait ApiHandler: Send + Sync {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>>;
}

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
                                api.handle(req).await
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

fn route<P: Probes>(probes: &P, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, probes.metrics());
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
