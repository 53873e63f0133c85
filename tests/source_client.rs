//! What a user of the datasource client relies on, checked against a real VictoriaMetrics where
//! the behaviour is VictoriaMetrics' own (chunking, NaN and gaps, query errors) and against raw
//! TCP listeners where a misbehaving server is needed (timeouts, 503 then success, error JSON,
//! what headers are actually sent).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mad::config::Config;
use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;
use mad::source::{Client, Series, SourceError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A config whose `datasource:` is the given YAML flow mapping.
fn config(datasource: &str) -> Config {
    let text = format!(
        "datasource: {datasource}\ndetectors:\n  - {{ name: t, query: up, step: 1s, window: 4, train_range: 1h }}\n"
    );
    Config::parse(&text, Path::new("x.yaml")).expect("test config is valid")
}

fn client(datasource: &str) -> Client {
    Client::new(&config(datasource).datasource).expect("client")
}

fn series_named<'a>(all: &'a [Series], key: &str, value: &str) -> &'a Series {
    all.iter()
        .find(|s| s.labels.get(key).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no series with {key}={value:?} in {all:?}"))
}

/// A TCP proxy in front of `upstream` (`http://host:port`) that counts the `query_range`
/// requests passing through it, whatever connection they share. VictoriaMetrics' own request
/// counters lag behind, so they cannot be used for exact counts.
async fn counting_proxy(upstream: &str) -> (String, Arc<AtomicUsize>) {
    const PATTERN: &[u8] = b"/api/v1/query_range";
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let counter = counter.clone();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            tokio::spawn(async move {
                let mut tail: Vec<u8> = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match client_read.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // Matches lying wholly in `tail` are shorter than PATTERN, so none counts twice.
                    tail.extend_from_slice(&chunk[..n]);
                    let found = tail
                        .windows(PATTERN.len())
                        .filter(|w| *w == PATTERN)
                        .count();
                    counter.fetch_add(found, Ordering::SeqCst);
                    let keep = tail.len().min(PATTERN.len() - 1);
                    tail.drain(..tail.len() - keep);
                    if server_write.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = server_write.shutdown().await;
            });
        }
    });
    (url, count)
}

// ---------------------------------------------------------------------------------------------
// Against a real VictoriaMetrics
// ---------------------------------------------------------------------------------------------

/// The value of the full series at `t` seconds after its start: exact in decimal and binary.
fn full_value(i: i64) -> f64 {
    (i % 977) as f64 * 0.5 + 1.0
}

fn partial_value(i: i64) -> f64 {
    -((i % 313) as f64) * 0.25
}

/// 36,000 points at 1 s: more than VictoriaMetrics' 30,000 points per series per request, so
/// only a chunking client can read the range. A second series exists only in the second half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ranges_are_chunked_and_joined_exactly_once_in_order() {
    const POINTS: i64 = 36_000;
    const PARTIAL_FROM: i64 = 18_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let t0 = now() - POINTS - 3_600;
    let mut body = String::with_capacity(3 * 1024 * 1024);
    for i in 0..POINTS {
        let ms = (t0 + i) * 1000;
        body.push_str(&format!(
            "chunk_test{{kind=\"full\"}} {} {ms}\n",
            full_value(i)
        ));
        if i >= PARTIAL_FROM {
            body.push_str(&format!(
                "chunk_test{{kind=\"partial\"}} {} {ms}\n",
                partial_value(i)
            ));
        }
    }
    vm.import(body).await.expect("import");
    let end = t0 + POINTS - 1;

    // The premise: VictoriaMetrics refuses this range in one request.
    let unchunked = vm.query_range("chunk_test", t0, end, 1).await;
    assert!(
        unchunked.is_err(),
        "VictoriaMetrics answered {POINTS} points in one request; the test no longer proves chunking"
    );

    let (proxy, requests) = counting_proxy(&vm.url).await;
    let result = client(&format!("{{ url: \"{proxy}\", retries: 0 }}"))
        .query_range("chunk_test", t0, end, 1)
        .await
        .expect("chunked query succeeds");
    let requests = requests.load(Ordering::SeqCst);
    assert_eq!(
        requests, 4,
        "36,000 points in chunks of 10,000 take 4 requests"
    );
    assert_eq!(
        result.len(),
        2,
        "two series: {:?}",
        result.iter().map(|s| &s.labels).collect::<Vec<_>>()
    );

    let full = series_named(&result, "kind", "full");
    assert_eq!(
        full.labels.get("__name__").map(String::as_str),
        Some("chunk_test")
    );
    assert_eq!(
        full.points.len(),
        POINTS as usize,
        "every point exactly once"
    );
    for (i, &(ts, v)) in full.points.iter().enumerate() {
        let i = i as i64;
        assert_eq!(ts, t0 + i, "point {i} out of order or missing");
        assert_eq!(v, full_value(i), "value at t0+{i}");
    }

    let partial = series_named(&result, "kind", "partial");
    assert_eq!(
        partial.points.len(),
        (POINTS - PARTIAL_FROM) as usize,
        "the partial series has points only where it existed; first {:?}",
        partial.points.first()
    );
    for (k, &(ts, v)) in partial.points.iter().enumerate() {
        let i = PARTIAL_FROM + k as i64;
        assert_eq!(ts, t0 + i, "partial point {k}");
        assert_eq!(v, partial_value(i), "partial value at t0+{i}");
    }
    vm.stop().await;
}

/// Samples with NaN and +Inf values and a 100 s hole: the client reports a gap where the data has
/// one (no point or NaN), never an invented number, and does not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_values_and_gaps_come_back_as_gaps() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let t0 = (now() - 7_200) / 10 * 10;
    let mut body = String::new();
    for i in 0..=40i64 {
        if (20..30).contains(&i) {
            continue; // the hole: t0+200 .. t0+290 have no samples
        }
        let value = match i {
            10 => "NaN".to_string(),
            12 => "+Inf".to_string(),
            _ => i.to_string(),
        };
        body.push_str(&format!("gap_test {value} {}\n", (t0 + i * 10) * 1000));
    }
    vm.import(body).await.expect("import");

    let result = client(&format!("{{ url: \"{}\", retries: 0 }}", vm.url))
        .query_range("gap_test", t0, t0 + 400, 10)
        .await
        .expect("query succeeds");
    assert_eq!(result.len(), 1, "{result:?}");
    let points = &result[0].points;
    let at = |ts: i64| points.iter().find(|p| p.0 == ts).map(|p| p.1);

    // Timestamps strictly increasing, all on the step grid.
    assert!(points.windows(2).all(|w| w[0].0 < w[1].0), "{points:?}");
    assert!(points.iter().all(|p| (p.0 - t0) % 10 == 0), "{points:?}");
    // Ordinary samples come back as they were.
    for i in [0i64, 5, 9, 11, 13, 19, 30, 35, 40] {
        assert_eq!(at(t0 + i * 10), Some(i as f64), "sample {i}: {points:?}");
    }
    // +Inf is not a usable value: NaN (a gap) or nothing, never infinite.
    let inf = at(t0 + 120);
    assert!(inf.is_none_or(f64::is_nan), "+Inf came back as {inf:?}");
    // NaN: VictoriaMetrics 1.79 drops NaN samples and fills the step from the previous sample
    // (9); the client must not turn it into anything else.
    let nan = at(t0 + 100);
    assert!(
        nan.is_none_or(|v| v.is_nan() || v == 9.0),
        "NaN sample came back as {nan:?}"
    );
    // The hole: VictoriaMetrics may carry the last value one step (t0+200); inside, nothing.
    for ts in (t0 + 210..=t0 + 290).step_by(10) {
        let v = at(ts);
        assert!(
            v.is_none_or(f64::is_nan),
            "gap at t0+{} came back as {v:?}",
            ts - t0
        );
    }
    // Every sample's grid cell, via on_grid, agrees.
    let grid = result[0].on_grid(t0, t0 + 400, 10);
    assert_eq!(grid.len(), 41);
    assert!(grid[21..30].iter().all(|v| v.is_nan()), "{grid:?}");
    assert!(grid.iter().all(|v| !v.is_infinite()), "{grid:?}");
    vm.stop().await;
}

/// `sum(` is a syntax error: the client reports VictoriaMetrics' own message as a query error and
/// sends the request once (counted by a proxy), although `retries` is 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promql_syntax_error_surfaces_victoriametrics_message_without_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    let end = now() / 10 * 10;
    let start = end - 600;

    // What VictoriaMetrics itself says about this query.
    let raw: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/query_range", vm.url))
        .query(&[
            ("query", "sum(".to_string()),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("step", "10".to_string()),
        ])
        .send()
        .await
        .expect("raw request")
        .json()
        .await
        .expect("VictoriaMetrics answers JSON");
    let vm_text = raw["error"].as_str().expect("error text").to_string();
    // The parser's part of the message (the rest repeats the query and range).
    let parser_text = vm_text
        .split("cannot execute query: ")
        .nth(1)
        .unwrap_or(&vm_text)
        .to_string();

    let (proxy, requests) = counting_proxy(&vm.url).await;
    let started = Instant::now();
    let err = client(&format!("{{ url: \"{proxy}\", retries: 3 }}"))
        .query_range("sum(", start, end, 10)
        .await
        .expect_err("a syntax error is an error");
    let elapsed = started.elapsed();
    let requests = requests.load(Ordering::SeqCst);

    let message = err.to_string();
    assert!(
        matches!(err, SourceError::Query { .. } | SourceError::Http { .. }),
        "expected a query error, got {err:?}"
    );
    assert!(
        message.contains(&parser_text),
        "message does not carry VictoriaMetrics' text {parser_text:?}: {message}"
    );
    assert!(
        message.contains(&proxy),
        "message names the datasource: {message}"
    );
    assert_eq!(requests, 1, "a syntax error is not retried ({elapsed:?})");
    vm.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Against raw TCP listeners
// ---------------------------------------------------------------------------------------------

/// One request as a listener saw it: head (request line and headers) and body.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Reads one HTTP/1.1 request (head and Content-Length body); `None` if the peer went away.
async fn read_request(stream: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let seen = Seen { head };
    let length: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(seen)
}

fn http_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What the listener does with the n-th connection.
#[derive(Clone)]
enum Behaviour {
    /// Read the request, answer this.
    Answer(String),
    /// Read the request, close without answering.
    Close,
    /// Accept and never answer (the connection is kept open).
    Hang,
}

/// A listener on loopback that treats connection n with `script[n]` (the last entry repeats) and
/// records the requests it read.
async fn listener(script: Vec<Behaviour>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut n = 0;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let behaviour = script[n.min(script.len() - 1)].clone();
            n += 1;
            match behaviour {
                Behaviour::Hang => held.push(stream),
                Behaviour::Close | Behaviour::Answer(_) => {
                    let record = record.clone();
                    tokio::spawn(async move {
                        if let Some(request) = read_request(&mut stream).await {
                            record.lock().unwrap().push(request);
                            if let Behaviour::Answer(response) = behaviour {
                                let _ = stream.write_all(response.as_bytes()).await;
                            }
                            let _ = stream.shutdown().await;
                        }
                    });
                }
            }
        }
    });
    (url, seen)
}

const OK_BODY: &str = r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"__name__":"m","instance":"a"},"values":[[1000,"1.5"],[1010,"2"]]}]}}"#;

fn expected_ok() -> Vec<Series> {
    vec![Series {
        labels: [("__name__", "m"), ("instance", "a")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        points: vec![(1000, 1.5), (1010, 2.0)],
    }]
}

/// Nobody listens: a transport error naming the URL, after `retries` retries with backoff
/// (0.2 s + 0.4 s at least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_datasource_is_a_transport_error_retried_with_backoff() {
    let port = free_port().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let err = client(&format!("{{ url: \"{url}\", timeout: 2s, retries: 2 }}"))
        .query_range("up", 1000, 1100, 10)
        .await
        .expect_err("nobody listens");
    let elapsed = started.elapsed();
    assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
    assert_eq!(err.kind(), "datasource_unreachable");
    let message = err.to_string();
    assert!(message.contains(&url), "message names the URL: {message}");
    assert!(
        elapsed >= Duration::from_millis(600),
        "2 retries back off 0.2 s + 0.4 s, took only {elapsed:?}"
    );
}

/// The number of attempts is exactly 1 + retries: a listener that reads each request and hangs up
/// counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_attempted_exactly_one_plus_retries_times() {
    let (url, seen) = listener(vec![Behaviour::Close]).await;
    let started = Instant::now();
    let err = client(&format!("{{ url: \"{url}\", timeout: 2s, retries: 2 }}"))
        .query_range("up", 1000, 1100, 10)
        .await
        .expect_err("the server hangs up");
    let elapsed = started.elapsed();
    assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
    assert_eq!(seen.lock().unwrap().len(), 3, "1 attempt + 2 retries");
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
}

/// A server that accepts and never answers: with `timeout: 1s, retries: 0` the call fails with a
/// transport error that says it timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out() {
    let (url, _) = listener(vec![Behaviour::Hang]).await;
    let started = Instant::now();
    let err = client(&format!("{{ url: \"{url}\", timeout: 1s, retries: 0 }}"))
        .query_range("up", 1000, 1100, 10)
        .await
        .expect_err("no answer");
    let elapsed = started.elapsed();
    assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("timed out"), "{message}");
    assert!(message.contains(&url), "{message}");
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
}

/// 503 first, a valid answer second: the call succeeds after one retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_the_next_answer_used() {
    let (url, seen) = listener(vec![
        Behaviour::Answer(http_response(
            "503 Service Unavailable",
            "overloaded, try later",
        )),
        Behaviour::Answer(http_response("200 OK", OK_BODY)),
    ])
    .await;
    let result = client(&format!("{{ url: \"{url}\", timeout: 2s, retries: 2 }}"))
        .query_range("m", 1000, 1010, 10)
        .await
        .expect("succeeds after a retry");
    assert_eq!(result, expected_ok());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "one failure, one success");
    assert!(
        seen[0].head.starts_with("POST /api/v1/query_range "),
        "{}",
        seen[0].head
    );
}

/// VictoriaMetrics and Prometheus answer overload with 503 *and* an error JSON body
/// (VictoriaMetrics: errorType "503" when -search.maxConcurrentRequests is exceeded; Prometheus:
/// errorType "unavailable"). That is as transient as a bare 503 and should be retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_error_json_is_retried() {
    let overloaded = r#"{"status":"error","errorType":"503","error":"couldn't start executing the request: too many concurrent requests"}"#;
    let (url, seen) = listener(vec![
        Behaviour::Answer(http_response("503 Service Unavailable", overloaded)),
        Behaviour::Answer(http_response("200 OK", OK_BODY)),
    ])
    .await;
    let result = client(&format!("{{ url: \"{url}\", timeout: 2s, retries: 2 }}"))
        .query_range("m", 1000, 1010, 10)
        .await;
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the 503 was not retried: {result:?}"
    );
    assert_eq!(result.expect("succeeds after a retry"), expected_ok());
}

/// A 400 with VictoriaMetrics-style error JSON: the server's text in the error, one request only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_with_error_json_is_reported_and_not_retried() {
    let (url, seen) = listener(vec![Behaviour::Answer(http_response(
        "400 Bad Request",
        r#"{"status":"error","errorType":"bad_data","error":"boom"}"#,
    ))])
    .await;
    let err = client(&format!("{{ url: \"{url}\", timeout: 2s, retries: 3 }}"))
        .query_range("m", 1000, 1010, 10)
        .await
        .expect_err("400 is an error");
    assert!(
        matches!(err, SourceError::Query { .. } | SourceError::Http { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("boom"), "{message}");
    assert!(message.contains("bad_data"), "{message}");
    assert_eq!(seen.lock().unwrap().len(), 1, "a 400 is not retried");
}

const SECRETS: [&str; 3] = ["supersecret123", "hunter2hunter2", "pw-in-url"];

fn assert_no_secret(err: &SourceError) {
    for shown in [err.to_string(), format!("{err:?}")] {
        for secret in SECRETS {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}

/// Credentials never reach error messages: bearer token, basic-auth password, URL userinfo, on
/// connection failures and on timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_never_show_credentials() {
    let port = free_port().expect("port");
    let all = format!(
        "{{ url: \"http://user:pw-in-url@127.0.0.1:{port}\", bearer_token: supersecret123, basic_auth: {{ username: u, password: hunter2hunter2 }}, timeout: 1s, retries: 0 }}"
    );
    let url_only =
        format!("{{ url: \"http://user:pw-in-url@127.0.0.1:{port}/\", timeout: 1s, retries: 0 }}");
    for datasource in [&all, &url_only] {
        let err = client(datasource)
            .query_range("up", 1000, 1100, 10)
            .await
            .expect_err("nobody listens");
        assert!(matches!(err, SourceError::Transport { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
        assert_no_secret(&err);
    }
    // Timeout path, and the datasource's error text path (a 401 body).
    let (hang, _) = listener(vec![Behaviour::Hang]).await;
    let (denied, _) = listener(vec![Behaviour::Answer(http_response(
        "401 Unauthorized",
        "denied",
    ))])
    .await;
    for base in [hang, denied] {
        let with_userinfo = base.replace("http://", "http://user:pw-in-url@");
        let err = client(&format!(
            "{{ url: \"{with_userinfo}\", bearer_token: supersecret123, timeout: 1s, retries: 0 }}"
        ))
        .query_range("up", 1000, 1100, 10)
        .await
        .expect_err("no answer / denied");
        assert_no_secret(&err);
    }
}

/// The credentials are actually sent: the bearer token as `Authorization: Bearer`, URL userinfo
/// as basic auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_sent() {
    let (url, seen) = listener(vec![Behaviour::Answer(http_response("200 OK", OK_BODY))]).await;
    client(&format!(
        "{{ url: \"{url}\", bearer_token: supersecret123, retries: 0 }}"
    ))
    .query_range("m", 1000, 1010, 10)
    .await
    .expect("query");
    let with_userinfo = url.replace("http://", "http://user:pw-in-url@");
    client(&format!("{{ url: \"{with_userinfo}\", retries: 0 }}"))
        .query_range("m", 1000, 1010, 10)
        .await
        .expect("query");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("authorization").as_deref(),
        Some("Bearer supersecret123"),
        "{}",
        seen[0].head
    );
    // base64("user:pw-in-url")
    assert_eq!(
        seen[1].header("authorization").as_deref(),
        Some("Basic dXNlcjpwdy1pbi11cmw="),
        "{}",
        seen[1].head
    );
    assert!(
        seen[1].head.starts_with("POST /api/v1/query_range "),
        "userinfo is not part of the request line: {}",
        seen[1].head
    );
}
