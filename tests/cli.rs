//! The `mad` binary as a user runs it: help texts, `check`, `serve` failing early with the fix in
//! the message, `serve` answering its probes and stopping on SIGTERM, `train` on an empty query.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use mad::demo::{free_port, VictoriaMetrics};
use mad::source::unix_now as now;

fn mad() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mad"));
    command.env_remove("MAD_LOG").env_remove("MAD_LOG_FORMAT");
    command
}

fn run(args: &[&str]) -> Output {
    mad().args(args).output().expect("run mad")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

/// Waits for `child` to exit, killing it and failing after `timeout`.
fn wait_for_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 GET on loopback: status and body, or `None` if nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = text(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

const VALID: &str = r#"
datasource: { url: http://127.0.0.1:8428 }
store: { path: models }
server: { listen: 127.0.0.1:9464 }
detectors:
  - name: cpu
    query: 'sum by (instance) (rate(node_cpu_seconds_total{mode!="idle"}[5m]))'
    step: 1m
    window: 64
    train_range: 14d
    interval: 1m
  - name: latency
    query: histogram_quantile(0.99, sum by (le) (rate(http_duration_seconds_bucket[5m])))
    step: 30s
    window: 32
    train_range: 7d
"#;

#[test]
fn help_texts_explain_the_commands() {
    let top = run(&["--help"]);
    assert_success(&top, "mad --help");
    let top = text(&top.stdout);
    for word in ["train", "serve", "check", "anomaly_score"] {
        assert!(
            top.contains(word),
            "mad --help does not mention {word}:\n{top}"
        );
    }

    let train = run(&["train", "--help"]);
    assert_success(&train, "mad train --help");
    let train = text(&train.stdout);
    for word in ["--config", "--detector", "--end", "train"] {
        assert!(
            train.contains(word),
            "mad train --help does not mention {word}:\n{train}"
        );
    }

    let serve = run(&["serve", "--help"]);
    assert_success(&serve, "mad serve --help");
    let serve = text(&serve.stdout);
    for word in ["--config", "anomaly_score", "/metrics", "SIGTERM"] {
        assert!(
            serve.contains(word),
            "mad serve --help does not mention {word}:\n{serve}"
        );
    }

    let version = run(&["--version"]);
    assert_success(&version, "mad --version");
    assert!(text(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    // A missing required flag is a usage error, not a panic.
    let missing = run(&["serve"]);
    assert!(!missing.status.success());
    let stderr = text(&missing.stderr);
    assert!(stderr.contains("--config"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_prints_the_detectors_of_a_valid_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "mad.yaml", VALID);
    let output = run(&["check", "--config", file.to_str().unwrap()]);
    assert_success(&output, "mad check");
    let stdout = text(&output.stdout);
    assert!(stdout.contains("config OK"), "{stdout}");
    assert!(stdout.contains("http://127.0.0.1:8428"), "{stdout}");
    assert!(
        stdout.contains("detector cpu: step 1m, window 64, train_range 14days, interval 1m"),
        "{stdout}"
    );
    assert!(stdout.contains("node_cpu_seconds_total"), "{stdout}");
    // The interval defaults to the step.
    assert!(
        stdout.contains("detector latency: step 30s, window 32, train_range 7days, interval 30s"),
        "{stdout}"
    );
}

#[test]
fn a_time_outside_1970_to_9999_is_refused_before_anything_is_fetched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "mad.yaml", VALID);
    let config = file.to_str().expect("utf-8 path");
    for from in ["--from=-9223372036854775808", "--from=253402300800"] {
        let output = run(&[
            "backtest",
            "--config",
            config,
            "--detector",
            "cpu",
            from,
            "--to",
            "100",
            "--train-until",
            "50",
        ]);
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains("between 1970 and 9999"), "{stderr}");
    }
}

#[test]
fn check_names_file_line_and_field_of_a_bad_duration() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = VALID.replace("step: 1m", "step: 1 fortnight");
    let line = bad
        .lines()
        .position(|l| l.contains("1 fortnight"))
        .expect("edited line")
        + 1;
    assert_eq!(line, 8, "the test config changed shape");
    let file = write(tmp.path(), "x.yaml", &bad);
    let output = run(&["check", "--config", file.to_str().unwrap()]);
    assert!(!output.status.success(), "a bad duration is accepted");
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    let line_text = lines[0];
    let prefix = format!("error: {}:8:", file.display());
    assert!(
        line_text.starts_with(&prefix),
        "expected {prefix:?}…, got {line_text}"
    );
    assert!(line_text.contains("detectors[0].step"), "{line_text}");
    assert!(line_text.contains("fortnight"), "{line_text}");
    assert!(text(&output.stdout).is_empty(), "nothing on stdout");
}

#[test]
fn check_on_a_missing_file_names_the_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope").join("mad.yaml");
    let output = run(&["check", "--config", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the reason, once: {stderr}"
    );
}

fn serve_config(dir: &Path, listen_port: u16, datasource_port: u16, extra: &str) -> String {
    format!(
        r#"datasource: {{ url: "http://127.0.0.1:{datasource_port}", timeout: 1s, retries: 0 }}
store: {{ path: "{}" }}
server: {{ listen: "127.0.0.1:{listen_port}", reload_interval: 1s }}
{extra}detectors:
  - {{ name: cpu, query: up, step: 1s, window: 4, train_range: 1m }}
"#,
        dir.join("models").display()
    )
}

#[test]
fn serve_without_onnxruntime_fails_fast_with_the_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = serve_config(
        tmp.path(),
        free_port().expect("port"),
        free_port().expect("port"),
        "onnxruntime: { library: /nonexistent/libonnxruntime.so }\n",
    );
    let file = write(tmp.path(), "mad.yaml", &config);
    let mut child = mad()
        .args(["serve", "--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mad serve");
    let status = wait_for_exit(
        &mut child,
        Duration::from_secs(15),
        "mad serve without ONNX Runtime",
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "exited successfully:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    assert!(
        errors[0].contains("scripts/fetch-onnxruntime.sh"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("/nonexistent/libonnxruntime.so"),
        "{}",
        errors[0]
    );
}

#[test]
fn serve_answers_probes_without_a_model_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let config = serve_config(tmp.path(), port, free_port().expect("port"), "");
    let file = write(tmp.path(), "mad.yaml", &config);
    let log = std::fs::File::create(tmp.path().join("stderr.log")).expect("log file");
    let mut child = mad()
        .args(["serve", "--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mad serve");
    let stderr = || std::fs::read_to_string(tmp.path().join("stderr.log")).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        if let Some(answer) = get(port, "/healthz") {
            break answer;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "mad serve exited with {status:?} before answering:\n{}",
                stderr()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mad serve did not answer /healthz:\n{}", stderr());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let a couple of detector cycles run against the closed datasource first.
    std::thread::sleep(Duration::from_millis(1500));
    let ready = get(port, "/readyz").expect("/readyz answers");
    let metrics = get(port, "/metrics").expect("/metrics answers");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = wait_for_exit(
        &mut child,
        Duration::from_secs(10),
        "mad serve after SIGTERM",
    );
    let log = stderr();

    assert_eq!(health.0, 200, "/healthz: {health:?}");
    assert_eq!(ready.0, 503, "/readyz without a model: {ready:?}");
    assert!(ready.1.contains("no model"), "/readyz body: {}", ready.1);
    assert!(
        ready.1.contains("cpu"),
        "/readyz names the detector: {}",
        ready.1
    );
    assert_eq!(metrics.0, 200);
    assert!(
        metrics.1.contains("mad_build_info"),
        "/metrics:\n{}",
        metrics.1
    );
    assert!(status.success(), "exit after SIGTERM: {status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        get(port, "/healthz").is_none(),
        "the port is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_on_a_query_without_usable_series_fails_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = VictoriaMetrics::start(&tmp.path().join("vm"), None)
        .await
        .expect("start victoria-metrics");
    // A series with three points: present, but far from the 16 (4 windows of 4) training needs.
    let t = now() - 30;
    let body: String = (0..3)
        .map(|i| format!("mad_cli_sparse {i} {}\n", (t + i) * 1000))
        .collect();
    vm.import(body).await.expect("import");

    let config = format!(
        r#"datasource: {{ url: "{}", timeout: 5s, retries: 0 }}
store: {{ path: "{}" }}
detectors:
  - {{ name: empty, query: mad_cli_no_such_metric, step: 1s, window: 4, train_range: 2m }}
  - {{ name: sparse, query: mad_cli_sparse, step: 1s, window: 4, train_range: 2m }}
"#,
        vm.url,
        tmp.path().join("models").display()
    );
    let file = write(tmp.path(), "mad.yaml", &config);
    let train = |detector: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mad"))
            .env_remove("MAD_LOG")
            .args([
                "train",
                "--config",
                file.to_str().unwrap(),
                "--detector",
                detector,
            ])
            .output()
    };

    let empty = train("empty").await.expect("run mad train");
    let stderr = text(&empty.stderr);
    assert!(
        !empty.status.success(),
        "training on nothing succeeded:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(error.contains("detector empty"), "{error}");
    assert!(error.contains("the query returned 0 series"), "{error}");

    let sparse = train("sparse").await.expect("run mad train");
    let stderr = text(&sparse.stderr);
    assert!(
        !sparse.status.success(),
        "training on 3 points succeeded:\n{stderr}"
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert!(error.contains("detector sparse"), "{error}");
    assert!(
        error.contains("returned 1 series but none has 16 points"),
        "{error}"
    );

    for name in ["empty", "sparse"] {
        let dir = tmp.path().join("models").join(name);
        let stored = std::fs::read_dir(&dir).map_or(0, |d| d.count());
        assert_eq!(
            stored,
            0,
            "nothing is stored for {name} ({})",
            dir.display()
        );
    }
    vm.stop().await;
}

#[test]
fn relay_without_intake_credentials_refuses_to_start_and_takes_them_from_the_environment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let config = format!(
        r#"
datasource: {{ url: "http://127.0.0.1:1" }}
detectors: [{{ name: cli, query: up, step: 1m }}]
relay:
  listen: "127.0.0.1:{port}"
  state_path: "{}"
  telegram: {{ token: "9:AAH-very-secret-bot-token", api_url: "http://127.0.0.1:1", default_chat: 1 }}
"#,
        tmp.path().join("relay.redb").display()
    );
    let file = write(tmp.path(), "mad.yaml", &config);
    let output = mad()
        .args(["relay", "--config", file.to_str().expect("utf-8 path")])
        .env_remove("MAD_RELAY_INTAKE_TOKEN")
        .output()
        .expect("run mad relay");
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "an open intake started:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("relay.intake_token"), "{stderr}");
    assert!(stderr.contains("MAD_RELAY_INTAKE_TOKEN"), "{stderr}");
    assert!(!stderr.contains("AAH-very-secret"), "{stderr}");
    // `mad check` says so before a deployment finds out.
    let check = mad()
        .args(["check", "--config", file.to_str().expect("utf-8 path")])
        .env_remove("MAD_RELAY_INTAKE_TOKEN")
        .output()
        .expect("run mad check");
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains("mad relay will not start here"),
        "{}",
        text(&check.stdout)
    );

    // The token from the environment: the relay starts and takes only alerts that carry it.
    let mut child = mad()
        .args(["relay", "--config", file.to_str().expect("utf-8 path")])
        .env("MAD_RELAY_INTAKE_TOKEN", "t0ken-for-tests")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mad relay");
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(port, "/healthz").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay with a token from the environment did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let post = |token: Option<&str>| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let body = "[]";
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "POST /api/v2/alerts HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: \
             application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .unwrap_or(0)
    };
    let (without, wrong, right) = (
        post(None),
        post(Some("guess")),
        post(Some("t0ken-for-tests")),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(without, 401, "no credentials");
    assert_eq!(wrong, 401, "a wrong token");
    assert_eq!(right, 200, "the environment's token");
}
