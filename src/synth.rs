//! Realistic synthetic metrics with known incidents, for the demo and the tests.
//!
//! Every value is a pure function of (profile, time, seed), so the history imported up front and
//! the points fed live afterwards form one continuous series, and a test can say exactly when an
//! incident happened.

use std::fmt::Write;

use crate::source::Labels;

const DAY: f64 = 86_400.0;
const WEEK: f64 = 7.0 * DAY;

/// How one series behaves when nothing is wrong.
#[derive(Debug, Clone)]
pub struct Profile {
    pub metric: String,
    pub labels: Labels,
    pub base: f64,
    /// Relative amplitude of the daily cycle (peak in the afternoon).
    pub daily: f64,
    /// Relative dip on Saturdays and Sundays.
    pub weekend_dip: f64,
    /// Relative amplitude of a fast cycle, for tests that cannot wait a day.
    pub fast: f64,
    pub fast_period_secs: f64,
    /// Relative growth per week.
    pub trend_per_week: f64,
    /// Relative standard deviation of the noise.
    pub noise: f64,
}

/// Something going wrong: the series' value is changed between `start` and `end` (inclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    /// Index into the profiles.
    pub series: usize,
    pub start: i64,
    pub end: i64,
    pub kind: IncidentKind,
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IncidentKind {
    /// Multiply by `1 + factor` (a traffic spike, a CPU storm).
    Spike { factor: f64 },
    /// Multiply by `1 - factor` (an outage upstream).
    Drop { factor: f64 },
}

#[derive(Debug, Clone)]
pub struct Synth {
    pub profiles: Vec<Profile>,
    pub incidents: Vec<Incident>,
    pub seed: u64,
    /// Where the trend starts (Unix seconds).
    pub origin: i64,
}

impl Synth {
    /// The value of series `index` at Unix time `ts` (seconds).
    pub fn value(&self, index: usize, ts: i64) -> f64 {
        let p = &self.profiles[index];
        let t = ts as f64;
        let phase = |period: f64| std::f64::consts::TAU * t.rem_euclid(period) / period;
        // Peak at 14:00 UTC.
        let daily = 1.0 + p.daily * (phase(DAY) - std::f64::consts::TAU * 14.0 / 24.0).cos();
        // Unix day 0 was a Thursday: days 2 and 3 of the week are Saturday and Sunday.
        let weekday = (t.rem_euclid(WEEK) / DAY) as i64;
        let weekly = if weekday == 2 || weekday == 3 {
            1.0 - p.weekend_dip
        } else {
            1.0
        };
        let fast = 1.0 + p.fast * phase(p.fast_period_secs.max(1.0)).sin();
        let trend = 1.0 + p.trend_per_week * (t - self.origin as f64) / WEEK;
        let noise = 1.0 + p.noise * gaussian(self.seed, index as u64, ts);
        let mut value = p.base * daily * weekly * fast * trend * noise;
        for incident in &self.incidents {
            if incident.series == index && ts >= incident.start && ts <= incident.end {
                value *= match incident.kind {
                    IncidentKind::Spike { factor } => 1.0 + factor,
                    IncidentKind::Drop { factor } => 1.0 - factor,
                };
            }
        }
        value.max(0.0)
    }

    /// The samples of every series at `ts` in Prometheus text format with millisecond
    /// timestamps, as `/api/v1/import/prometheus` takes them.
    pub fn exposition_at(&self, ts: i64, out: &mut String) {
        for index in 0..self.profiles.len() {
            self.sample_of(index, ts, out);
        }
    }

    /// The sample of series `index` at `ts`, as one line of [`Synth::exposition_at`]: for
    /// tests whose series come and go.
    pub fn sample_of(&self, index: usize, ts: i64, out: &mut String) {
        let p = &self.profiles[index];
        out.push_str(&p.metric);
        out.push('{');
        for (j, (k, v)) in p.labels.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"");
            crate::expose::escape_label_value(v, out);
            out.push('"');
        }
        let _ = writeln!(out, "}} {} {}", self.value(index, ts), ts * 1000);
    }

    /// The incident of series `index` covering `ts`, if any.
    pub fn incident_at(&self, index: usize, ts: i64) -> Option<&Incident> {
        self.incidents
            .iter()
            .find(|i| i.series == index && ts >= i.start && ts <= i.end)
    }
}

/// Standard normal noise from (seed, series, time): reproducible without keeping state.
fn gaussian(seed: u64, series: u64, ts: i64) -> f64 {
    let a = splitmix(seed ^ splitmix(series.wrapping_add(0x9E37)) ^ splitmix(ts as u64));
    let b = splitmix(a);
    let u1 = ((a >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((b >> 11) as f64) / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The demo's services: request rates with daily and weekly rhythm and growth, and CPU usage.
pub fn demo_profiles() -> Vec<Profile> {
    let service = |name: &str, base: f64, daily: f64| Profile {
        metric: "http_requests_per_second".into(),
        labels: labels(&[("job", "shop"), ("service", name)]),
        base,
        daily,
        weekend_dip: 0.3,
        fast: 0.0,
        fast_period_secs: 1.0,
        trend_per_week: 0.05,
        noise: 0.03,
    };
    let cpu = |instance: &str, base: f64| Profile {
        metric: "node_cpu_utilisation".into(),
        labels: labels(&[("job", "node"), ("instance", instance)]),
        base,
        daily: 0.35,
        weekend_dip: 0.15,
        fast: 0.0,
        fast_period_secs: 1.0,
        trend_per_week: 0.0,
        noise: 0.04,
    };
    vec![
        service("checkout", 120.0, 0.5),
        service("search", 900.0, 0.6),
        service("login", 60.0, 0.4),
        cpu("node-1:9100", 0.42),
        cpu("node-2:9100", 0.31),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth() -> Synth {
        Synth {
            profiles: demo_profiles(),
            incidents: vec![Incident {
                series: 0,
                start: 1_000,
                end: 1_060,
                kind: IncidentKind::Spike { factor: 1.0 },
                description: "spike".into(),
            }],
            seed: 7,
            origin: 0,
        }
    }

    #[test]
    fn values_are_reproducible_and_incidents_apply() {
        let s = synth();
        assert_eq!(s.value(0, 500), s.value(0, 500));
        let clean = Synth {
            incidents: vec![],
            ..s.clone()
        };
        assert!((s.value(0, 1_030) / clean.value(0, 1_030) - 2.0).abs() < 1e-9);
        assert_eq!(s.value(0, 2_000), clean.value(0, 2_000));
        assert!(s.incident_at(0, 1_030).is_some() && s.incident_at(1, 1_030).is_none());
    }

    #[test]
    fn noise_is_roughly_standard_normal() {
        let xs: Vec<f64> = (0..20_000).map(|t| gaussian(1, 2, t)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn daily_rhythm_peaks_in_the_afternoon() {
        let s = Synth {
            incidents: vec![],
            ..synth()
        };
        let monday = 4 * 86_400; // 1970-01-05 was a Monday
        let at = |h: i64| {
            (0..60)
                .map(|m| s.value(1, monday + h * 3600 + m * 60))
                .sum::<f64>()
        };
        assert!(at(14) > at(2) * 1.5);
    }

    #[test]
    fn exposition_lines_carry_millisecond_timestamps() {
        let mut out = String::new();
        synth().exposition_at(1_700_000_000, &mut out);
        let first = out.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("http_requests_per_second{job=\"shop\",service=\"checkout\"} "),
            "{first}"
        );
        assert!(first.ends_with(" 1700000000000"), "{first}");
        assert_eq!(out.lines().count(), demo_profiles().len());
    }
}
