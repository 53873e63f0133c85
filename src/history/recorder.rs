//! Writes episodes to PostgreSQL without ever blocking scoring.
//!
//! Scoring hands episodes over with a non-blocking send; a background task writes them in
//! batches. While the database is unreachable they wait in a bounded buffer and are written,
//! in order, once it is back; only when the buffer is full are the oldest dropped (and counted),
//! and an episode the database refuses as data (which no retry would change) is dropped alone
//! instead of holding up every one after it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::Episode;
use crate::store::PgStore;

/// Episodes held while the database is away (plus as many again in the hand-over channel).
pub const RECORDER_BUFFER: usize = 10_000;
const BATCH: usize = 500;
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

const UPSERT: &str = "INSERT INTO anomaly_episodes \
     (detector, series, labels, started_at, ended_at, peak_score, drivers) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (detector, series, started_at) DO UPDATE SET \
     ended_at = COALESCE(EXCLUDED.ended_at, anomaly_episodes.ended_at), \
     peak_score = GREATEST(anomaly_episodes.peak_score, EXCLUDED.peak_score), \
     drivers = COALESCE(EXCLUDED.drivers, anomaly_episodes.drivers)";

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Episode>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    pending: AtomicUsize,
    written: AtomicU64,
    dropped: AtomicU64,
}

impl Recorder {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<PgStore>) -> Recorder {
        let (tx, rx) = mpsc::channel(RECORDER_BUFFER);
        let counters = Arc::new(Counters::default());
        tokio::spawn(write_loop(store, rx, counters.clone()));
        Recorder { tx, counters }
    }

    /// Hands an episode over; never waits. `false` when it had to be dropped.
    pub fn record(&self, episode: Episode) -> bool {
        match self.tx.try_send(episode) {
            Ok(()) => {
                self.counters.pending.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Episodes handed over but not yet written.
    pub fn pending(&self) -> usize {
        self.counters.pending.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

async fn write_loop(store: Arc<PgStore>, mut rx: mpsc::Receiver<Episode>, counters: Arc<Counters>) {
    let mut buffer: VecDeque<Episode> = VecDeque::new();
    let mut delay = RETRY_MIN;
    let mut failing = false;
    loop {
        if buffer.is_empty() {
            match rx.recv().await {
                Some(e) => buffer.push_back(e),
                None => return,
            }
        }
        while let Ok(e) = rx.try_recv() {
            if buffer.len() >= RECORDER_BUFFER {
                buffer.pop_front();
                counters.pending.fetch_sub(1, Ordering::Relaxed);
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            buffer.push_back(e);
        }
        let batch: Vec<Episode> = buffer.iter().take(BATCH).cloned().collect();
        let written = match write(&store, &batch).await {
            Ok(()) => {
                counters
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                Ok(batch.len())
            }
            // One refused row spoils its batch: the rows go one by one, and only those the
            // database refuses are dropped.
            Err(WriteError::Refused(_)) => write_singly(&store, &batch, &counters).await,
            Err(WriteError::Unavailable(e)) => Err((0, e)),
        };
        let handled = match written {
            Ok(handled) => {
                if failing {
                    tracing::info!(written = handled, "anomaly history writes resumed");
                }
                failing = false;
                delay = RETRY_MIN;
                handled
            }
            Err((handled, e)) => {
                if !failing {
                    tracing::warn!(error = %e, buffered = buffer.len(), "cannot write anomaly history; buffering");
                }
                failing = true;
                handled
            }
        };
        buffer.drain(..handled);
        counters.pending.fetch_sub(handled, Ordering::Relaxed);
        if failing {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

/// Writes `batch` one episode at a time, dropping those the database refuses. How many were
/// handled (written or dropped), and the error that stopped it early.
async fn write_singly(
    store: &PgStore,
    batch: &[Episode],
    counters: &Counters,
) -> Result<usize, (usize, crate::store::StoreError)> {
    for (handled, episode) in batch.iter().enumerate() {
        match write(store, std::slice::from_ref(episode)).await {
            Ok(()) => {
                counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(WriteError::Refused(reason)) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(detector = %episode.detector, error = %reason, "the database refuses this anomaly episode: dropped");
            }
            Err(WriteError::Unavailable(e)) => return Err((handled, e)),
        }
    }
    Ok(batch.len())
}

/// Why episodes were not written.
enum WriteError {
    /// A data exception (SQLSTATE class 22): the same rows can never be written.
    Refused(String),
    /// The database is away or failing: the rows wait and are tried again.
    Unavailable(crate::store::StoreError),
}

async fn write(store: &PgStore, batch: &[Episode]) -> Result<(), WriteError> {
    let fail = |e: tokio_postgres::Error| {
        if e.code().is_some_and(|c| c.code().starts_with("22")) {
            WriteError::Refused(e.to_string())
        } else {
            WriteError::Unavailable(crate::store::StoreError::Database {
                target: "anomaly_episodes".into(),
                message: e.to_string(),
            })
        }
    };
    let mut client = store.client().await.map_err(WriteError::Unavailable)?;
    let tx = client.transaction().await.map_err(fail)?;
    let statement = tx.prepare(UPSERT).await.map_err(fail)?;
    for e in batch {
        let labels = serde_json::to_value(&e.labels).unwrap_or_default();
        let drivers = (!e.drivers.is_empty()).then(|| serde_json::Value::from(e.drivers.clone()));
        let start = UNIX_EPOCH + Duration::from_secs(e.started_at.max(0) as u64);
        let end = e
            .ended_at
            .map(|t| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64));
        tx.execute(
            &statement,
            &[
                &e.detector,
                &e.series,
                &labels,
                &start,
                &end,
                &e.peak_score,
                &drivers,
            ],
        )
        .await
        .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)
}
