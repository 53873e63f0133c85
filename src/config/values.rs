//! The types a field is parsed into. Each checks its text while the YAML is read, so a bad
//! value's error carries the file, line and field: durations, URLs, names, bounded numbers and
//! secrets.

use std::fmt;

use mad_training::trainer::{MAX_DROPOUT, MAX_ENSEMBLE_MEMBERS, MAX_LAYERS};
use serde::{Deserialize, Deserializer};

/// An anomaly score threshold: a finite number above zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold(pub f64);

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x.is_finite() && x > 0.0) {
            return Err(serde::de::Error::custom(format!(
                "must be a number above 0, got {x}"
            )));
        }
        Ok(Threshold(x))
    }
}

/// An extra alert label's name: a Prometheus label name that the generated rules do not set
/// themselves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelName(pub String);

impl LabelName {
    /// Labels the generated rules or the scored series already carry.
    pub const RESERVED: [&'static str; 4] = ["alertname", "detector", "severity", "for"];

    pub fn parse(text: &str) -> Result<LabelName, String> {
        let mut chars = text.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || text.starts_with("__") {
            return Err(format!(
                "invalid label name {text:?}: use [A-Za-z_][A-Za-z0-9_]*, not starting with __"
            ));
        }
        if LabelName::RESERVED.contains(&text) {
            return Err(format!(
                "label {text:?} is set by the generated rules; choose another name"
            ));
        }
        Ok(LabelName(text.to_string()))
    }
}

impl<'de> Deserialize<'de> for LabelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        LabelName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for LabelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest duration accepted anywhere (100 years): longer ones are typos, and the step,
/// interval and window arithmetic (`step × window × 4`, `5 × interval`) must not overflow.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 31_557_600);

/// `humantime::parse_duration`, refusing more than [`MAX_DURATION`].
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let parsed = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e} (use e.g. 30s, 1m, 14d)"))?;
    if parsed > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is longer than {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(parsed)
}

/// A humantime duration (`30s`, `1m`, `14d`); zero is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parsed = parse_duration(&text).map_err(serde::de::Error::custom)?;
        if parsed.is_zero() {
            return Err(serde::de::Error::custom(
                "duration must be greater than zero",
            ));
        }
        Ok(Duration(parsed))
    }
}

/// A humantime duration where zero makes sense (`for: 0s`: open on the first point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroOrDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for ZeroOrDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(ZeroOrDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// An absolute http(s) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub url::Url);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let shown = without_userinfo(text.trim());
        let url = url::Url::parse(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("invalid URL {shown:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(serde::de::Error::custom(format!(
                "invalid URL {shown:?}: expected http://host[:port][/path]"
            )));
        }
        Ok(HttpUrl(url))
    }
}

impl HttpUrl {
    /// The URL without user and password: what requests are sent to (the credentials go as
    /// basic auth) and what messages may show.
    pub fn without_credentials(&self) -> url::Url {
        let mut url = self.0.clone();
        // These fail only for URLs that cannot carry credentials, which then have none.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url
    }
}

/// URL text as it may go into an error when it does not parse: whatever stands between the
/// scheme and the last `@` (user and password, which may hold the `#` or `/` that broke the
/// parse) replaced by `***`.
fn without_userinfo(text: &str) -> String {
    let start = text.find("://").map_or(0, |i| i + 3);
    match text[start..].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &text[start + at..]),
        None => text.to_string(),
    }
}

/// A detector name: it becomes the `for` label and a directory name, so keep it tame.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DetectorName(pub String);

impl DetectorName {
    pub fn parse(text: &str) -> Result<DetectorName, String> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !text.starts_with('.');
        if valid {
            Ok(DetectorName(text.to_string()))
        } else {
            Err(format!(
                "invalid detector name {text:?}: use 1-64 characters from [A-Za-z0-9_.-], not starting with '.'"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for DetectorName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DetectorName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DetectorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The label that names a multivariate detector's input on its per-input series (the model
/// contract's: a joint model groups series by it).
pub use mad_training::contract::INPUT_LABEL;

/// A multivariate detector's input name, used as the value of its `input` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputName(pub String);

impl<'de> Deserialize<'de> for InputName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if valid {
            Ok(InputName(text))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid input name {text:?}: use 1-64 characters from [A-Za-z0-9_.-]"
            )))
        }
    }
}

/// A string that must not be blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(NonEmpty(text))
    }
}

/// The model window: enough points to warm an LSTM up, few enough to stay cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(pub usize);

impl Window {
    pub const MIN: usize = 4;
    pub const MAX: usize = 4096;
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = usize::deserialize(d)?;
        if !(Window::MIN..=Window::MAX).contains(&n) {
            return Err(serde::de::Error::custom(format!(
                "window must be between {} and {} points, got {n}",
                Window::MIN,
                Window::MAX
            )));
        }
        Ok(Window(n))
    }
}

/// Stacked LSTM layers: at least one, at most what the trainer trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers(pub usize);

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_to(d, "layers", MAX_LAYERS).map(Layers)
    }
}

/// A count from 1 to `max`, else an error that names `what`.
fn one_to<'de, D: Deserializer<'de>>(d: D, what: &str, max: usize) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if !(1..=max).contains(&n) {
        return Err(serde::de::Error::custom(format!(
            "{what} must be between 1 and {max}, got {n}"
        )));
    }
    Ok(n)
}

/// Ensemble members: at least one, at most [`MAX_ENSEMBLE_MEMBERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensemble(pub usize);

impl<'de> Deserialize<'de> for Ensemble {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_to(d, "ensemble", MAX_ENSEMBLE_MEMBERS).map(Ensemble)
    }
}

/// A dropout rate: 0 (none) up to below [`MAX_DROPOUT`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutRate(pub f64);

impl<'de> Deserialize<'de> for DropoutRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(0.0..MAX_DROPOUT).contains(&x) {
            return Err(serde::de::Error::custom(format!(
                "dropout must be at least 0 and below {MAX_DROPOUT}, got {x}"
            )));
        }
        Ok(DropoutRate(x))
    }
}

/// A number in (0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if !(x > 0.0 && x < 1.0) {
            return Err(serde::de::Error::custom(format!(
                "must be strictly between 0 and 1, got {x}"
            )));
        }
        Ok(Fraction(x))
    }
}

/// A credential: never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` equals the secret, compared in constant time.
    pub fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq(given, self.0.as_bytes())
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: Secret,
}
