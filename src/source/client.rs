//! `query_range` over HTTP with chunking, retries and errors that say what the server said.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::StatusCode;
use serde::Deserialize;

use super::{align_down, Labels, Series};
use crate::config::{Datasource, Secret};
use crate::text::ellipsize;
use crate::timestamp::MAX_UNIX_SECS;

/// Points per series per request. VictoriaMetrics refuses more than 30,000 and Prometheus more
/// than 11,000, so stay below both.
pub const MAX_POINTS_PER_REQUEST: i64 = 10_000;
/// First retry delay; doubled on every further attempt.
const RETRY_BASE_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// How much of an error body is quoted in messages, in characters, the ellipsis included.
const MAX_QUOTED_BODY: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("datasource {url}: request failed: {message}")]
    Transport { url: String, message: String },
    #[error("datasource {url}: HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    #[error("datasource {url}: query error ({kind}): {message}")]
    Query {
        url: String,
        kind: String,
        message: String,
    },
    #[error("datasource {url}: malformed response: {message}")]
    Malformed { url: String, message: String },
    #[error("invalid datasource setting: {0}")]
    Setup(String),
    #[error("input {input}: {message}")]
    Join { input: String, message: String },
}

impl SourceError {
    /// Short label for the `mad_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Transport { .. } => "datasource_unreachable",
            SourceError::Http { .. } => "datasource_http",
            SourceError::Query { .. } => "datasource_query",
            SourceError::Malformed { .. } => "datasource_malformed",
            SourceError::Setup(_) => "datasource_setup",
            SourceError::Join { .. } => "join_conflict",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            SourceError::Transport { .. } => true,
            SourceError::Http { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// A Prometheus-API client bound to one datasource.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    /// The base URL without credentials, for messages.
    shown_url: String,
    retries: u32,
    basic_auth: Option<(String, Secret)>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    status: String,
    #[serde(default, borrow)]
    data: Option<Data<'a>>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data<'a> {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(borrow)]
    result: Vec<RawSeries<'a>>,
}

#[derive(Deserialize)]
/// Sample values stay borrowed from the response body until parsed (numbers never need JSON
/// escapes): a cold start reads thousands of series × a window of points, and a `String` per
/// value was most of its memory.
struct RawSeries<'a> {
    metric: BTreeMap<String, String>,
    #[serde(default, borrow)]
    values: Vec<(f64, &'a str)>,
}

impl Client {
    pub fn new(ds: &Datasource) -> Result<Client, SourceError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &ds.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SourceError::Setup(format!("invalid header name {name:?}")))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| SourceError::Setup(format!("invalid value for header {name}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if let Some(token) = &ds.bearer_token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| SourceError::Setup("bearer_token has invalid characters".into()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let given = &ds.url.0;
        // Credentials in the URL become basic auth; they must never reach a message.
        let url_auth = (!given.username().is_empty()).then(|| {
            (
                given.username().to_string(),
                Secret::new(given.password().unwrap_or_default()),
            )
        });
        let base = ds.url.without_credentials();
        let basic = ds
            .basic_auth
            .as_ref()
            .map(|b| (b.username.clone(), b.password.clone()))
            .or(url_auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(ds.timeout.0)
            .user_agent(concat!("mad/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SourceError::Setup(e.without_url().to_string()))?;
        let shown_url = base.as_str().trim_end_matches('/').to_string();
        let endpoint = reqwest::Url::parse(&format!("{shown_url}/api/v1/query_range"))
            .map_err(|e| SourceError::Setup(format!("datasource URL: {e}")))?;
        Ok(Client {
            http,
            endpoint,
            shown_url,
            retries: ds.retries,
            basic_auth: basic,
        })
    }

    /// Runs `query` over `[start, end]` (Unix seconds, aligned to `step`), splitting long ranges
    /// into chunks and joining each series' points back together in time order.
    pub fn query_range(
        &self,
        query: &str,
        start: i64,
        end: i64,
        step: i64,
    ) -> impl std::future::Future<Output = Result<Vec<Series>, SourceError>> + Send + '_ {
        let query = query.to_string();
        async move {
            let step = step.max(1);
            let start = align_down(start, step);
            let end = align_down(end, step);
            let mut merged: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
            let mut chunk_start = start;
            while chunk_start <= end {
                let chunk_end = (chunk_start + (MAX_POINTS_PER_REQUEST - 1) * step).min(end);
                for series in self
                    .fetch_chunk(&query, chunk_start, chunk_end, step)
                    .await?
                {
                    merged
                        .entry(series.labels)
                        .or_default()
                        .extend(series.points);
                }
                chunk_start = chunk_end + step;
            }
            Ok(merged
                .into_iter()
                .map(|(labels, mut points)| {
                    points.sort_by_key(|p| p.0);
                    points.dedup_by_key(|p| p.0);
                    Series { labels, points }
                })
                .collect())
        }
    }

    async fn fetch_chunk(
        &self,
        query: &str,
        start: i64,
        end: i64,
        step: i64,
    ) -> Result<Vec<Series>, SourceError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("start", &start.to_string())
            .append_pair("end", &end.to_string())
            .append_pair("step", &step.to_string())
            .finish();
        let mut attempt = 0;
        loop {
            match self.fetch_once(body.clone()).await {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    let delay =
                        (RETRY_BASE_DELAY * 2u32.saturating_pow(attempt)).min(RETRY_MAX_DELAY);
                    tracing::warn!(error = %e, attempt = attempt + 1, ?delay, "retrying datasource request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn fetch_once(&self, body: String) -> Result<Vec<Series>, SourceError> {
        let (status, bytes) = self.post_form(self.endpoint.clone(), body).await?;
        parse_response(status, &bytes).map_err(|failure| match failure {
            Failure::Http(message) => SourceError::Http {
                url: self.shown_url.clone(),
                status: status.as_u16(),
                message,
            },
            Failure::Query { kind, message } => SourceError::Query {
                url: self.shown_url.clone(),
                kind,
                message,
            },
            Failure::Malformed(message) => SourceError::Malformed {
                url: self.shown_url.clone(),
                message,
            },
        })
    }

    /// Asks the datasource whether `query` is valid PromQL (MetricsQL) by running it as an
    /// instant query at the current time: a syntax error comes back as [`SourceError::Query`]
    /// with the server's message.
    pub async fn check_query(&self, query: &str) -> Result<(), SourceError> {
        let url = reqwest::Url::parse(&format!("{}/api/v1/query", self.shown_url))
            .map_err(|e| SourceError::Setup(format!("datasource URL: {e}")))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("time", &now.to_string())
            .finish();
        let (status, bytes) = self.post_form(url, body).await?;
        // Only the status matters: the data may be a vector, a scalar or a string.
        #[derive(Deserialize)]
        struct Outcome {
            status: String,
            #[serde(default, rename = "errorType")]
            error_type: Option<String>,
            #[serde(default)]
            error: Option<String>,
        }
        let envelope: Option<Outcome> = serde_json::from_slice(&bytes).ok();
        let url = self.shown_url.clone();
        match envelope {
            Some(e) if e.status == "success" && status.is_success() => Ok(()),
            Some(e) if e.status == "error" && status.is_client_error() => Err(SourceError::Query {
                url,
                kind: e.error_type.unwrap_or_else(|| "unknown".into()),
                message: e.error.unwrap_or_else(|| "(no message)".into()),
            }),
            Some(e) if e.status == "error" => Err(SourceError::Http {
                url,
                status: status.as_u16(),
                message: format!(
                    "{}: {}",
                    e.error_type.unwrap_or_else(|| "unknown".into()),
                    e.error.unwrap_or_else(|| "(no message)".into())
                ),
            }),
            _ if !status.is_success() => Err(SourceError::Http {
                url,
                status: status.as_u16(),
                message: quote(&bytes),
            }),
            _ => Err(SourceError::Malformed {
                url,
                message: format!("unexpected instant query response: {}", quote(&bytes)),
            }),
        }
    }

    /// POSTs a form with the datasource's credentials; returns the status and the whole body.
    async fn post_form(
        &self,
        url: reqwest::Url,
        body: String,
    ) -> Result<(StatusCode, bytes::Bytes), SourceError> {
        let mut request = self.http.post(url);
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        Ok((status, bytes))
    }

    fn transport(&self, e: reqwest::Error) -> SourceError {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "error"
        };
        let mut causes = String::new();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            causes.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        let message = format!("{what}: {}{causes}", e.without_url());
        SourceError::Transport {
            url: self.shown_url.clone(),
            message,
        }
    }
}

/// Why one response was not usable, before the URL is attached.
#[derive(Debug, PartialEq)]
enum Failure {
    Http(String),
    Query { kind: String, message: String },
    Malformed(String),
}

/// Turns one `query_range` response into series. Separate from the transport so it can be tested
/// on recorded and malformed bodies.
fn parse_response(status: StatusCode, body: &[u8]) -> Result<Vec<Series>, Failure> {
    let envelope: Option<Envelope> = serde_json::from_slice(body).ok();
    let api_error = envelope.as_ref().filter(|e| e.status == "error").map(|e| {
        (
            e.error_type.clone().unwrap_or_else(|| "unknown".into()),
            e.error.clone().unwrap_or_else(|| "(no message)".into()),
        )
    });
    // Overload and server trouble (VictoriaMetrics' "too many concurrent requests" is a 503 with
    // an error body) stay HTTP errors, which are retried; other API errors are the query's fault.
    let server_side = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    match api_error {
        Some((kind, message)) if server_side => {
            return Err(Failure::Http(format!("{kind}: {message}")))
        }
        Some((kind, message)) => return Err(Failure::Query { kind, message }),
        None if !status.is_success() => return Err(Failure::Http(quote(body))),
        None => {}
    }
    let envelope = match envelope {
        Some(e) => e,
        None => {
            let reason = serde_json::from_slice::<Envelope>(body)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(Failure::Malformed(format!(
                "{reason}; body: {}",
                quote(body)
            )));
        }
    };
    if envelope.status != "success" {
        return Err(Failure::Malformed(format!(
            "unexpected status {:?}",
            envelope.status
        )));
    }
    let data = envelope
        .data
        .ok_or_else(|| Failure::Malformed("no \"data\" in a successful response".into()))?;
    if data.result_type != "matrix" {
        return Err(Failure::Malformed(format!(
            "expected resultType \"matrix\", got {:?}",
            data.result_type
        )));
    }
    let mut out = Vec::with_capacity(data.result.len());
    for raw in data.result {
        let mut points = Vec::with_capacity(raw.values.len());
        for (ts, text) in raw.values {
            // Later sums and differences of timestamps stay far from overflowing.
            if !(0.0..=MAX_UNIX_SECS as f64).contains(&ts) {
                return Err(Failure::Malformed(format!(
                    "timestamp {ts} is not Unix seconds between 1970 and 9999"
                )));
            }
            let value: f64 = text.trim().parse().map_err(|_| {
                Failure::Malformed(format!("sample value {text:?} is not a number"))
            })?;
            let value = if value.is_finite() { value } else { f64::NAN };
            points.push((ts.round() as i64, value));
        }
        out.push(Series {
            labels: raw.metric,
            points,
        });
    }
    Ok(out)
}

/// [`parse_response`] for the fuzz targets and their regression test: the status as a number,
/// the failure as text. Not an API.
#[doc(hidden)]
pub fn parse_query_range(status: u16, body: &[u8]) -> Result<Vec<Series>, String> {
    let status = StatusCode::from_u16(status).map_err(|e| e.to_string())?;
    parse_response(status, body).map_err(|f| format!("{f:?}"))
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        ellipsize(text, MAX_QUOTED_BODY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response recorded from VictoriaMetrics 1.79.5.
    const RECORDED: &str = r#"{"status":"success","isPartial":false,"data":{"resultType":"matrix","result":[{"metric":{"__name__":"cpu","instance":"a"},"values":[[1700000000,"1.5"],[1700000060,"NaN"],[1700000120,"+Inf"],[1700000180,"2"]]},{"metric":{"instance":"b"},"values":[[1700000060,"-3e2"]]}]}}"#;

    #[test]
    fn parses_recorded_victoriametrics_response() {
        let series = parse_response(StatusCode::OK, RECORDED.as_bytes()).expect("parses");
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].labels["instance"], "a");
        assert_eq!(series[0].points[0], (1_700_000_000, 1.5));
        assert!(series[0].points[1].1.is_nan());
        assert!(series[0].points[2].1.is_nan(), "+Inf is a gap, not a value");
        assert_eq!(series[0].last_finite(), Some(1_700_000_180));
        assert_eq!(series[1].points, vec![(1_700_000_060, -300.0)]);
        let grid = series[1].on_grid(1_700_000_000, 1_700_000_120, 60);
        assert!(grid[0].is_nan() && grid[1] == -300.0 && grid[2].is_nan());
    }

    #[test]
    fn surfaces_victoriametrics_error_json() {
        let body = br#"{"status":"error","errorType":"422","error":"error when executing query=\"sum(\": unexpected end of input"}"#;
        match parse_response(StatusCode::UNPROCESSABLE_ENTITY, body) {
            Err(Failure::Query { kind, message }) => {
                assert_eq!(kind, "422");
                assert!(message.contains("unexpected end of input"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn overload_with_an_error_body_stays_a_retryable_http_error() {
        let body =
            br#"{"status":"error","errorType":"503","error":"too many concurrent requests"}"#;
        match parse_response(StatusCode::SERVICE_UNAVAILABLE, body) {
            Err(Failure::Http(m)) => assert!(m.contains("too many concurrent requests"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn http_error_quotes_the_body() {
        match parse_response(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>") {
            Err(Failure::Http(m)) => assert!(m.contains("bad gateway")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            br#"{"status":"success"}"#,
            br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"abc"]]}]}}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[["x","1"]]}]}}"#,
            br#"{"status":"weird","data":{"resultType":"matrix","result":[]}}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1e300,"1"]]}]}}"#,
            br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[-60,"1"]]}]}}"#,
            &[0xff, 0xfe, 0x00],
        ];
        for body in cases {
            match parse_response(StatusCode::OK, body) {
                Err(Failure::Malformed(m)) => assert!(!m.is_empty()),
                other => panic!("{:?}: unexpected {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn long_error_bodies_are_cut() {
        let body = vec![b'x'; 10_000];
        match parse_response(StatusCode::INTERNAL_SERVER_ERROR, &body) {
            Err(Failure::Http(m)) => assert!(m.chars().count() <= MAX_QUOTED_BODY),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn transient_errors_are_retried_and_query_errors_not() {
        let http = |status| SourceError::Http {
            url: String::new(),
            status,
            message: String::new(),
        };
        assert!(http(503).is_transient());
        assert!(http(429).is_transient());
        assert!(!http(400).is_transient());
        assert!(!SourceError::Query {
            url: String::new(),
            kind: String::new(),
            message: String::new()
        }
        .is_transient());
    }
}
