//! The `mad` command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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

/// `detection.scoring` for `mad backtest --nab/--machines` (a `--detector` replay uses its own).
#[derive(Clone, Copy, ValueEnum)]
enum BacktestScoring {
    /// |y - yhat| / band: 1 at the edge of the calibrated band
    Band,
    /// anomaly likelihood of the deviations against the series' own history (the default)
    Likelihood,
    /// deviations standardised against all of the series' earlier ones
    Standardized,
    /// smoothed deviations against a threshold chosen from the recent ones (Hundman et al.)
    Dynamic,
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
        /// Instead of training once, keep taking retraining requests from the PostgreSQL queue
        /// (several trainers may watch one queue; each request is taken once) until SIGTERM.
        #[arg(long, conflicts_with_all = ["detectors", "end"])]
        watch: bool,
        /// Also refresh the generated alerting rules (`mad rules`) in this directory after
        /// training (whether or not training succeeded: they depend on the config only).
        #[arg(long, value_name = "DIR", conflicts_with = "watch")]
        rules_dir: Option<PathBuf>,
        /// Retrain a detector that has a model only when it is due: its history has doubled
        /// since, a series is new to it, its window or step changed, or it is half
        /// `alerting.model_max_age` old (what a scheduled run wants). A due model is continued
        /// from the active one, so the exporter keeps its series' states.
        #[arg(long, conflicts_with = "watch")]
        if_due: bool,
    },
    /// Score fresh data with the active models and expose anomaly_score, yhat, yhat_lower,
    /// yhat_upper and y on /metrics (plus /healthz and /readyz). Picks up new model versions
    /// without a restart; stops gracefully on SIGTERM.
    Serve {
        /// The YAML config (see README).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Take alerts from vmalert (`-notifier.url=http://RELAY`) or Alertmanager (webhook to
    /// `http://RELAY/api/v2/alerts`) and deliver them to Telegram: stored durably before the
    /// 2xx, deduplicated (one message when firing, one when resolved), retried until delivered.
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Apply the PostgreSQL schema migrations (`store.postgres`); a no-op when up to date.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List, activate or roll back model versions in the configured store.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// List detectors: the config file's and, with PostgreSQL, the database's (the config file
    /// wins on a name clash).
    Detectors {
        #[command(subcommand)]
        action: DetectorsAction,
    },
    /// Write vmalert (or Prometheus) alerting rules for the config's detectors and for MAD itself
    /// into DIR/mad.rules.yml.
    Rules {
        #[arg(long, short)]
        config: PathBuf,
        /// Directory for the rules file.
        #[arg(long, short, value_name = "DIR", default_value = mad::rules::DEFAULT_DIR)]
        out: PathBuf,
    },
    /// Write the Grafana dashboards (overview, drill-down, self-monitoring) and their
    /// provisioning files, generated from the metric names this build exports.
    Dashboards {
        /// Directory for the dashboards.
        #[arg(long, short, value_name = "DIR", default_value = mad::dashboards::DEFAULT_DIR)]
        out: PathBuf,
    },
    /// Measure detection quality on recorded, labelled data, scoring it exactly as `mad serve`
    /// would (a model trained on the past only, then one point per cycle).
    #[command(group(clap::ArgGroup::new("corpus").required(true)))]
    Backtest {
        /// A NAB-layout corpus (`data/<category>/<file>.csv`, `labels/combined_windows.json`):
        /// each file's model learns from its first 15% only; prints NAB scores (standard, low FP,
        /// low FN) after NAB's threshold sweep.
        #[arg(long, value_name = "DIR", group = "corpus")]
        nab: Option<PathBuf>,
        /// An SMD/ASD-layout corpus (`train/`, `test/`, `test_label/`, `interpretation_label/`):
        /// one detector per machine over all its metrics; prints point-wise best F1 (no
        /// point-adjust), F1 at the default threshold and how often the labelled metric is named.
        #[arg(long, value_name = "DIR", group = "corpus")]
        machines: Option<PathBuf>,
        /// Single labelled series (`timestamp,value[,label]`, the KPI layout; repeatable): each
        /// trained on its first `--train-share`, the rest scored; prints point-wise and
        /// per-event precision, recall and F1.
        #[arg(long, value_name = "FILE", group = "corpus")]
        csv: Vec<PathBuf>,
        /// `--csv`: the share of each file's rows the model learns from.
        #[arg(long, default_value_t = 0.5)]
        train_share: f64,
        /// A detector of `--config`, replayed over `--from`..`--to` read from its datasource:
        /// trained on the range before `--train-until`, the rest scored point by point.
        #[arg(long, value_name = "NAME", group = "corpus", requires_all = ["config", "from", "to"])]
        detector: Option<String>,
        /// Start of the range (RFC 3339 or Unix seconds).
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// End of the range.
        #[arg(long, value_parser = parse_time)]
        to: Option<i64>,
        /// Where training stops and scoring starts; default the middle of the range.
        #[arg(long, value_parser = parse_time)]
        train_until: Option<i64>,
        /// Time between rows of a `--machines` corpus (SMD: 1m, ASD: 5m).
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        step: std::time::Duration,
        /// Only files whose name contains this (repeatable).
        #[arg(long = "only", value_name = "TEXT")]
        only: Vec<String>,
        /// Write per-point scores (timestamp,value,anomaly_score,yhat,yhat_lower,yhat_upper,label)
        /// under this directory, one CSV per file; for `--machines`, one per machine with the
        /// test rows' label, combined score, driving metric and every metric's score.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Training settings (`training:`, a hyperparameter `search` included) and
        /// `onnxruntime.library` from this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How forecast errors become scores.
        #[arg(long, value_enum)]
        scoring: Option<BacktestScoring>,
        /// The training seed (default the config's, else the trainer's): run a figure again
        /// with others to see how much of it the seed decides.
        #[arg(long)]
        seed: Option<u64>,
        /// NAB and `--machines`: train again on the rows already seen each time they have
        /// doubled (leaving out the points scored above 1), as `mad train --if-due` would.
        #[arg(long)]
        retrain: bool,
        /// `--machines`: one joint model reads all metrics of a machine together and forecasts
        /// each (`training.joint`), instead of one shared model reading each metric on its own.
        #[arg(long)]
        joint: bool,
        /// Draw the series (value and forecast band, score, labelled windows in green, points
        /// scoring above 1 in red) into this PNG, one panel per series: every NAB or `--csv`
        /// file, a machine's most often labelled metrics, a detector's series.
        #[arg(long, value_name = "PNG")]
        plot: Option<PathBuf>,
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

#[derive(Subcommand)]
enum DetectorsAction {
    /// One line per detector with where it is defined.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Versions of every detector in the config (or one), oldest first; `*` marks the active one.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        detector: Option<String>,
    },
    /// Make a stored version the active one; running exporters switch to it.
    Activate {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        detector: String,
        #[arg(long)]
        version: String,
    },
    /// Re-activate the version before the active one.
    Rollback {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        detector: String,
    },
}

fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return if mad::timestamp::in_range(secs) {
            Ok(secs)
        } else {
            Err("Unix seconds between 1970 and 9999 expected".into())
        };
    }
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("expected RFC 3339 or Unix seconds: {e}"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .map_err(|_| "time before 1970".to_string())
        })
}

async fn models(action: ModelsAction) -> anyhow::Result<()> {
    let show = |v: &mad::store::VersionInfo| {
        format!(
            "{} {:<24} {:<24} trained {} ({} bytes)",
            if v.active { "*" } else { " " },
            v.detector,
            v.version,
            mad::timestamp::rfc3339(v.trained_at),
            v.size_bytes
        )
    };
    match action {
        ModelsAction::List { config, detector } => {
            let config = Config::load(&config)?;
            let store = mad::store::open(&config.store).await?;
            let names: Vec<String> = match detector {
                Some(d) => vec![d],
                None => config.detectors.iter().map(|d| d.name.0.clone()).collect(),
            };
            for name in names {
                for v in store.list(&name).await? {
                    println!("{}", show(&v));
                }
            }
        }
        ModelsAction::Activate {
            config,
            detector,
            version,
        } => {
            let config = Config::load(&config)?;
            let store = mad::store::open(&config.store).await?;
            println!("{}", show(&store.activate(&detector, &version).await?));
        }
        ModelsAction::Rollback { config, detector } => {
            let config = Config::load(&config)?;
            let store = mad::store::open(&config.store).await?;
            println!("{}", show(&store.rollback(&detector).await?));
        }
    }
    Ok(())
}

/// Logs go to stderr and, when `MAD_LOG_DIR` is set, also to `MAD_LOG_DIR/mad-<pid>.log` (for
/// hosts that collect files; the test suite greps these for secrets). Returns that file.
fn init_logging(format: LogFormat, filter: &str) -> Option<Arc<std::fs::File>> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let file = std::env::var_os("MAD_LOG_DIR").and_then(|dir| {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join(format!("mad-{}.log", std::process::id())))
            .ok()
            .map(Arc::new)
    });
    let to_stderr = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let to_file = file
        .clone()
        .map(|f| fmt::layer().with_ansi(false).with_writer(f).boxed());
    tracing_subscriber::registry()
        .with(filter)
        .with(to_stderr)
        .with(to_file)
        .init();
    file
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = init_logging(cli.log_format, &cli.log);
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
            if let Some(mut file) = log_file.as_deref() {
                let _ = writeln!(file, "error: {e:#}");
            }
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
            watch,
            rules_dir,
            if_due,
        } => {
            let config = Config::load(&config)?;
            if watch {
                mad::train::watch(&config, mad::serve::shutdown_signal()).await?;
            } else {
                let schedule = if if_due {
                    mad::train::Schedule::IfDue
                } else {
                    mad::train::Schedule::Always
                };
                let trained = mad::train::run_scheduled(&config, &detectors, end, schedule).await;
                if let Some(dir) = rules_dir {
                    let path = mad::rules::write(&config, &dir)?;
                    println!("alerting rules refreshed: {}", path.display());
                }
                trained?;
            }
        }
        Command::Backtest {
            nab,
            machines,
            csv,
            train_share,
            detector,
            from,
            to,
            train_until,
            step,
            only,
            out,
            config,
            scoring,
            seed,
            retrain,
            joint,
            plot,
        } => {
            use mad::backtest::report;
            let settings = report::Settings {
                config: config.as_deref(),
                seed,
                retrain: if retrain {
                    mad::backtest::replay::Retrain::WhenDoubled
                } else {
                    mad::backtest::replay::Retrain::Never
                },
            };
            let detection = mad::score::Detection {
                scoring: match scoring {
                    None => mad::score::Scoring::default(),
                    Some(BacktestScoring::Band) => mad::score::Scoring::Band,
                    Some(BacktestScoring::Likelihood) => mad::score::Scoring::Likelihood,
                    Some(BacktestScoring::Standardized) => mad::score::Scoring::Standardized,
                    Some(BacktestScoring::Dynamic) => mad::score::Scoring::Dynamic,
                },
                ..mad::score::Detection::default()
            };
            let output = report::Output {
                out: out.as_deref(),
                plot: plot.as_deref(),
            };
            match (nab, machines) {
                (Some(nab), _) => report::nab(&nab, &only, settings, detection, output)?,
                (None, Some(dir)) => {
                    report::machines(&dir, &only, step, settings, detection, joint, output)?
                }
                (None, None) if !csv.is_empty() => {
                    report::csv(&csv, train_share, settings, detection, output)?
                }
                (None, None) => match (detector, config, from, to) {
                    (Some(name), Some(config), Some(from), Some(to)) => {
                        let range = (from, to, train_until.unwrap_or(from + (to - from) / 2));
                        report::range(&config, &name, range, output.plot).await?
                    }
                    _ => anyhow::bail!(
                        "give --nab DIR, --machines DIR, or --detector NAME with --config, --from \
                         and --to"
                    ),
                },
            }
        }
        Command::Dashboards { out } => {
            for path in mad::dashboards::write(&out)? {
                println!("wrote {}", path.display());
            }
        }
        Command::Rules { config, out } => {
            let config = Config::load(&config)?;
            let path = mad::rules::write(&config, &out)?;
            let groups = mad::rules::generate(&config).groups;
            let rules: usize = groups.iter().map(|g| g.rules.len()).sum();
            println!(
                "wrote {}: {} groups, {rules} rules",
                path.display(),
                groups.len()
            );
        }
        Command::Detectors {
            action: DetectorsAction::List { config },
        } => {
            let config = Config::load(&config)?;
            let registry = match &config.store.postgres {
                Some(_) => Some(mad::registry::Registry::new(std::sync::Arc::new(
                    mad::store::PgStore::from_config(&config.store).await?,
                ))),
                None => None,
            };
            for (d, source) in
                mad::registry::merged_detectors(&config.detectors, registry.as_ref()).await?
            {
                println!(
                    "{:<24} {:<8} step {:<6} window {:<4} {}",
                    d.name,
                    source,
                    humantime::format_duration(d.step.0).to_string(),
                    d.window.0,
                    d.describe_queries()
                );
            }
        }
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            mad::serve::run(config, mad::serve::shutdown_signal()).await?;
        }
        Command::Relay { config } => {
            let config = Config::load(&config)?;
            mad::relay::run(config, mad::serve::shutdown_signal()).await?;
        }
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            if config.store.postgres.is_none() {
                anyhow::bail!("store.postgres is not set: the directory store needs no migrations");
            }
            let applied = mad::store::PgStore::from_config(&config.store)
                .await?
                .migrate()
                .await?;
            println!("schema up to date ({applied} migrations applied)");
        }
        Command::Models { action } => models(action).await?,
        Command::Check { config } => {
            let config = Config::load(&config)?;
            println!(
                "config OK: datasource {}",
                config.datasource.url.without_credentials()
            );
            for d in &config.detectors {
                println!(
                    "  detector {}: step {}, window {}, train_range {}, interval {}: {}",
                    d.name,
                    humantime::format_duration(d.step.0),
                    d.window.0,
                    humantime::format_duration(d.train_range.0),
                    humantime::format_duration(d.interval()),
                    d.describe_queries()
                );
            }
            if let Some(relay) = &config.relay {
                // The environment may differ where the relay runs (a pod's Secret): a note, not
                // an error.
                let intake = match relay.clone().require_intake_auth(|n| std::env::var(n).ok()) {
                    Ok(()) => "intake credentials set".to_string(),
                    Err(e) => format!("mad relay will not start here: {e}"),
                };
                println!("  relay on {}: {intake}", relay.listen);
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
