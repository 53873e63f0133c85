//! PNG charts of scored series: for the relay's Telegram messages (one alert's series) and for
//! `mad backtest --plot` (one panel per series, labelled anomaly windows shaded).
//!
//! [`fetch()`] reads MAD's five series of one scored series (`y`, `yhat`, `yhat_lower`,
//! `yhat_upper`, `anomaly_score`, each labelled like the input plus `for="<detector>"`) from
//! VictoriaMetrics or Prometheus with `/api/v1/query_range`; [`render_png`] draws them in two
//! panels: the value against its forecast band above, the score against the threshold 1 below.
//!
//! Text (title, HH:MM UTC time labels, legend) needs a TrueType font, loaded once at run time from
//! the system (Debian: `fonts-dejavu-core`, or `MAD_CHART_FONT=/path/to/font.ttf`). Without one
//! the chart is drawn all the same, without text.
//!
//! `fetch` reads, `draw` draws; this module holds what passes between them.

mod draw;
mod fetch;

pub use draw::{render_png, render_stack_png, text_available};
pub use fetch::{fetch, parse_range, selector, NON_SERIES_LABELS};

/// One timestamp of the chart; `None` where a series has no (finite) sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChartPoint {
    /// Unix seconds.
    pub ts: i64,
    pub y: Option<f64>,
    pub yhat: Option<f64>,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub score: Option<f64>,
}

/// What one chart shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChartData {
    pub title: String,
    /// Any order; sorted when drawn.
    pub points: Vec<ChartPoint>,
    /// The anomaly window (Unix seconds), shaded in both panels where it overlaps the data.
    pub anomaly_from: i64,
    pub anomaly_to: i64,
    /// Labelled anomaly windows (a backtest's ground truth), shaded in another colour.
    pub labelled: Vec<(i64, i64)>,
}
