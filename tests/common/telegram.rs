//! A fake Telegram Bot API on loopback: records what the relay sends and fails on command.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

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
}

#[derive(Default)]
struct State {
    plan: VecDeque<Answer>,
    /// Fail this share of calls with 429 (0..=100), after the plan is used up.
    fail_percent: u64,
    calls: u64,
    sent: Vec<Sent>,
    paths: Vec<String>,
}

#[derive(Clone)]
pub struct FakeTelegram {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeTelegram {
    pub async fn start() -> FakeTelegram {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake telegram");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeTelegram { url, state }
    }

    pub fn plan(&self, answers: &[Answer]) {
        if let Ok(mut s) = self.state.lock() {
            s.plan.extend(answers);
        }
    }

    pub fn fail_percent(&self, percent: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.fail_percent = percent;
        }
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.state
            .lock()
            .map(|s| s.sent.clone())
            .unwrap_or_default()
    }

    pub fn calls(&self) -> u64 {
        self.state.lock().map(|s| s.calls).unwrap_or_default()
    }

    pub fn paths(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.paths.clone())
            .unwrap_or_default()
    }
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

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = match state.lock() {
        Ok(s) => s,
        Err(_) => {
            return json(
                200,
                serde_json::json!({"ok": false, "error_code": 400, "description": "poisoned"}),
            )
        }
    };
    s.paths.push(path.clone());
    if !path.to_ascii_lowercase().ends_with("/sendmessage") {
        return json(
            404,
            serde_json::json!({"ok": false, "error_code": 404, "description": "Not Found"}),
        );
    }
    s.calls += 1;
    let answer = match s.plan.pop_front() {
        Some(a) => a,
        // Deterministic share of failures: every call whose number falls in the share.
        None if s.fail_percent > 0 && (s.calls * 7919) % 100 < s.fail_percent => {
            Answer::RetryAfter(1)
        }
        None => Answer::Ok,
    };
    match answer {
        Answer::RetryAfter(secs) => json(
            429,
            serde_json::json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry later",
                               "parameters": {"retry_after": secs}}),
        ),
        Answer::Refuse => json(
            400,
            serde_json::json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
        ),
        Answer::Ok => {
            let chat_id = request["chat_id"].as_i64().unwrap_or_default();
            let message_id = s.sent.len() as i64 + 1;
            s.sent.push(Sent {
                chat_id,
                text: request["text"].as_str().unwrap_or_default().to_string(),
                parse_mode: request["parse_mode"].as_str().map(str::to_string),
                reply_to: request["reply_parameters"]["message_id"].as_i64(),
                message_id,
            });
            json(
                200,
                serde_json::json!({"ok": true, "result": {"message_id": message_id, "date": 1_700_000_000,
                    "chat": {"id": chat_id, "type": "private"}, "text": request["text"]}}),
            )
        }
    }
}
