//! MAD's own metrics, under the `mad_` prefix.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets from 100 µs to ~30 s: inference of one step is micro-seconds, a slow query seconds.
const DURATION_BUCKETS: [f64; 12] = [
    1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0,
];

#[derive(Clone)]
pub struct Telemetry {
    registry: Registry,
    pub query_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub cycle_duration: HistogramVec,
    pub errors: IntCounterVec,
    pub series_scored: IntGaugeVec,
    pub series_tracked: IntGaugeVec,
    pub points_scored: IntCounterVec,
    pub models_loaded: IntGauge,
    pub model_info: IntGaugeVec,
    pub model_reloads: IntCounterVec,
    pub model_trained: GaugeVec,
    pub last_success: GaugeVec,
    pub build_info: Gauge,
    pub episodes_pending: IntGauge,
    pub episodes_written: IntCounter,
    pub episodes_dropped: IntCounter,
}

impl Telemetry {
    pub fn new() -> Result<Telemetry, prometheus::Error> {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
                &["detector"],
            )
        };
        let t = Telemetry {
            query_duration: histogram(
                "mad_query_duration_seconds",
                "Time to fetch a detector's data from the datasource.",
            )?,
            inference_duration: histogram(
                "mad_inference_duration_seconds",
                "Time spent in ONNX Runtime per scoring cycle.",
            )?,
            cycle_duration: histogram(
                "mad_cycle_duration_seconds",
                "Time of a whole scoring cycle: fetch, score, render.",
            )?,
            errors: IntCounterVec::new(
                Opts::new("mad_errors_total", "Errors by detector and kind."),
                &["detector", "kind"],
            )?,
            series_scored: IntGaugeVec::new(
                Opts::new(
                    "mad_series_scored",
                    "Series that got a fresh score in the last cycle.",
                ),
                &["detector"],
            )?,
            series_tracked: IntGaugeVec::new(
                Opts::new(
                    "mad_series_tracked",
                    "Series whose model state the exporter keeps.",
                ),
                &["detector"],
            )?,
            points_scored: IntCounterVec::new(
                Opts::new("mad_points_scored_total", "Points scored since start."),
                &["detector"],
            )?,
            models_loaded: IntGauge::new("mad_models_loaded", "Detectors with a model loaded.")?,
            model_info: IntGaugeVec::new(
                Opts::new(
                    "mad_model_info",
                    "The model version each detector serves (value 1).",
                ),
                &["detector", "version"],
            )?,
            model_reloads: IntCounterVec::new(
                Opts::new(
                    "mad_model_reloads_total",
                    "Model loads by result (ok, rejected).",
                ),
                &["detector", "result"],
            )?,
            model_trained: GaugeVec::new(
                Opts::new(
                    "mad_model_trained_timestamp_seconds",
                    "Unix time the model each detector serves was trained.",
                ),
                &["detector"],
            )?,
            last_success: GaugeVec::new(
                Opts::new(
                    "mad_last_successful_cycle_timestamp_seconds",
                    "Unix time of the detector's last scoring cycle that succeeded.",
                ),
                &["detector"],
            )?,
            build_info: Gauge::with_opts(
                Opts::new("mad_build_info", "Build information (value 1).")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )?,
            episodes_pending: IntGauge::new(
                "mad_episodes_pending",
                "Anomaly episodes waiting to be written to PostgreSQL.",
            )?,
            episodes_written: IntCounter::new(
                "mad_episodes_written_total",
                "Anomaly episode writes (opened or closed) stored in PostgreSQL.",
            )?,
            episodes_dropped: IntCounter::new(
                "mad_episodes_dropped_total",
                "Anomaly episode writes lost because the buffer was full.",
            )?,
            registry,
        };
        t.build_info.set(1.0);
        let r = &t.registry;
        r.register(Box::new(t.query_duration.clone()))?;
        r.register(Box::new(t.inference_duration.clone()))?;
        r.register(Box::new(t.cycle_duration.clone()))?;
        r.register(Box::new(t.errors.clone()))?;
        r.register(Box::new(t.series_scored.clone()))?;
        r.register(Box::new(t.series_tracked.clone()))?;
        r.register(Box::new(t.points_scored.clone()))?;
        r.register(Box::new(t.models_loaded.clone()))?;
        r.register(Box::new(t.model_info.clone()))?;
        r.register(Box::new(t.model_reloads.clone()))?;
        r.register(Box::new(t.model_trained.clone()))?;
        r.register(Box::new(t.last_success.clone()))?;
        r.register(Box::new(t.build_info.clone()))?;
        r.register(Box::new(t.episodes_pending.clone()))?;
        r.register(Box::new(t.episodes_written.clone()))?;
        r.register(Box::new(t.episodes_dropped.clone()))?;
        Ok(t)
    }

    pub fn error(&self, detector: &str, kind: &str) {
        self.errors.with_label_values(&[detector, kind]).inc();
    }

    /// Brings a counter up to a running total kept elsewhere.
    pub fn catch_up(counter: &IntCounter, total: u64) {
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }

    pub fn write_to(&self, out: &mut String) {
        let mut buf = Vec::new();
        match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            Ok(()) => out.push_str(&String::from_utf8_lossy(&buf)),
            Err(e) => tracing::error!(error = %e, "cannot encode self-monitoring metrics"),
        }
    }
}
