//! What MAD keeps in PostgreSQL besides models: detectors defined at run time, maintenance
//! windows, the retraining queue and the recorded anomaly episodes. SQL is built only with
//! parameters; every function is one short transaction.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::config::Detector;
use crate::source::Labels;
use crate::store::{PgStore, StoreError};

/// Most rows one listing returns.
pub const MAX_PAGE: i64 = 1000;

#[derive(Clone)]
pub struct Registry {
    store: Arc<PgStore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    pub id: i64,
    /// Unix seconds.
    pub starts_at: i64,
    pub ends_at: i64,
    /// `None`: every detector.
    pub detector: Option<String>,
    /// Exact label matches a series must all have; empty: every series.
    pub matchers: Labels,
    pub reason: String,
}

impl MaintenanceWindow {
    /// Whether the point of `labels` at `ts` of `detector` lies inside this window.
    pub fn covers(&self, detector: &str, labels: &Labels, ts: i64) -> bool {
        ts >= self.starts_at
            && ts <= self.ends_at
            && self.detector.as_deref().is_none_or(|d| d == detector)
            && self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A window to create.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWindow {
    pub starts_at: i64,
    pub ends_at: i64,
    #[serde(default)]
    pub detector: Option<String>,
    #[serde(default)]
    pub matchers: Labels,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDetector {
    pub name: String,
    pub spec: serde_json::Value,
    pub updated_at: i64,
}

impl StoredDetector {
    /// The detector as the scoring and training code use it.
    pub fn detector(&self) -> Result<Detector, String> {
        let mut spec = self.spec.clone();
        if let Some(map) = spec.as_object_mut() {
            map.insert("name".into(), self.name.clone().into());
        }
        serde_json::from_value(spec).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingRequest {
    pub id: i64,
    pub detector: String,
    pub status: String,
    pub requested_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub trainer: Option<String>,
    pub version: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpisodeRow {
    pub id: i64,
    pub detector: String,
    pub labels: serde_json::Value,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub peak_score: f64,
    /// A multivariate detector's inputs that drove the peak, strongest first.
    pub drivers: Vec<String>,
}

/// Filter and page of an anomaly listing: newest first, continue with `before_id`.
#[derive(Debug, Clone, Default)]
pub struct AnomalyQuery {
    pub detector: Option<String>,
    pub matchers: Labels,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

fn to_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn from_time(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn window(row: &Row) -> Result<MaintenanceWindow, tokio_postgres::Error> {
    let matchers: serde_json::Value = row.try_get(4)?;
    Ok(MaintenanceWindow {
        id: row.try_get(0)?,
        starts_at: from_time(row.try_get(1)?),
        ends_at: from_time(row.try_get(2)?),
        detector: row.try_get(3)?,
        matchers: serde_json::from_value(matchers).unwrap_or_default(),
        reason: row.try_get(5)?,
    })
}

fn request(row: &Row) -> Result<TrainingRequest, tokio_postgres::Error> {
    let time = |i: usize| -> Result<Option<i64>, tokio_postgres::Error> {
        Ok(row.try_get::<_, Option<SystemTime>>(i)?.map(from_time))
    };
    Ok(TrainingRequest {
        id: row.try_get(0)?,
        detector: row.try_get(1)?,
        status: row.try_get(2)?,
        requested_at: from_time(row.try_get(3)?),
        started_at: time(4)?,
        finished_at: time(5)?,
        trainer: row.try_get(6)?,
        version: row.try_get(7)?,
        error: row.try_get(8)?,
    })
}

const WINDOW_COLUMNS: &str = "id, starts_at, ends_at, detector, matchers, reason";
const REQUEST_COLUMNS: &str =
    "id, detector, status, requested_at, started_at, finished_at, trainer, version, error";

impl Registry {
    pub fn new(store: Arc<PgStore>) -> Registry {
        Registry { store }
    }

    fn fail(e: tokio_postgres::Error) -> StoreError {
        StoreError::Database {
            target: "registry".into(),
            message: e.to_string(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.store.client().await
    }

    /// Records that `member` is alive now.
    pub async fn heartbeat(&self, member: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO exporter_members (member, heartbeat) VALUES ($1, now()) \
                 ON CONFLICT (member) DO UPDATE SET heartbeat = now()",
                &[&member],
            )
            .await
            .map_err(Self::fail)?;
        Ok(())
    }

    /// The members whose heartbeat is younger than `ttl`, by name.
    pub async fn live_members(&self, ttl: std::time::Duration) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT member FROM exporter_members \
                 WHERE heartbeat > now() - make_interval(secs => $1) ORDER BY member",
                &[&ttl.as_secs_f64()],
            )
            .await
            .map_err(Self::fail)?;
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(Self::fail)
    }

    /// Removes `member` (it is stopping: the others take its series at their next heartbeat).
    pub async fn leave(&self, member: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM exporter_members WHERE member = $1", &[&member])
            .await
            .map_err(Self::fail)?;
        Ok(())
    }

    /// Windows that overlap `[from, to]` (Unix seconds), oldest first.
    pub async fn windows(&self, from: i64, to: i64) -> Result<Vec<MaintenanceWindow>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {WINDOW_COLUMNS} FROM maintenance_windows \
                     WHERE ends_at >= $1 AND starts_at <= $2 ORDER BY starts_at, id LIMIT $3"
                ),
                &[&to_time(from), &to_time(to), &MAX_PAGE],
            )
            .await
            .map_err(Self::fail)?;
        rows.iter()
            .map(window)
            .collect::<Result<_, _>>()
            .map_err(Self::fail)
    }

    pub async fn create_window(&self, new: &NewWindow) -> Result<MaintenanceWindow, StoreError> {
        let matchers = serde_json::to_value(&new.matchers).unwrap_or_default();
        let row = self
            .client()
            .await?
            .query_one(
                &format!(
                    "INSERT INTO maintenance_windows (starts_at, ends_at, detector, matchers, reason) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING {WINDOW_COLUMNS}"
                ),
                &[&to_time(new.starts_at), &to_time(new.ends_at), &new.detector, &matchers, &new.reason],
            )
            .await
            .map_err(Self::fail)?;
        window(&row).map_err(Self::fail)
    }

    pub async fn delete_window(&self, id: i64) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM maintenance_windows WHERE id = $1", &[&id])
            .await
            .map_err(Self::fail)?;
        Ok(n > 0)
    }

    pub async fn detectors(&self) -> Result<Vec<StoredDetector>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, spec, updated_at FROM detectors ORDER BY name",
                &[],
            )
            .await
            .map_err(Self::fail)?;
        rows.iter()
            .map(|r| {
                Ok(StoredDetector {
                    name: r.try_get(0)?,
                    spec: r.try_get(1)?,
                    updated_at: from_time(r.try_get(2)?),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(Self::fail)
    }

    /// Creates (`create = true`, fails if it exists) or replaces (fails if it does not) a
    /// detector; `Ok(false)` when the precondition did not hold.
    pub async fn put_detector(
        &self,
        name: &str,
        spec: &serde_json::Value,
        create: bool,
    ) -> Result<bool, StoreError> {
        let sql = if create {
            "INSERT INTO detectors (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
        } else {
            "UPDATE detectors SET spec = $2, updated_at = now() WHERE name = $1"
        };
        let n = self
            .client()
            .await?
            .execute(sql, &[&name, spec])
            .await
            .map_err(Self::fail)?;
        Ok(n > 0)
    }

    pub async fn delete_detector(&self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM detectors WHERE name = $1", &[&name])
            .await
            .map_err(Self::fail)?;
        Ok(n > 0)
    }

    pub async fn request_training(&self, detector: &str) -> Result<TrainingRequest, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                &format!("INSERT INTO training_requests (detector) VALUES ($1) RETURNING {REQUEST_COLUMNS}"),
                &[&detector],
            )
            .await
            .map_err(Self::fail)?;
        request(&row).map_err(Self::fail)
    }

    /// Takes the oldest queued request, marking it running by `trainer`. Concurrent trainers
    /// skip rows another one has locked, so no request is taken twice.
    pub async fn take_training_request(
        &self,
        trainer: &str,
    ) -> Result<Option<TrainingRequest>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE training_requests SET status = 'running', started_at = now(), trainer = $1 \
                     WHERE id = (SELECT id FROM training_requests WHERE status = 'queued' \
                                 ORDER BY requested_at, id FOR UPDATE SKIP LOCKED LIMIT 1) \
                     RETURNING {REQUEST_COLUMNS}"
                ),
                &[&trainer],
            )
            .await
            .map_err(Self::fail)?;
        row.map(|r| request(&r)).transpose().map_err(Self::fail)
    }

    pub async fn finish_training_request(
        &self,
        id: i64,
        outcome: Result<&str, &str>,
    ) -> Result<(), StoreError> {
        let (status, version, error) = match outcome {
            Ok(v) => ("done", Some(v), None),
            Err(e) => ("failed", None, Some(e)),
        };
        self.client()
            .await?
            .execute(
                "UPDATE training_requests SET status = $2, finished_at = now(), version = $3, error = $4 \
                 WHERE id = $1",
                &[&id, &status, &version, &error],
            )
            .await
            .map_err(Self::fail)?;
        Ok(())
    }

    pub async fn training_requests(&self, limit: i64) -> Result<Vec<TrainingRequest>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM training_requests ORDER BY id DESC LIMIT $1"
                ),
                &[&limit.clamp(1, MAX_PAGE)],
            )
            .await
            .map_err(Self::fail)?;
        rows.iter()
            .map(request)
            .collect::<Result<_, _>>()
            .map_err(Self::fail)
    }

    /// Episodes matching `q`, newest first.
    pub async fn anomalies(&self, q: &AnomalyQuery) -> Result<Vec<EpisodeRow>, StoreError> {
        let matchers = serde_json::to_value(&q.matchers).unwrap_or_default();
        let from = q.from.map(to_time);
        let to = q.to.map(to_time);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, detector, labels, started_at, ended_at, peak_score, drivers FROM anomaly_episodes \
                 WHERE ($1::text IS NULL OR detector = $1) \
                   AND labels @> $2 \
                   AND ($3::timestamptz IS NULL OR coalesce(ended_at, 'infinity') >= $3) \
                   AND ($4::timestamptz IS NULL OR started_at <= $4) \
                   AND ($5::bigint IS NULL OR id < $5) \
                 ORDER BY id DESC LIMIT $6",
                &[&q.detector, &matchers, &from, &to, &q.before_id, &q.limit.clamp(1, MAX_PAGE)],
            )
            .await
            .map_err(Self::fail)?;
        rows.iter()
            .map(|r| {
                Ok(EpisodeRow {
                    id: r.try_get(0)?,
                    detector: r.try_get(1)?,
                    labels: r.try_get(2)?,
                    started_at: from_time(r.try_get(3)?),
                    ended_at: r.try_get::<_, Option<SystemTime>>(4)?.map(from_time),
                    peak_score: r.try_get(5)?,
                    drivers: r
                        .try_get::<_, Option<serde_json::Value>>(6)?
                        .and_then(|v| serde_json::from_value(v).ok())
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(Self::fail)
    }
}

/// Drops the points of `values` (on the grid starting at `start` with `step`) that fall inside a
/// window covering this series: training must not learn maintenance as normal.
pub fn exclude_windows(
    windows: &[MaintenanceWindow],
    detector: &str,
    labels: &Labels,
    timestamps: &[i64],
    values: &mut [f64],
) -> usize {
    let relevant: Vec<&MaintenanceWindow> = windows
        .iter()
        .filter(|w| w.detector.as_deref().is_none_or(|d| d == detector))
        .filter(|w| w.matchers.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .collect();
    let mut excluded = 0;
    for (ts, value) in timestamps.iter().zip(values.iter_mut()) {
        if value.is_finite()
            && relevant
                .iter()
                .any(|w| *ts >= w.starts_at && *ts <= w.ends_at)
        {
            *value = f64::NAN;
            excluded += 1;
        }
    }
    excluded
}

/// Where a detector is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorSource {
    Config,
    Database,
}

impl std::fmt::Display for DetectorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DetectorSource::Config => "config",
            DetectorSource::Database => "database",
        })
    }
}

/// The config file's detectors plus the database's; on a name clash the config file wins (it is
/// what the operator deployed). Database specs that no longer parse are skipped with a warning.
pub async fn merged_detectors(
    configured: &[Detector],
    registry: Option<&Registry>,
) -> Result<Vec<(Detector, DetectorSource)>, StoreError> {
    let mut all: Vec<(Detector, DetectorSource)> = configured
        .iter()
        .map(|d| (d.clone(), DetectorSource::Config))
        .collect();
    if let Some(registry) = registry {
        for stored in registry.detectors().await? {
            if configured.iter().any(|d| d.name.0 == stored.name) {
                tracing::warn!(detector = %stored.name, "database detector shadowed by the config file");
                continue;
            }
            match stored.detector() {
                Ok(d) => all.push((d, DetectorSource::Database)),
                Err(e) => {
                    tracing::warn!(detector = %stored.name, error = %e, "database detector skipped")
                }
            }
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::source::labels_of as labels;

    fn window(detector: Option<&str>, matchers: &[(&str, &str)]) -> MaintenanceWindow {
        MaintenanceWindow {
            id: 1,
            starts_at: 100,
            ends_at: 200,
            detector: detector.map(str::to_string),
            matchers: labels(matchers),
            reason: "upgrade".into(),
        }
    }

    #[test]
    fn windows_cover_by_time_detector_and_labels() {
        let a = labels(&[("instance", "a"), ("job", "x")]);
        assert!(window(None, &[]).covers("cpu", &a, 150));
        assert!(!window(None, &[]).covers("cpu", &a, 201));
        assert!(window(Some("cpu"), &[("instance", "a")]).covers("cpu", &a, 100));
        assert!(!window(Some("mem"), &[]).covers("cpu", &a, 150));
        assert!(!window(None, &[("instance", "b")]).covers("cpu", &a, 150));
    }

    #[test]
    fn excluded_points_become_gaps() {
        let ts: Vec<i64> = (0..6).map(|i| 60 + i * 30).collect(); // 60, 90, ..., 210
        let mut values = vec![1.0; 6];
        let n = exclude_windows(&[window(None, &[])], "cpu", &labels(&[]), &ts, &mut values);
        assert_eq!(n, 3, "120, 150 and 180 lie in [100, 200]");
        assert_eq!(values.iter().filter(|v| v.is_nan()).count(), 3);
        assert!(values[1] == 1.0 && values[5] == 1.0);
    }
}
