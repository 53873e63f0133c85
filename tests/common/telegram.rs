//! A fake Telegram Bot API on loopback: records what the relay sends and fails on command.
//!
//! `sendMessage` and `sendPhoto` (JSON or multipart) are recorded; `getUpdates` answers an empty
//! list after a short long-poll, `getMe` a bot user, `answerCallbackQuery` and `deleteWebhook`
//! `true`; anything else is a 404. Failures are scripted ([`FakeTelegram::plan`]), a
//! deterministic share of 429s ([`FakeTelegram::fail_percent`]), or one call held unanswered
//! ([`FakeTelegram::hold_call`]) so a test can kill the client while Telegram "has not processed"
//! the request yet.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// What the fake does with the next sendMessage.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Ok,
    /// 429 with `parameters.retry_after`.
    RetryAfter(u32),
    /// 400 Bad Request.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct Sent {
    pub chat_id: i64,
    pub text: String,
    pub parse_mode: Option<String>,
    pub reply_to: Option<i64>,
    pub message_id: i64,
    /// `reply_markup` as sent (inline keyboards), `Null` when none.
    pub reply_markup: serde_json::Value,
    /// When the fake took it.
    pub at: Instant,
}

/// A `sendPhoto` the fake accepted.
#[derive(Debug, Clone)]
pub struct Photo {
    pub chat_id: i64,
    pub caption: String,
    pub reply_to: Option<i64>,
    pub message_id: i64,
    /// The uploaded file (empty when the photo was given by URL or file id).
    pub bytes: Vec<u8>,
    pub at: Instant,
}

/// What happened to one sendMessage call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    RetryAfter,
    Refused,
    /// Held unanswered, then released and dropped unrecorded: Telegram never processed it.
    /// (When the client dies first, the server drops the request and nothing is logged at all.)
    Dropped,
}

#[derive(Default)]
struct State {
    plan: VecDeque<Answer>,
    /// Fail this share of calls with 429 (0..=100), after the plan is used up.
    fail_percent: u64,
    /// sendMessage calls so far.
    calls: u64,
    /// Hold the sendMessage call with this number (1-based) until released.
    hold_at: Option<u64>,
    held: bool,
    next_id: i64,
    sent: Vec<Sent>,
    photos: Vec<Photo>,
    outcomes: Vec<(Outcome, Instant)>,
    paths: Vec<String>,
    /// Updates waiting for getUpdates, as the Bot API would deliver them.
    updates: VecDeque<serde_json::Value>,
    next_update: i64,
    /// editMessageText calls: (chat, message id, text).
    edits: Vec<(i64, i64, String)>,
    /// answerCallbackQuery texts.
    answers: Vec<String>,
}

#[derive(Clone)]
pub struct FakeTelegram {
    pub url: String,
    state: Arc<Mutex<State>>,
    release: Arc<Notify>,
    /// Set to true to take the server down: the listener closes and open connections drop.
    down: Arc<Mutex<tokio::sync::watch::Sender<bool>>>,
}

impl FakeTelegram {
    pub async fn start() -> FakeTelegram {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake telegram");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let release = Arc::new(Notify::new());
        let down = serve(listener, state.clone(), release.clone());
        FakeTelegram {
            url,
            state,
            release,
            down: Arc::new(Mutex::new(down)),
        }
    }

    /// Telegram becomes unreachable: connections are refused, open ones reset.
    pub fn go_down(&self) {
        if let Ok(down) = self.down.lock() {
            let _ = down.send(true);
        }
    }

    /// Telegram answers again, at the same address, remembering what it got before.
    pub async fn come_back(&self) {
        let addr = self.url.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .expect("rebind fake telegram on its old port");
        let down = serve(listener, self.state.clone(), self.release.clone());
        if let Ok(mut slot) = self.down.lock() {
            *slot = down;
        }
    }

    fn with<T: Default>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        self.state.lock().map(|mut s| f(&mut s)).unwrap_or_default()
    }

    pub fn plan(&self, answers: &[Answer]) {
        self.with(|s| s.plan.extend(answers));
    }

    /// Answers this share of sendMessage calls with 429 (`retry_after` 1), deterministically:
    /// exactly `percent` of every 100 consecutive calls, spread out.
    pub fn fail_percent(&self, percent: u64) {
        self.with(|s| s.fail_percent = percent);
    }

    /// Holds sendMessage call number `call` (1-based) unanswered until
    /// [`FakeTelegram::release_dropping`]; it is then answered 429 and never recorded.
    pub fn hold_call(&self, call: u64) {
        self.with(|s| s.hold_at = Some(call));
    }

    /// Whether the held call has arrived (and is waiting).
    pub fn held(&self) -> bool {
        self.with(|s| s.held)
    }

    pub fn release_dropping(&self) {
        self.with(|s| s.held = false);
        self.release.notify_waiters();
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.with(|s| s.sent.clone())
    }

    pub fn photos(&self) -> Vec<Photo> {
        self.with(|s| s.photos.clone())
    }

    /// Every sendMessage call's outcome, in order.
    pub fn outcomes(&self) -> Vec<(Outcome, Instant)> {
        self.with(|s| s.outcomes.clone())
    }

    /// Queues an update (without `update_id`, which the fake assigns) for the relay to read.
    pub fn push_update(&self, mut update: serde_json::Value) {
        if let Ok(mut s) = self.state.lock() {
            s.next_update += 1;
            update["update_id"] = s.next_update.into();
            s.updates.push_back(update);
        }
    }

    pub fn edits(&self) -> Vec<(i64, i64, String)> {
        self.state
            .lock()
            .map(|s| s.edits.clone())
            .unwrap_or_default()
    }

    pub fn answers(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.answers.clone())
            .unwrap_or_default()
    }

    pub fn calls(&self) -> u64 {
        self.with(|s| s.calls)
    }

    pub fn paths(&self) -> Vec<String> {
        self.with(|s| s.paths.clone())
    }
}

/// The alerts a relay message names, by the `instance` label on each alert's series line
/// (`<code>name=value, …</code>`), in order of appearance.
pub fn alerts_in(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("<code>")?.strip_suffix("</code>"))
        .filter_map(|labels| {
            labels
                .split(", ")
                .find_map(|pair| pair.strip_prefix("instance="))
        })
        .map(str::to_string)
        .collect()
}

/// The alerts a message counts but does not show ("… and N more").
pub fn hidden_in(text: &str) -> usize {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("… and ")?.strip_suffix(" more"))
        .filter_map(|n| n.trim().parse::<usize>().ok())
        .sum()
}

/// Accepts connections until the returned sender says down.
fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    release: Arc<Notify>,
) -> tokio::sync::watch::Sender<bool> {
    let (down, is_down) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let mut stop = is_down.clone();
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|down| *down) => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let (state, release) = (state.clone(), release.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (state, release) = (state.clone(), release.clone());
                    async move { Ok::<_, Infallible>(handle(state, release, req).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    _ = stop.wait_for(|down| *down) => {}
                }
            });
        }
    });
    down
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn ok(result: serde_json::Value) -> Response<Full<Bytes>> {
    json(200, serde_json::json!({"ok": true, "result": result}))
}

fn too_many(secs: u32) -> Response<Full<Bytes>> {
    json(
        429,
        serde_json::json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry later",
                           "parameters": {"retry_after": secs}}),
    )
}

/// The fields of a `multipart/form-data` body, by name.
fn multipart(content_type: &str, body: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut fields = BTreeMap::new();
    let Some(boundary) = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
    else {
        return fields;
    };
    let delimiter = format!("--{}", boundary.trim_matches('"'));
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(at) = find(rest, delimiter) {
        parts.push(&rest[..at]);
        rest = &rest[at + delimiter.len()..];
    }
    for part in parts.into_iter().skip(1) {
        let Some(split) = find(part, b"\r\n\r\n") else {
            continue;
        };
        let headers = String::from_utf8_lossy(&part[..split]);
        let mut content = &part[split + 4..];
        if content.ends_with(b"\r\n") {
            content = &content[..content.len() - 2];
        }
        let name = headers
            .split(';')
            .find_map(|h| h.trim().strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_string());
        if let Some(name) = name {
            fields.insert(name, content.to_vec());
        }
    }
    fields
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A sendPhoto request's fields as JSON values, whether it came as JSON or multipart.
fn photo_fields(content_type: &str, body: &[u8]) -> (serde_json::Value, Vec<u8>) {
    if content_type.starts_with("multipart/") {
        let fields = multipart(content_type, body);
        let text = |k: &str| {
            fields
                .get(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let parsed = |k: &str| {
            text(k).map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)))
        };
        let request = serde_json::json!({
            "chat_id": parsed("chat_id"),
            "caption": text("caption"),
            "reply_parameters": parsed("reply_parameters"),
            "reply_to_message_id": parsed("reply_to_message_id"),
        });
        // The file is its own part, named by `attach://<name>` in the `photo` field (teloxide),
        // or the `photo` part itself.
        let photo = fields.get("photo").cloned().unwrap_or_default();
        let file = std::str::from_utf8(&photo)
            .ok()
            .and_then(|p| p.strip_prefix("attach://"))
            .and_then(|name| fields.get(name).cloned())
            .unwrap_or(photo);
        (request, file)
    } else {
        (serde_json::from_slice(body).unwrap_or_default(), Vec::new())
    }
}

fn reply_to(request: &serde_json::Value) -> Option<i64> {
    request["reply_parameters"]["message_id"]
        .as_i64()
        .or_else(|| request["reply_to_message_id"].as_i64())
}

async fn handle(
    state: Arc<Mutex<State>>,
    release: Arc<Notify>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let method = path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if let Ok(mut s) = state.lock() {
        s.paths.push(path.clone());
    }
    match method.as_str() {
        "sendmessage" => send_message(state, release, &body).await,
        "sendphoto" => {
            let (request, bytes) = photo_fields(&content_type, &body);
            let Ok(mut s) = state.lock() else {
                return too_many(1);
            };
            s.next_id += 1;
            let message_id = s.next_id;
            let chat_id = request["chat_id"].as_i64().unwrap_or_default();
            s.photos.push(Photo {
                chat_id,
                caption: request["caption"].as_str().unwrap_or_default().to_string(),
                reply_to: reply_to(&request),
                message_id,
                bytes,
                at: Instant::now(),
            });
            ok(
                serde_json::json!({"message_id": message_id, "date": 1_700_000_000,
                "chat": {"id": chat_id, "type": "private"},
                "photo": [{"file_id": "f", "file_unique_id": "u", "width": 1, "height": 1}]}),
            )
        }
        "getupdates" => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let offset = request["offset"].as_i64().unwrap_or(0);
            let pending: Vec<serde_json::Value> = match state.lock() {
                Ok(mut s) => {
                    s.updates
                        .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
                    s.updates.iter().cloned().collect()
                }
                Err(_) => Vec::new(),
            };
            if pending.is_empty() {
                let wait = request["timeout"].as_u64().unwrap_or(0).min(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            ok(serde_json::json!(pending))
        }
        "editmessagetext" => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let chat_id = request["chat_id"].as_i64().unwrap_or_default();
            let message_id = request["message_id"].as_i64().unwrap_or_default();
            let text = request["text"].as_str().unwrap_or_default().to_string();
            if let Ok(mut s) = state.lock() {
                s.edits.push((chat_id, message_id, text.clone()));
            }
            ok(
                serde_json::json!({"message_id": message_id, "date": 1_700_000_000,
                "chat": {"id": chat_id, "type": "private"}, "text": text}),
            )
        }
        "answercallbackquery" => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Ok(mut s) = state.lock() {
                s.answers
                    .push(request["text"].as_str().unwrap_or_default().to_string());
            }
            ok(serde_json::json!(true))
        }
        "getme" => ok(
            serde_json::json!({"id": 424242, "is_bot": true, "first_name": "mad", "username": "mad_bot"}),
        ),
        "deletewebhook" => ok(serde_json::json!(true)),
        _ => json(
            404,
            serde_json::json!({"ok": false, "error_code": 404, "description": "Not Found"}),
        ),
    }
}

async fn send_message(
    state: Arc<Mutex<State>>,
    release: Arc<Notify>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let hold = {
        let Ok(mut s) = state.lock() else {
            return too_many(1);
        };
        s.calls += 1;
        if s.hold_at == Some(s.calls) {
            s.held = true;
            true
        } else {
            false
        }
    };
    if hold {
        // Until the test releases it (by then the client is usually gone): never processed.
        let released = release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if state.lock().is_ok_and(|s| s.held) {
            released.await;
        }
        if let Ok(mut s) = state.lock() {
            s.outcomes.push((Outcome::Dropped, Instant::now()));
        }
        return too_many(1);
    }
    let Ok(mut s) = state.lock() else {
        return too_many(1);
    };
    let answer = match s.plan.pop_front() {
        Some(a) => a,
        // Deterministic share of failures: 7919 is prime to 100, so any 100 consecutive call
        // numbers hit every residue once and exactly `fail_percent` of them fail.
        None if s.fail_percent > 0 && (s.calls * 7919) % 100 < s.fail_percent => {
            Answer::RetryAfter(1)
        }
        None => Answer::Ok,
    };
    match answer {
        Answer::RetryAfter(secs) => {
            s.outcomes.push((Outcome::RetryAfter, Instant::now()));
            too_many(secs)
        }
        Answer::Refuse => {
            s.outcomes.push((Outcome::Refused, Instant::now()));
            json(
                400,
                serde_json::json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
            )
        }
        Answer::Ok => {
            let chat_id = request["chat_id"].as_i64().unwrap_or_default();
            s.next_id += 1;
            let message_id = s.next_id;
            let now = Instant::now();
            s.outcomes.push((Outcome::Ok, now));
            s.sent.push(Sent {
                chat_id,
                text: request["text"].as_str().unwrap_or_default().to_string(),
                parse_mode: request["parse_mode"].as_str().map(str::to_string),
                reply_to: reply_to(&request),
                message_id,
                reply_markup: request["reply_markup"].clone(),
                at: now,
            });
            ok(
                serde_json::json!({"message_id": message_id, "date": 1_700_000_000,
                "chat": {"id": chat_id, "type": "private"}, "text": request["text"]}),
            )
        }
    }
}
