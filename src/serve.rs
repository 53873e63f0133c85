//! `mad serve`: one scoring loop per detector, one HTTP server for all of them.
//!
//! Each loop polls the store for a new model version, fetches the newest points, scores them and
//! re-renders that detector's part of `/metrics`. Loops never share model state, so a slow or
//! failing detector does not hold up the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::sync::{broadcast, watch};

use crate::config::{Config, Detector};
use crate::expose::{serve_http, Exposition, Probes, Telemetry};
use crate::history::{EpisodeTracker, Recorder};
use crate::model::Forecaster;
use crate::score::DetectorScorer;
use crate::source::{align_down, Client, Series, SourceError};
use crate::store::{ModelStore, PgStore};

/// Everything the detector loops and the HTTP server share.
pub struct Exporter {
    config: Config,
    store: Arc<dyn ModelStore>,
    client: Client,
    telemetry: Telemetry,
    exposition: RwLock<Exposition>,
    status: Mutex<HashMap<String, DetectorStatus>>,
    /// Anomaly history writer, with the PostgreSQL store only.
    history: Option<Recorder>,
}

#[derive(Debug, Default, Clone)]
struct DetectorStatus {
    model_version: Option<String>,
    good_cycles: u64,
}

impl Probes for Exporter {
    fn metrics(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        self.telemetry.write_to(&mut out);
        match self.exposition.read() {
            Ok(exposition) => exposition.write_to(&mut out),
            Err(_) => tracing::error!("exposition lock poisoned"),
        }
        out
    }

    fn ready(&self) -> Result<(), String> {
        let status = self
            .status
            .lock()
            .map_err(|_| "status lock poisoned".to_string())?;
        let missing: Vec<String> = self
            .config
            .detectors
            .iter()
            .filter_map(|d| {
                let s = status.get(&d.name.0).cloned().unwrap_or_default();
                match (s.model_version, s.good_cycles) {
                    (None, _) => Some(format!("{}: no model", d.name)),
                    (Some(_), 0) => Some(format!("{}: no scoring cycle yet", d.name)),
                    _ => None,
                }
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}

impl Exporter {
    pub async fn new(config: Config) -> anyhow::Result<Exporter> {
        let client = Client::new(&config.datasource)?;
        let store = crate::store::open(&config.store).await?;
        let history = match &config.store.postgres {
            Some(url) => Some(Recorder::start(Arc::new(PgStore::connect(url).await?))),
            None => None,
        };
        Ok(Exporter {
            client,
            store,
            telemetry: Telemetry::new().context("cannot set up self-monitoring metrics")?,
            exposition: RwLock::new(Exposition::default()),
            status: Mutex::new(HashMap::new()),
            history,
            config,
        })
    }

    fn set_status(&self, detector: &str, update: impl FnOnce(&mut DetectorStatus)) {
        if let Ok(mut status) = self.status.lock() {
            update(status.entry(detector.to_string()).or_default());
        }
    }

    fn with_exposition(&self, update: impl FnOnce(&mut Exposition)) {
        match self.exposition.write() {
            Ok(mut exposition) => update(&mut exposition),
            Err(_) => tracing::error!("exposition lock poisoned"),
        }
    }
}

/// Runs the exporter until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // Fail at start, with the fix in the message, rather than on the first model load.
    crate::model::environment(config.onnxruntime.library.as_deref())?;
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let exporter = Arc::new(Exporter::new(config).await?);
    // The management API works on the PostgreSQL registry; without it, /api/ says so.
    let api: Arc<dyn crate::expose::ApiHandler> = match exporter.config.store.postgres {
        Some(_) => Arc::new(
            crate::api::Api::connect(
                &exporter.config,
                exporter.store.clone(),
                exporter.client.clone(),
            )
            .await
            .context("cannot start the management API")?,
        ),
        None => Arc::new(crate::api::Unavailable),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    for detector in exporter.config.detectors.clone() {
        loops.push(tokio::spawn(detector_loop(
            exporter.clone(),
            detector,
            stop_rx.clone(),
        )));
    }
    tracing::info!(
        %listen,
        detectors = exporter.config.detectors.len(),
        "serving /metrics"
    );
    serve_http(listener, exporter.clone(), Some(api), shutdown).await;
    let _ = stop_tx.send(true);
    for handle in loops {
        let _ = handle.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn detector_loop(
    exporter: Arc<Exporter>,
    detector: Detector,
    mut stop: watch::Receiver<bool>,
) {
    let name = detector.name.0.clone();
    let mut scorer: Option<DetectorScorer> = None;
    let mut rejected: Option<String> = None;
    let mut next_reload = Instant::now();
    let reload_every = exporter.config.server.reload_interval.0;
    let mut ticker = tokio::time::interval(detector.interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = exporter.store.changes();
    let mut episodes = EpisodeTracker::new(
        &name,
        detector.episode_for().as_secs() as i64,
        detector.episode_quiet().as_secs() as i64,
    );
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = next_change(&mut changes) => {
                // "" means "anything may have changed" (missed notices after a reconnect).
                if changed.is_empty() || changed == name {
                    if let Some(model) = reload(&exporter, &name, scorer.as_ref(), &mut rejected).await {
                        scorer = Some(DetectorScorer::new(model, detector.staleness().as_secs() as i64));
                    }
                }
                continue;
            }
            _ = stop.changed() => break,
        }
        if Instant::now() >= next_reload {
            next_reload = Instant::now() + reload_every;
            if let Some(model) = reload(&exporter, &name, scorer.as_ref(), &mut rejected).await {
                scorer = Some(DetectorScorer::new(
                    model,
                    detector.staleness().as_secs() as i64,
                ));
            }
        }
        if let Some(scorer) = scorer.as_mut() {
            run_cycle(&exporter, &detector, scorer, &mut episodes).await;
        }
    }
}

/// The next detector whose active version changed, as the store pushes it; never completes for
/// stores that cannot push.
async fn next_change(changes: &mut Option<broadcast::Receiver<String>>) -> String {
    let Some(receiver) = changes.as_mut() else {
        return std::future::pending().await;
    };
    match receiver.recv().await {
        Ok(detector) => detector,
        Err(broadcast::error::RecvError::Lagged(_)) => String::new(),
        Err(broadcast::error::RecvError::Closed) => {
            *changes = None;
            std::future::pending().await
        }
    }
}

/// Loads the store's active version if it differs from the one being served. A version that
/// fails the contract is remembered so it is not retried every cycle; the old model keeps serving.
async fn reload(
    exporter: &Exporter,
    detector: &str,
    current: Option<&DetectorScorer>,
    rejected: &mut Option<String>,
) -> Option<Arc<Forecaster>> {
    let serving = current.map(|s| s.model().version.clone());
    let active = match exporter.store.active_version(detector).await {
        Ok(Some(active)) => active,
        Ok(None) => {
            if serving.is_none() {
                tracing::warn!(detector, "no model in the store yet; run `mad train`");
            }
            return None;
        }
        Err(e) => {
            tracing::error!(detector, error = %e, "cannot read the model store");
            exporter.telemetry.error(detector, "store");
            return None;
        }
    };
    if serving.as_deref() == Some(active.version.as_str())
        || rejected.as_deref() == Some(active.version.as_str())
    {
        return None;
    }
    let loaded = match exporter.store.load_active(detector).await {
        Ok(Some(stored)) => {
            let library = exporter.config.onnxruntime.library.clone();
            tokio::task::block_in_place(|| {
                Forecaster::load(
                    &stored.onnx,
                    &stored.info.version,
                    detector,
                    library.as_deref(),
                )
            })
            .map_err(|e| e.to_string())
        }
        Ok(None) => return None,
        Err(e) => Err(e.to_string()),
    };
    let reloads = &exporter.telemetry.model_reloads;
    match loaded {
        Ok(model) => {
            tracing::info!(detector, version = %model.version, series = model.meta.series.len(), "model loaded");
            reloads.with_label_values(&[detector, "ok"]).inc();
            let info = &exporter.telemetry.model_info;
            if let Some(old) = &serving {
                let _ = info.remove_label_values(&[detector, old]);
            } else {
                exporter.telemetry.models_loaded.inc();
            }
            info.with_label_values(&[detector, &model.version]).set(1);
            exporter.set_status(detector, |s| s.model_version = Some(model.version.clone()));
            Some(Arc::new(model))
        }
        Err(e) => {
            tracing::error!(detector, version = %active.version, error = %e, "model rejected; keeping the previous one");
            reloads.with_label_values(&[detector, "rejected"]).inc();
            exporter.telemetry.error(detector, "model_rejected");
            *rejected = Some(active.version);
            None
        }
    }
}

async fn run_cycle(
    exporter: &Exporter,
    detector: &Detector,
    scorer: &mut DetectorScorer,
    episodes: &mut EpisodeTracker,
) {
    let name = detector.name.0.as_str();
    let t = &exporter.telemetry;
    let started = Instant::now();
    let now = unix_now();
    let step = scorer.model().meta.step_secs as i64;
    let end = align_down(now, step);
    let fetched = match fetch(exporter, detector, scorer, end, step).await {
        Ok(fetched) => fetched,
        Err(e) => {
            tracing::warn!(detector = name, error = %e, "fetch failed; dropping this detector's scores until it recovers");
            t.error(name, e.kind());
            scorer.clear_latest();
            exporter.with_exposition(|x| x.clear(name));
            return;
        }
    };
    let inference = Instant::now();
    let result = tokio::task::block_in_place(|| scorer.score_cycle(&fetched, now));
    t.inference_duration
        .with_label_values(&[name])
        .observe(inference.elapsed().as_secs_f64());
    match result {
        Ok((stats, scored)) => {
            exporter.with_exposition(|x| x.update(name, scorer));
            if let Some(history) = &exporter.history {
                for (index, scores) in &scored {
                    for episode in episodes.observe(&fetched[*index].labels, scores) {
                        history.record(episode);
                    }
                }
                t.episodes_pending.set(history.pending() as i64);
                Telemetry::catch_up(&t.episodes_written, history.written());
                Telemetry::catch_up(&t.episodes_dropped, history.dropped());
            }
            t.series_scored
                .with_label_values(&[name])
                .set(stats.series_scored as i64);
            t.series_tracked
                .with_label_values(&[name])
                .set(scorer.len() as i64);
            t.points_scored
                .with_label_values(&[name])
                .inc_by(stats.points_scored as u64);
            t.last_success.with_label_values(&[name]).set(now as f64);
            exporter.set_status(name, |s| s.good_cycles += 1);
            tracing::debug!(detector = name, ?stats, "cycle done");
        }
        Err(e) => {
            tracing::error!(detector = name, error = %e, "scoring failed");
            t.error(name, "inference");
            scorer.clear_latest();
            exporter.with_exposition(|x| x.clear(name));
        }
    }
    t.cycle_duration
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
}

/// Fetches just enough history: the points since each series' last one, or a full warm-up
/// window when a series shows up that the scorer has not seen.
async fn fetch(
    exporter: &Exporter,
    detector: &Detector,
    scorer: &DetectorScorer,
    end: i64,
    step: i64,
) -> Result<Vec<Series>, SourceError> {
    let query = &detector.query.0;
    let timer = exporter
        .telemetry
        .query_duration
        .with_label_values(&[detector.name.0.as_str()]);
    let lookback = scorer.lookback_points(end) as i64;
    let started = Instant::now();
    let mut fetched = exporter
        .client
        .query_range(query, end - (lookback - 1) * step, end, step)
        .await?;
    let full = scorer.warmup_points() as i64 + 1;
    if lookback < full && scorer.has_unknown(&fetched) {
        fetched = exporter
            .client
            .query_range(query, end - (full - 1) * step, end, step)
            .await?;
    }
    timer.observe(started.elapsed().as_secs_f64());
    Ok(fetched)
}
