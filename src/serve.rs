//! `mad serve`: one scoring loop per detector, one HTTP server for all of them.
//!
//! Each loop polls the store for a new model version, fetches the newest points, scores them and
//! re-renders that detector's part of `/metrics`. Loops never share model state, so a slow or
//! failing detector does not hold up the others. With PostgreSQL, a supervisor also follows the
//! detectors defined in the database (starting, restarting and stopping their loops) and the
//! maintenance windows, inside which no anomaly episode is recorded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::{broadcast, watch};

use crate::config::{Config, Detector};
use crate::expose::{serve_http, Exposition, Probes, Telemetry};
use crate::history::{EpisodeTracker, Recorder};
use crate::model::Forecaster;
use crate::registry::{merged_detectors, MaintenanceWindow, Registry};
use crate::score::{group, DetectorScorer, Score};
use crate::shard::{Membership, Owner, Sharding};
use crate::source::{
    align_down, drop_oversized, group_of, unix_now, Client, Labels, Series, SourceError,
    MAX_LABELS, MAX_LABEL_SET_BYTES,
};
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
    /// Database detectors and maintenance windows, with the PostgreSQL store only.
    registry: Option<Registry>,
    windows: RwLock<Vec<MaintenanceWindow>>,
    /// The detectors being served now (config file and database).
    serving: Mutex<BTreeMap<String, Detector>>,
    /// This replica's share of the series, when sharded.
    owner: Option<Owner>,
}

#[derive(Debug, Default, Clone)]
struct DetectorStatus {
    model_version: Option<String>,
    good_cycles: u64,
}

impl Probes for Exporter {
    fn metrics(&self) -> Vec<Bytes> {
        let mut telemetry = String::with_capacity(64 * 1024);
        self.telemetry.write_to(&mut telemetry);
        let mut chunks = vec![Bytes::from(telemetry)];
        match self.exposition.read() {
            Ok(exposition) => exposition.chunks(&mut chunks),
            Err(_) => tracing::error!("exposition lock poisoned"),
        }
        chunks
    }

    fn ready(&self) -> Result<(), String> {
        let status = self
            .status
            .lock()
            .map_err(|_| "status lock poisoned".to_string())?;
        let serving = self
            .serving
            .lock()
            .map_err(|_| "detector list lock poisoned".to_string())?;
        let missing: Vec<String> = serving
            .keys()
            .filter_map(|name| {
                let s = status.get(name).cloned().unwrap_or_default();
                match (s.model_version, s.good_cycles) {
                    (None, _) => Some(format!("{name}: no model")),
                    (Some(_), 0) => Some(format!("{name}: no scoring cycle yet")),
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
        // One pool for the history writer and the registry reads.
        let postgres = match &config.store.postgres {
            Some(_) => Some(Arc::new(PgStore::from_config(&config.store).await?)),
            None => None,
        };
        let owner = match config.sharding {
            None => None,
            Some(Sharding::Fixed(shard)) => Some(Owner::Fixed(shard)),
            Some(Sharding::Members) if postgres.is_none() => anyhow::bail!(
                "sharding: members needs store.postgres (or {}): the members meet in its database",
                crate::config::POSTGRES_DSN_ENV
            ),
            Some(Sharding::Members) => Some(Owner::Members(Arc::new(Membership::new(
                member_name(config.server.listen),
            )))),
        };
        Ok(Exporter {
            owner,
            client,
            store,
            telemetry: Telemetry::new().context("cannot set up self-monitoring metrics")?,
            exposition: RwLock::new(Exposition::default()),
            status: Mutex::new(HashMap::new()),
            history: postgres.clone().map(Recorder::start),
            registry: postgres.map(Registry::new),
            windows: RwLock::new(Vec::new()),
            serving: Mutex::new(BTreeMap::new()),
            config,
        })
    }

    fn set_status(&self, detector: &str, update: impl FnOnce(&mut DetectorStatus)) {
        if let Ok(mut status) = self.status.lock() {
            update(status.entry(detector.to_string()).or_default());
        }
    }

    /// Drops what a detector that is no longer served left behind.
    fn forget(&self, detector: &str) {
        self.with_exposition(|x| x.clear(detector));
        let serving = self.status.lock().ok().and_then(|mut s| s.remove(detector));
        if let Some(version) = serving.and_then(|s| s.model_version) {
            let _ = self
                .telemetry
                .model_info
                .remove_label_values(&[detector, &version]);
            self.telemetry.models_loaded.dec();
            let _ = self
                .telemetry
                .model_trained
                .remove_label_values(&[detector]);
        }
    }

    /// Whether a maintenance window covers this point: no episode is recorded inside one.
    fn in_maintenance(&self, detector: &str, labels: &crate::source::Labels, ts: i64) -> bool {
        self.windows
            .read()
            .is_ok_and(|w| w.iter().any(|w| w.covers(detector, labels, ts)))
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
    let heartbeat = match (&exporter.owner, &exporter.registry) {
        (Some(Owner::Members(members)), Some(registry)) => {
            // Known to the others before the first cycle, so no series is scored twice.
            refresh_members(registry, members).await;
            Some(tokio::spawn(heartbeat(
                registry.clone(),
                members.clone(),
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let supervisor = tokio::spawn(supervise(exporter.clone(), stop_rx));
    tracing::info!(%listen, "serving /metrics");
    serve_http(listener, exporter.clone(), Some(api), shutdown).await;
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    if let Some(task) = heartbeat {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// How often a member heartbeats and re-reads the live members.
pub const MEMBER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// A member silent this long is gone (it crashed; a clean stop leaves at once).
pub const MEMBER_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// This exporter's member name: the pod name in Kubernetes, else host, listen address and pid.
fn member_name(listen: std::net::SocketAddr) -> String {
    std::env::var(crate::shard::POD_NAME_ENV).unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "mad".into());
        format!("{host}/{listen}/{}", std::process::id())
    })
}

async fn refresh_members(registry: &Registry, members: &Membership) {
    let outcome = async {
        registry.heartbeat(members.me()).await?;
        registry.live_members(MEMBER_TTL).await
    }
    .await;
    match outcome {
        Ok(live) => members.set_live(live),
        // The last known members stay: a database hiccup must not make everyone score all.
        Err(e) => tracing::warn!(error = %e, "membership heartbeat failed"),
    }
}

/// Heartbeats until `stop`, then leaves so the others take this member's series at once.
async fn heartbeat(registry: Registry, members: Arc<Membership>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(MEMBER_HEARTBEAT);
    loop {
        tokio::select! {
            _ = tick.tick() => refresh_members(&registry, &members).await,
            _ = stop.changed() => break,
        }
    }
    if let Err(e) = registry.leave(members.me()).await {
        tracing::warn!(error = %e, "could not leave the members table; the others wait for its heartbeat to expire");
    }
}

/// A running detector loop.
struct Running {
    detector: Detector,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Keeps one loop per wanted detector (config file plus database, re-read every
/// `reload_interval`) and the maintenance windows fresh, until `stop`; then stops every loop.
async fn supervise(exporter: Arc<Exporter>, mut stop: watch::Receiver<bool>) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    loop {
        match merged_detectors(&exporter.config.detectors, exporter.registry.as_ref()).await {
            Ok(wanted) => {
                let wanted: BTreeMap<String, Detector> = wanted
                    .into_iter()
                    .map(|(d, _)| (d.name.0.clone(), d))
                    .collect();
                let outdated: Vec<String> = running
                    .iter()
                    .filter(|(name, r)| {
                        wanted
                            .get(*name)
                            .is_none_or(|d| format!("{d:?}") != format!("{:?}", r.detector))
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in outdated {
                    if let Some(r) = running.remove(&name) {
                        let _ = r.stop.send(true);
                        let _ = r.task.await;
                        exporter.forget(&name);
                        tracing::info!(detector = %name, "detector loop stopped");
                    }
                }
                for (name, detector) in &wanted {
                    if !running.contains_key(name) {
                        let (tx, rx) = watch::channel(false);
                        let task =
                            tokio::spawn(detector_loop(exporter.clone(), detector.clone(), rx));
                        running.insert(
                            name.clone(),
                            Running {
                                detector: detector.clone(),
                                stop: tx,
                                task,
                            },
                        );
                    }
                }
                if let Ok(mut serving) = exporter.serving.lock() {
                    *serving = wanted;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read database detectors; keeping the current set")
            }
        }
        if let Some(registry) = &exporter.registry {
            let now = unix_now();
            match registry
                .windows(now - WINDOW_LOOKBACK_SECS, now + WINDOW_LOOKAHEAD_SECS)
                .await
            {
                Ok(windows) => {
                    if let Ok(mut current) = exporter.windows.write() {
                        *current = windows;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read maintenance windows; keeping the last ones")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(exporter.config.server.reload_interval.0) => {}
            _ = stop.changed() => break,
        }
    }
    for (_, r) in running {
        let _ = r.stop.send(true);
        let _ = r.task.await;
    }
}

/// Maintenance windows this far back and ahead are kept in memory.
const WINDOW_LOOKBACK_SECS: i64 = 7 * 86_400;
const WINDOW_LOOKAHEAD_SECS: i64 = 366 * 86_400;

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
                        scorer = Some(scorer_for(&detector, model, scorer.take()));
                    }
                }
                continue;
            }
            _ = stop.changed() => break,
        }
        if Instant::now() >= next_reload {
            next_reload = Instant::now() + reload_every;
            if let Some(model) = reload(&exporter, &name, scorer.as_ref(), &mut rejected).await {
                scorer = Some(scorer_for(&detector, model, scorer.take()));
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
            exporter
                .telemetry
                .model_trained
                .with_label_values(&[detector])
                .set(model.meta.trained_at as f64);
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

/// A scorer for `detector` with the model it will run. Where that model continues the one
/// `previous` ran (`mad train --if-due`), its series go on with their states
/// ([`DetectorScorer::go_on_from`]) instead of warming up again.
fn scorer_for(
    detector: &Detector,
    model: Arc<Forecaster>,
    previous: Option<DetectorScorer>,
) -> DetectorScorer {
    let mut scorer = DetectorScorer::new(model, detector.staleness().as_secs() as i64)
        .with_detection(detector.detection);
    if let Some(previous) = previous {
        let went_on = scorer.go_on_from(previous);
        if went_on > 0 {
            tracing::info!(detector = %detector.name, series = went_on, "series go on with the continued model");
        }
    }
    scorer
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
    let (mut fetched, given_up) = match fetch(exporter, detector, scorer, end, step).await {
        Ok(fetched) => fetched,
        Err(e) => {
            tracing::warn!(detector = name, error = %e, "fetch failed; dropping this detector's scores until it recovers");
            t.error(name, e.kind());
            scorer.clear_latest();
            exporter.with_exposition(|x| x.clear(name));
            return;
        }
    };
    scorer.forget(&given_up);
    let oversized = drop_oversized(&mut fetched);
    if oversized > 0 {
        tracing::warn!(
            detector = name,
            series = oversized,
            max_labels = MAX_LABELS,
            max_bytes = MAX_LABEL_SET_BYTES,
            "series whose label set is too large or holds a NUL character are not scored"
        );
        t.errors
            .with_label_values(&[name, "label_limit"])
            .inc_by(oversized as u64);
    }
    let inference = Instant::now();
    let result = tokio::task::block_in_place(|| scorer.score_cycle(&fetched, now));
    t.inference_duration
        .with_label_values(&[name])
        .observe(inference.elapsed().as_secs_f64());
    match result {
        Ok((stats, scored)) => {
            exporter.with_exposition(|x| x.update(name, scorer, detector.is_multivariate()));
            if let Some(history) = &exporter.history {
                // Inside a maintenance window a point counts as normal: nothing opens there.
                let scored: Vec<(&Labels, Vec<Score>)> = scored
                    .iter()
                    .map(|(index, scores)| {
                        let labels = &fetched[*index].labels;
                        let scores = scores
                            .iter()
                            .map(|s| {
                                if exporter.in_maintenance(name, labels, s.ts) {
                                    Score { score: 0.0, ..*s }
                                } else {
                                    *s
                                }
                            })
                            .collect();
                        (labels, scores)
                    })
                    .collect();
                let changed = if detector.is_multivariate() {
                    let points = scored
                        .iter()
                        .flat_map(|(labels, scores)| scores.iter().map(|s| (*labels, s)));
                    episodes.observe_groups(&group::combine(points))
                } else {
                    scored
                        .iter()
                        .flat_map(|(labels, scores)| episodes.observe(labels, scores))
                        .collect()
                };
                for episode in changed {
                    history.record(episode);
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
/// window when a series shows up that the scorer has not seen. Also returns the series the
/// scorer tracks that are no longer this replica's (the members changed).
async fn fetch(
    exporter: &Exporter,
    detector: &Detector,
    scorer: &DetectorScorer,
    end: i64,
    step: i64,
) -> Result<(Vec<Series>, Vec<Labels>), SourceError> {
    let queries = detector.queries();
    let timer = exporter
        .telemetry
        .query_duration
        .with_label_values(&[detector.name.0.as_str()]);
    let lookback = scorer.lookback_points(end) as i64;
    let started = Instant::now();
    let owner = exporter.owner.as_ref();
    let mut given_up = Vec::new();
    let mut fetched = exporter
        .client
        .query_detector(queries, end - (lookback - 1) * step, end, step)
        .await?;
    own_share(owner, detector, scorer, &mut fetched, &mut given_up);
    let full = scorer.warmup_points() as i64 + 1;
    if lookback < full && scorer.has_unknown(&fetched) {
        fetched = exporter
            .client
            .query_detector(queries, end - (full - 1) * step, end, step)
            .await?;
        own_share(owner, detector, scorer, &mut fetched, &mut given_up);
    }
    timer.observe(started.elapsed().as_secs_f64());
    Ok((fetched, given_up))
}

/// Keeps the series this replica scores; those it no longer owns but the scorer still tracks go
/// to `given_up`, so they leave its /metrics now rather than going stale.
fn own_share(
    owner: Option<&Owner>,
    detector: &Detector,
    scorer: &DetectorScorer,
    fetched: &mut Vec<Series>,
    given_up: &mut Vec<Labels>,
) {
    let Some(owner) = owner else {
        return;
    };
    fetched.retain(|s| {
        let mine = owns(owner, detector, &s.labels);
        if !mine && scorer.tracks(&s.labels) {
            given_up.push(s.labels.clone());
        }
        mine
    });
}

/// Whether `owner` scores a series: by its labels, or by its group's for a multivariate detector
/// (a group's inputs stay together).
fn owns(owner: &Owner, detector: &Detector, labels: &Labels) -> bool {
    if detector.is_multivariate() {
        owner.owns_series(&group_of(labels).0)
    } else {
        owner.owns_series(labels)
    }
}
