//! The `mad` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mad::config::Config;

/// MAD (Metrics Anomaly Detection) learns each metric's normal behaviour with a small LSTM
/// forecaster and exposes `anomaly_score` (above 1 = anomalous) for Prometheus or
/// VictoriaMetrics to scrape.
#[derive(Parser)]
#[command(name = "mad", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MAD_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `mad=debug` (RUST_LOG syntax).
    #[arg(long, default_value = "info", env = "MAD_LOG", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Read each detector's history from the datasource, train its LSTM forecaster, calibrate its
    /// band and store the model as the new active version.
    Train {
        /// The YAML config (see README).
        #[arg(long, short)]
        config: PathBuf,
        /// Train only these detectors (repeatable); default all.
        #[arg(long = "detector", short)]
        detectors: Vec<String>,
        /// Train on history up to this time (RFC 3339 or Unix seconds) instead of now.
        #[arg(long, value_parser = parse_time)]
        end: Option<i64>,
    },
    /// Score fresh data with the active models and expose anomaly_score, yhat, yhat_lower,
    /// yhat_upper and y on /metrics (plus /healthz and /readyz). Picks up new model versions
    /// without a restart; stops gracefully on SIGTERM.
    Serve {
        /// The YAML config (see README).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and print what it defines.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole loop on this machine: a real VictoriaMetrics, synthetic metrics with
    /// incidents, training, serving, scraping; then report which incidents scored above 1.
    Demo {
        /// Working directory (VictoriaMetrics data, config, models).
        #[arg(long, default_value = ".run/demo")]
        dir: PathBuf,
        /// Sampling step of the synthetic metrics, seconds.
        #[arg(long, default_value_t = 10)]
        step: i64,
        /// Days of history to train on.
        #[arg(long, default_value_t = 8)]
        history_days: i64,
        /// Seconds of live data with injected incidents.
        #[arg(long, default_value_t = 200)]
        live_seconds: i64,
        /// Keep VictoriaMetrics and the exporter running after the report, until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
}

fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("expected RFC 3339 or Unix seconds: {e}"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .map_err(|_| "time before 1970".to_string())
        })
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train {
            config,
            detectors,
            end,
        } => {
            let config = Config::load(&config)?;
            mad::train::run(&config, &detectors, end).await?;
        }
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            mad::serve::run(config, mad::serve::shutdown_signal()).await?;
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            println!("config OK: datasource {}", config.datasource.url.0);
            for d in &config.detectors {
                println!(
                    "  detector {}: step {}, window {}, train_range {}, interval {}: {}",
                    d.name,
                    humantime::format_duration(d.step.0),
                    d.window.0,
                    humantime::format_duration(d.train_range.0),
                    humantime::format_duration(d.interval()),
                    d.query.0
                );
            }
        }
        Command::Demo {
            dir,
            step,
            history_days,
            live_seconds,
            keep,
        } => {
            mad::demo::run(mad::demo::DemoOptions {
                dir,
                step_secs: step,
                history_days,
                live_secs: live_seconds,
                keep,
            })
            .await?;
        }
    }
    Ok(())
}
