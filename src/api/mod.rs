//! The management API under `/api/v1/` on the exporter's HTTP server (docs/openapi.yaml).
//!
//! This module routes, authenticates, reads bodies and turns every failure into a JSON
//! `{"error": "..."}`; one submodule per resource does the work through [`Registry`] and
//! [`ModelStore`], never with SQL of its own.

mod anomalies;
mod detectors;
mod models;
mod training;
mod windows;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{Config, DetectorName, Secret};
use crate::expose::ApiHandler;
use crate::registry::Registry;
use crate::source::{Client, Labels};
use crate::store::{ModelStore, PgStore, StoreError};

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Rows a listing returns when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 100;
/// Latest timestamp accepted anywhere (9999-12-31T23:59:59Z), in Unix seconds.
pub const MAX_TIMESTAMP: i64 = crate::timestamp::MAX_UNIX_SECS;
const PREFIX: &str = "/api/v1";

/// The management API, with the PostgreSQL store behind it.
pub struct Api {
    config: Config,
    registry: Registry,
    models: Arc<dyn ModelStore>,
    datasource: Client,
    token: Option<Secret>,
    public_reads: bool,
}

/// What answers `/api/` when the exporter runs without PostgreSQL.
pub struct Unavailable;

#[async_trait]
impl ApiHandler for Unavailable {
    async fn handle(&self, _req: Request<Incoming>) -> Response<Full<Bytes>> {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the management API needs the PostgreSQL store: set store.postgres in the config",
        )
        .into_response()
    }
}

impl Api {
    /// Builds the API on its own connection pool to `config.store.postgres`; `models` is the
    /// exporter's model store (the same database).
    pub async fn connect(
        config: &Config,
        models: Arc<dyn ModelStore>,
        datasource: Client,
    ) -> Result<Api, StoreError> {
        // `from_config` refuses a config without store.postgres.
        let store = Arc::new(PgStore::from_config(&config.store).await?);
        let token = config
            .server
            .api_token
            .clone()
            .filter(|t| !t.expose().is_empty());
        Ok(Api {
            registry: Registry::new(store),
            models,
            datasource,
            public_reads: config.server.api_public_reads,
            token,
            config: config.clone(),
        })
    }

    /// Whether `name` is a detector of the config file.
    fn in_config(&self, name: &str) -> bool {
        self.config.detector(name).is_some()
    }

    fn authorize(&self, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
        if !write && self.public_reads {
            return Ok(());
        }
        let Some(token) = &self.token else {
            let what = if write { "writes" } else { "reads" };
            let hint = if write {
                ""
            } else {
                " (or server.api_public_reads: true)"
            };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("{what} are disabled: set server.api_token in the config{hint}"),
            ));
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match given {
            Some(t) if token.matches(t.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("invalid bearer token")),
            None => Err(ApiError::unauthorized(
                "missing Authorization: Bearer <server.api_token> header",
            )),
        }
    }

    async fn dispatch(&self, route: Route, req: Request<Incoming>) -> Reply {
        let query = req.uri().query().unwrap_or_default().to_string();
        let method = req.method().clone();
        match (route, method) {
            (Route::Detectors, Method::GET) => {
                Params::parse(&query, &[])?;
                detectors::list(self).await
            }
            (Route::Detectors, _) => detectors::create(self, read_json(req).await?).await,
            (Route::Detector(name), Method::PUT) => {
                detectors::replace(self, &name, read_json(req).await?).await
            }
            (Route::Detector(name), _) => detectors::delete(self, &name).await,
            (Route::Retrain(name), _) => training::retrain(self, &name).await,
            (Route::TrainingRequests, _) => {
                training::list(self, &Params::parse(&query, training::PARAMS)?).await
            }
            (Route::Models, _) => models::list(self, &Params::parse(&query, models::PARAMS)?).await,
            (Route::Activate(name), _) => {
                models::activate(self, &name, read_json(req).await?).await
            }
            (Route::Rollback(name), _) => models::rollback(self, &name).await,
            (Route::Anomalies, _) => {
                let params = Params::parse_with_matchers(&query, anomalies::PARAMS)?;
                anomalies::list(self, &params).await
            }
            (Route::Windows, Method::GET) => {
                windows::list(self, &Params::parse(&query, windows::PARAMS)?).await
            }
            (Route::Windows, _) => windows::create(self, read_json(req).await?).await,
            (Route::Window(id), _) => windows::delete(self, &id).await,
        }
    }
}

#[async_trait]
impl ApiHandler for Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let Some(route) = Route::parse(&path) else {
            return ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
                .into_response();
        };
        let allowed = route.methods();
        if !allowed.contains(&method) {
            let list = allowed
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            let mut response = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}; use {list}"),
            )
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&list) {
                response.headers_mut().insert(ALLOW, value);
            }
            return response;
        }
        let write = method != Method::GET;
        let result = match self.authorize(req.headers(), write) {
            Ok(()) => self.dispatch(route, req).await,
            Err(e) => Err(e),
        };
        let response = result.unwrap_or_else(ApiError::into_response);
        let status = response.status();
        if status.is_server_error() {
            tracing::warn!(%method, %path, %status, "management API request failed");
        } else if write && status.is_success() {
            tracing::info!(%method, %path, %status, "management API change");
        } else {
            tracing::debug!(%method, %path, %status, "management API request");
        }
        response
    }
}

/// The endpoints, with the path segments they carry.
#[derive(Debug, Clone, PartialEq)]
enum Route {
    Detectors,
    Detector(String),
    Retrain(String),
    Models,
    Activate(String),
    Rollback(String),
    Anomalies,
    Windows,
    Window(String),
    TrainingRequests,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let rest = path.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        let owned = |s: &str| s.to_string();
        Some(match segments.as_slice() {
            ["detectors"] => Route::Detectors,
            ["detectors", name] if !name.is_empty() => Route::Detector(owned(name)),
            ["detectors", name, "retrain"] if !name.is_empty() => Route::Retrain(owned(name)),
            ["models"] => Route::Models,
            ["models", name, "activate"] if !name.is_empty() => Route::Activate(owned(name)),
            ["models", name, "rollback"] if !name.is_empty() => Route::Rollback(owned(name)),
            ["anomalies"] => Route::Anomalies,
            ["maintenance-windows"] => Route::Windows,
            ["maintenance-windows", id] if !id.is_empty() => Route::Window(owned(id)),
            ["training-requests"] => Route::TrainingRequests,
            _ => return None,
        })
    }

    fn methods(&self) -> &'static [Method] {
        match self {
            Route::Detectors | Route::Windows => &[Method::GET, Method::POST],
            Route::Detector(_) => &[Method::PUT, Method::DELETE],
            Route::Retrain(_) | Route::Activate(_) | Route::Rollback(_) => &[Method::POST],
            Route::Window(_) => &[Method::DELETE],
            Route::Models | Route::Anomalies | Route::TrainingRequests => &[Method::GET],
        }
    }
}

/// A failed request: its status and a message naming what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

type Reply = Result<Response<Full<Bytes>>, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }

    fn unauthorized(message: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = json(self.status, &serde_json::json!({ "error": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"mad\""),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Database { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database unavailable: {e}"),
            ),
            StoreError::NotFound(message) => ApiError::not_found(message),
            StoreError::Io { .. } | StoreError::Corrupt(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The request body, at most [`MAX_BODY_BYTES`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// The body as `T`; errors name the field (`step: invalid duration ...`).
async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    parse_json(&read_body(req).await?)
}

/// What [`read_json`] does once the body is read.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        if field == "." || field.is_empty() {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("{field}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// Everything a request goes through before the database or the datasource is asked, with the
/// functions [`Api::dispatch`] and the handlers call: the route and method, the query parameters
/// and the JSON body with its checks. `target` is the request-target (`/api/v1/...?...`).
/// For the fuzz targets and their regression test; not an API.
#[doc(hidden)]
pub fn check_request(method: &str, target: &str, body: &[u8]) -> Result<(), String> {
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let uri: hyper::Uri = target.parse().map_err(|e| format!("{e}"))?;
    let query = uri.query().unwrap_or_default();
    let route = Route::parse(uri.path()).ok_or("no such endpoint")?;
    if !route.methods().contains(&method) {
        return Err(format!("{method} is not allowed"));
    }
    let checked = match (route, method) {
        (Route::Detectors, Method::GET) => Params::parse(query, &[]).map(drop),
        (Route::Detectors, _) => parse_json(body).and_then(|body: serde_json::Value| {
            let name = detectors::name_of(&body)?;
            detectors::check_spec(&name, body).map(drop)
        }),
        (Route::Detector(name), Method::PUT) => detector_name("name", &name)
            .and_then(|name| detectors::check_spec(&name.0, parse_json(body)?).map(drop)),
        (Route::Detector(name) | Route::Retrain(name) | Route::Rollback(name), _) => {
            detector_name("name", &name).map(drop)
        }
        (Route::TrainingRequests, _) => {
            Params::parse(query, training::PARAMS).and_then(|p| p.limit().map(drop))
        }
        (Route::Models, _) => {
            Params::parse(query, models::PARAMS).and_then(|p| models::detector_param(&p).map(drop))
        }
        (Route::Activate(name), _) => {
            parse_json(body).and_then(|body| models::check_activate(&name, &body).map(drop))
        }
        (Route::Anomalies, _) => Params::parse_with_matchers(query, anomalies::PARAMS)
            .and_then(|p| anomalies::query(&p).map(drop)),
        (Route::Windows, Method::GET) => {
            Params::parse(query, windows::PARAMS).and_then(|p| windows::range(&p).map(drop))
        }
        (Route::Windows, _) => parse_json(body).and_then(|new| windows::validate(&new)),
        (Route::Window(id), _) => windows::parse_id(&id).map(drop),
    };
    checked.map_err(|e| e.message)
}

/// PostgreSQL refuses NUL in text and JSONB: say so instead of failing in the database.
fn no_nul(field: &str, text: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        Err(ApiError::bad_request(format!(
            "{field}: must not contain NUL characters"
        )))
    } else {
        Ok(())
    }
}

/// A Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`): nothing else can match a series.
fn label_name(field: &str, name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{field}: {name:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        )))
    }
}

/// A detector name from a path or a parameter.
fn detector_name(field: &str, text: &str) -> Result<DetectorName, ApiError> {
    DetectorName::parse(text).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))
}

/// Query parameters: each at most once, unknown ones refused.
#[derive(Debug, Default)]
struct Params {
    values: BTreeMap<String, String>,
    /// `match[LABEL]=VALUE` pairs.
    matchers: Labels,
}

impl Params {
    fn parse(query: &str, known: &[&str]) -> Result<Params, ApiError> {
        Params::parse_inner(query, known, false)
    }

    fn parse_with_matchers(query: &str, known: &[&str]) -> Result<Params, ApiError> {
        Params::parse_inner(query, known, true)
    }

    fn parse_inner(query: &str, known: &[&str], matchers: bool) -> Result<Params, ApiError> {
        let mut params = Params::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            no_nul(&key, &key)?;
            no_nul(&key, &value)?;
            if matchers {
                if let Some(label) = key.strip_prefix("match[").and_then(|k| k.strip_suffix(']')) {
                    label_name(&key, label)?;
                    if params
                        .matchers
                        .insert(label.to_string(), value.to_string())
                        .is_some()
                    {
                        return Err(ApiError::bad_request(format!(
                            "{key}: given more than once"
                        )));
                    }
                    continue;
                }
            }
            if !known.contains(&key.as_ref()) {
                let mut expected = known.join(", ");
                if matchers {
                    expected.push_str(", match[LABEL]");
                }
                if expected.is_empty() {
                    expected = "none".into();
                }
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {key:?} (expected: {expected})"
                )));
            }
            if params
                .values
                .insert(key.to_string(), value.to_string())
                .is_some()
            {
                return Err(ApiError::bad_request(format!(
                    "{key}: given more than once"
                )));
            }
        }
        Ok(params)
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// An integer in `[min, max]`, if given.
    fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(text) = self.text(key) else {
            return Ok(None);
        };
        let n: i64 = text.trim().parse().map_err(|_| {
            ApiError::bad_request(format!("{key}: expected an integer, got {text:?}"))
        })?;
        if !(min..=max).contains(&n) {
            return Err(ApiError::bad_request(format!(
                "{key}: must be between {min} and {max}, got {n}"
            )));
        }
        Ok(Some(n))
    }

    /// A timestamp in Unix seconds, if given.
    fn time(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.int(key, 0, MAX_TIMESTAMP)
    }

    fn limit(&self) -> Result<i64, ApiError> {
        Ok(self
            .int("limit", 1, crate::registry::MAX_PAGE)?
            .unwrap_or(DEFAULT_LIMIT))
    }
}

/// Refuses `from` after `to`.
fn check_range(from: Option<i64>, to: Option<i64>) -> Result<(), ApiError> {
    match (from, to) {
        (Some(f), Some(t)) if f > t => Err(ApiError::bad_request(format!(
            "from: must not be after to ({f} > {t})"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(Route::parse("/api/v1/detectors"), Some(Route::Detectors));
        assert_eq!(
            Route::parse("/api/v1/detectors/cpu/retrain"),
            Some(Route::Retrain("cpu".into()))
        );
        assert_eq!(
            Route::parse("/api/v1/models/cpu/activate"),
            Some(Route::Activate("cpu".into()))
        );
        for bad in [
            "/api/v1",
            "/api/v1/",
            "/api/v1/detectors/",
            "/api/v1/detectors//retrain",
            "/api/v2/detectors",
            "/api/v1/nope",
            "/api/v1/models/cpu",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad}");
        }
        assert!(Route::Detector("x".into())
            .methods()
            .contains(&Method::DELETE));
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(crate::config::constant_time_eq(b"secret", b"secret"));
        assert!(!crate::config::constant_time_eq(b"secret", b"secreT"));
        assert!(!crate::config::constant_time_eq(b"secret", b"secret2"));
        assert!(!crate::config::constant_time_eq(b"", b"x"));
        assert!(crate::config::constant_time_eq(b"", b""));
    }

    #[test]
    fn params_refuse_unknown_duplicate_and_bad_values() {
        let p = Params::parse_with_matchers(
            "detector=cpu&match[instance]=a%20b&match[job]=x&limit=5",
            &["detector", "limit"],
        )
        .expect("valid");
        assert_eq!(p.text("detector"), Some("cpu"));
        assert_eq!(p.matchers["instance"], "a b");
        assert_eq!(p.limit().expect("limit"), 5);
        assert!(Params::parse("limit=1&limit=2", &["limit"]).is_err());
        assert!(Params::parse("lmit=1", &["limit"]).is_err());
        assert!(Params::parse("match[a]=1", &["limit"]).is_err());
        let p = Params::parse("limit=0", &["limit"]).expect("parses");
        assert!(p.limit().is_err());
        let p = Params::parse("limit=abc", &["limit"]).expect("parses");
        assert!(p.limit().unwrap_err().message.contains("limit"));
        assert!(Params::parse("x=%00", &["x"]).is_err());
        for bad in ["match[]=x", "match[a][b]=x", "match[1a]=x", "match[a-b]=x"] {
            assert!(Params::parse_with_matchers(bad, &[]).is_err(), "{bad}");
        }
    }
}
