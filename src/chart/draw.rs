//! Drawing: a chart's two panels (the value against its forecast band, the score against 1),
//! or a stack of them for a backtest, as PNG. Sizes and spans are bounded before plotters
//! sees them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use plotters::chart::SeriesAnno;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{ChartData, ChartPoint};
use crate::text::ellipsize;

const FONT_FAMILY: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];
/// Largest image accepted, per side (Telegram photos: 10,000 px width + height).
const MAX_SIDE: u32 = 4096;
const MIN_SIDE: u32 = 64;
/// Tallest stacked image (a backtest's panels): a PNG viewer's limit, not Telegram's.
const MAX_STACK_HEIGHT: u32 = 32_768;
/// Longest time range drawn (keeps the time axis' arithmetic far from overflow).
const MAX_SPAN_SECONDS: i64 = 10 * 366 * 86_400;

/// Whether text can be drawn: loads a system font the first time (see the module docs).
pub fn text_available() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let from_env = std::env::var_os("MAD_CHART_FONT").map(std::path::PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(std::path::PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // Registered fonts live as long as the process; this runs at most once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        tracing::warn!("no TrueType font found (install fonts-dejavu-core): charts without text");
        false
    })
}

/// Renders `data` as a PNG of `width` × `height` pixels. Non-finite values count as gaps; an
/// error when there is nothing to draw or the size is unreasonable.
pub fn render_png(data: &ChartData, width: u32, height: u32) -> Result<Vec<u8>, String> {
    render_with(data, width, height, text_available())
}

/// Renders `charts` one below the other (each `panel_height` pixels tall, value and score
/// panels as in [`render_png`]) into one PNG: a backtest's series at a glance.
pub fn render_stack_png(
    charts: &[ChartData],
    width: u32,
    panel_height: u32,
) -> Result<Vec<u8>, String> {
    let count = u32::try_from(charts.len()).map_err(|_| "too many charts".to_string())?;
    let height = panel_height
        .checked_mul(count)
        .filter(|h| (MIN_SIDE..=MAX_STACK_HEIGHT).contains(h))
        .ok_or_else(|| {
            format!("{count} panels of {panel_height} px do not fit in {MAX_STACK_HEIGHT} px")
        })?;
    if !(MIN_SIDE..=MAX_SIDE).contains(&width) {
        return Err(format!(
            "chart width {width} outside {MIN_SIDE}..={MAX_SIDE} pixels"
        ));
    }
    let text = text_available();
    let prepared = charts
        .iter()
        .map(Prepared::new)
        .collect::<Result<Vec<_>, _>>()?;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        for (area, (data, chart)) in root
            .split_evenly((charts.len(), 1))
            .iter()
            .zip(prepared.iter().zip(charts))
        {
            let split = (panel_height as f64 * 0.62) as u32;
            let (top, bottom) = area.split_vertically(split);
            draw_value_panel(&top, data, &chart.title, text)?;
            draw_score_panel(&bottom, data, text)?;
        }
        root.present().map_err(draw_error)?;
    }
    encode_png(&rgb, width, height)
}

fn render_with(data: &ChartData, width: u32, height: u32, text: bool) -> Result<Vec<u8>, String> {
    if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
        return Err(format!(
            "chart size {width}x{height} outside {MIN_SIDE}..={MAX_SIDE} pixels per side"
        ));
    }
    let prepared = Prepared::new(data)?;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let split = (height as f64 * 0.66) as u32;
        let (top, bottom) = root.split_vertically(split);
        draw_value_panel(&top, &prepared, &data.title, text)?;
        draw_score_panel(&bottom, &prepared, text)?;
        root.present().map_err(draw_error)?;
    }
    encode_png(&rgb, width, height)
}

fn draw_error(e: impl std::fmt::Display) -> String {
    format!("cannot draw the chart: {e}")
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder
        .write_header()
        .map_err(|e| format!("cannot encode the chart: {e}"))?;
    writer
        .write_image_data(rgb)
        .map_err(|e| format!("cannot encode the chart: {e}"))?;
    writer
        .finish()
        .map_err(|e| format!("cannot encode the chart: {e}"))?;
    Ok(out)
}

/// The points cleaned (finite values only, sorted, one per timestamp) and the ranges to draw.
struct Prepared {
    points: Vec<ChartPoint>,
    x: (i64, i64),
    value_y: (f64, f64),
    score_y: (f64, f64),
    /// Largest gap between neighbours still drawn as a connected line.
    max_gap: i64,
    /// The anomaly window clipped to `x`, if it overlaps.
    window: Option<(i64, i64)>,
    labelled: Vec<(i64, i64)>,
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

/// `(min, max)` padded by 5 %, widened when flat; `None` when empty or not representable.
fn padded_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return None;
    }
    let span = hi - lo;
    if !span.is_finite() {
        return None;
    }
    let pad = if span > f64::EPSILON * hi.abs().max(lo.abs()).max(1.0) {
        span * 0.05
    } else {
        (hi.abs() * 0.1).max(1.0)
    };
    let (lo, hi) = (lo - pad, hi + pad);
    (lo.is_finite() && hi.is_finite() && lo < hi).then_some((lo, hi))
}

impl Prepared {
    fn new(data: &ChartData) -> Result<Prepared, String> {
        let mut by_ts: BTreeMap<i64, ChartPoint> = BTreeMap::new();
        for p in &data.points {
            let slot = by_ts.entry(p.ts).or_insert(ChartPoint {
                ts: p.ts,
                ..ChartPoint::default()
            });
            // A repeated timestamp fills what the first left empty.
            slot.y = slot.y.or(finite(p.y));
            slot.yhat = slot.yhat.or(finite(p.yhat));
            slot.lower = slot.lower.or(finite(p.lower));
            slot.upper = slot.upper.or(finite(p.upper));
            slot.score = slot.score.or(finite(p.score));
        }
        let points: Vec<ChartPoint> = by_ts
            .into_values()
            .filter(|p| {
                p.y.is_some()
                    || p.yhat.is_some()
                    || p.lower.is_some()
                    || p.upper.is_some()
                    || p.score.is_some()
            })
            .collect();
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            return Err("nothing to draw: no finite values".into());
        };
        let mut x = (first.ts, last.ts);
        if x.0 == x.1 {
            x = (x.0.saturating_sub(60), x.1.saturating_add(60));
        }
        if x.1.saturating_sub(x.0) > MAX_SPAN_SECONDS {
            return Err("nothing to draw: timestamps span more than ten years".into());
        }
        let mut values = points
            .iter()
            .flat_map(|p| [p.y, p.yhat, p.lower, p.upper])
            .flatten()
            .peekable();
        let value_y = if values.peek().is_none() {
            (0.0, 1.0)
        } else {
            padded_range(values).ok_or("nothing to draw: values out of range")?
        };
        let (score_lo, score_hi) = points
            .iter()
            .filter_map(|p| p.score)
            .fold((0.0f64, 1.0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
        let score_y = padded_range([score_lo, score_hi * 1.05, 1.5].into_iter())
            .ok_or("nothing to draw: scores out of range")?;
        // Neighbours further apart than twice the usual step are a gap, not a line.
        let mut steps: Vec<i64> = points
            .windows(2)
            .map(|w| w[1].ts.saturating_sub(w[0].ts))
            .collect();
        steps.sort_unstable();
        let max_gap = steps
            .get(steps.len() / 2)
            .map_or(i64::MAX, |s| s.saturating_mul(2));
        let (from, to) = (
            data.anomaly_from.min(data.anomaly_to),
            data.anomaly_from.max(data.anomaly_to),
        );
        let clip = |(from, to): (i64, i64)| {
            (to >= x.0 && from <= x.1).then(|| (from.max(x.0), to.min(x.1)))
        };
        let window = clip((from, to));
        let labelled = data
            .labelled
            .iter()
            .filter_map(|(a, b)| clip((*a.min(b), *a.max(b))))
            .collect();
        Ok(Prepared {
            points,
            x,
            value_y,
            score_y,
            max_gap,
            window,
            labelled,
        })
    }

    /// The time axis with ticks on round clock times (plotters' own ticks for `i64` overflow on
    /// Unix times); no ticks without text, as a tick always gets a label.
    fn time_axis(&self, text: bool) -> TimeAxis {
        let ticks = if text {
            time_ticks(self.x.0, self.x.1)
        } else {
            Vec::new()
        };
        (self.x.0..self.x.1).with_key_points(ticks)
    }

    /// Runs of consecutive points where `f` has a value, split at gaps.
    fn runs<T>(&self, f: impl Fn(&ChartPoint) -> Option<T>) -> Vec<Vec<(i64, T)>> {
        let mut runs: Vec<Vec<(i64, T)>> = Vec::new();
        let mut current: Vec<(i64, T)> = Vec::new();
        for p in &self.points {
            match f(p) {
                Some(v) => {
                    let gap = current
                        .last()
                        .is_some_and(|(ts, _)| p.ts.saturating_sub(*ts) > self.max_gap);
                    if gap {
                        runs.push(std::mem::take(&mut current));
                    }
                    current.push((p.ts, v));
                }
                None => {
                    if !current.is_empty() {
                        runs.push(std::mem::take(&mut current));
                    }
                }
            }
        }
        if !current.is_empty() {
            runs.push(current);
        }
        runs
    }
}

/// Round clock times between `from` and `to`, about six of them.
fn time_ticks(from: i64, to: i64) -> Vec<i64> {
    const STEPS: [i64; 14] = [
        60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200, 86_400, 172_800, 604_800,
    ];
    let span = to.saturating_sub(from).max(1);
    let step = STEPS
        .iter()
        .copied()
        .find(|s| span / s <= 6)
        .unwrap_or_else(|| (span / 6 / 86_400 + 1) * 86_400);
    let first = from.div_euclid(step).saturating_add(1).saturating_mul(step);
    let first = if from.rem_euclid(step) == 0 {
        from
    } else {
        first
    };
    std::iter::successors(Some(first), |t| t.checked_add(step))
        .take_while(|t| *t <= to)
        .take(16)
        .collect()
}

/// `HH:MM` of a Unix time in UTC, with `MM-DD ` before it when the chart spans days.
fn time_label(ts: i64, with_date: bool) -> String {
    // `YYYY-MM-DDTHH:MM:SSZ`
    let from = if with_date { 5 } else { 11 };
    crate::timestamp::rfc3339(ts)
        .get(from..16)
        .unwrap_or_default()
        .replace('T', " ")
}

const VALUE_COLOR: RGBColor = RGBColor(33, 33, 33);
const FORECAST_COLOR: RGBColor = RGBColor(30, 100, 200);
const SCORE_COLOR: RGBColor = RGBColor(120, 60, 160);
const ANOMALY_COLOR: RGBColor = RGBColor(220, 30, 30);
const LABELLED_COLOR: RGBColor = RGBColor(0, 150, 80);
const LEFT_AREA: u32 = 64;

/// The anomaly window in red and labelled windows in green, behind everything else.
fn shade(
    chart: &mut Chart<'_, '_>,
    data: &Prepared,
    (low, high): (f64, f64),
) -> Result<(), String> {
    let windows = data
        .labelled
        .iter()
        .map(|w| (*w, LABELLED_COLOR.mix(0.15)))
        .chain(data.window.map(|w| (w, ANOMALY_COLOR.mix(0.10))));
    for ((from, to), colour) in windows {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(from, low), (to, high)],
                colour.filled(),
            )))
            .map_err(draw_error)?;
    }
    Ok(())
}

fn draw_value_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    data: &Prepared,
    title: &str,
    text: bool,
) -> Result<(), String> {
    let (w, _) = area.dim_in_pixel();
    let mut builder = ChartBuilder::on(area);
    builder
        .margin_top(6)
        .margin_left(6)
        .margin_right(14)
        .margin_bottom(0)
        .y_label_area_size(if text { LEFT_AREA } else { 8 });
    if text {
        let max_chars = (w as usize / 8).max(8);
        builder.caption(ellipsize(title, max_chars), (FONT_FAMILY, 16));
    }
    let mut chart = builder
        .build_cartesian_2d(data.time_axis(text), data.value_y.0..data.value_y.1)
        .map_err(draw_error)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_labels(if text { 6 } else { 0 })
        .y_labels(if text { 5 } else { 0 })
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| number_label(*v));
    if text {
        mesh.label_style((FONT_FAMILY, 12));
    }
    mesh.draw().map_err(draw_error)?;

    shade(&mut chart, data, data.value_y)?;
    let band = data.runs(|p| Some((p.lower?, p.upper?)));
    chart
        .draw_series(band.iter().filter(|r| r.len() > 1).map(|run| {
            let upper = run.iter().map(|(ts, (_, hi))| (*ts, *hi));
            let lower = run.iter().rev().map(|(ts, (lo, _))| (*ts, *lo));
            Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                FORECAST_COLOR.mix(0.18).filled(),
            )
        }))
        .map_err(draw_error)?
        .label("expected band")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 4), (x + 16, y + 4)],
                FORECAST_COLOR.mix(0.18).filled(),
            )
        });
    // Single points of a band: a short vertical bar.
    chart
        .draw_series(band.iter().filter(|r| r.len() == 1).map(|run| {
            let (ts, (lo, hi)) = run[0];
            PathElement::new(vec![(ts, lo), (ts, hi)], FORECAST_COLOR.mix(0.4))
        }))
        .map_err(draw_error)?;
    draw_lines(
        &mut chart,
        data.runs(|p| p.yhat),
        FORECAST_COLOR.stroke_width(1),
    )?
    .label("forecast")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], FORECAST_COLOR));
    draw_lines(&mut chart, data.runs(|p| p.y), VALUE_COLOR.stroke_width(2))?
        .label("value")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], VALUE_COLOR.stroke_width(2)));
    chart
        .draw_series(
            data.points
                .iter()
                .filter(|p| p.score.is_some_and(|s| s > 1.0))
                .filter_map(|p| Some(Circle::new((p.ts, p.y?), 3, ANOMALY_COLOR.filled()))),
        )
        .map_err(draw_error)?
        .label("score > 1")
        .legend(|(x, y)| Circle::new((x + 8, y), 3, ANOMALY_COLOR.filled()));
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT_FAMILY, 12))
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

fn draw_score_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    data: &Prepared,
    text: bool,
) -> Result<(), String> {
    let with_date = data.x.1 - data.x.0 > 86_400;
    let mut chart = ChartBuilder::on(area)
        .margin_top(4)
        .margin_left(6)
        .margin_right(14)
        .margin_bottom(4)
        .y_label_area_size(if text { LEFT_AREA } else { 8 })
        .x_label_area_size(if text { 22 } else { 4 })
        .build_cartesian_2d(data.time_axis(text), data.score_y.0..data.score_y.1)
        .map_err(draw_error)?;
    let time_formatter = |ts: &i64| time_label(*ts, with_date);
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_labels(if text { 6 } else { 0 })
        .y_labels(if text { 3 } else { 0 })
        .x_label_formatter(&time_formatter)
        .y_label_formatter(&|v| number_label(*v));
    if text {
        mesh.label_style((FONT_FAMILY, 12))
            .y_desc("score")
            .axis_desc_style((FONT_FAMILY, 12));
    }
    mesh.draw().map_err(draw_error)?;

    shade(&mut chart, data, data.score_y)?;
    chart
        .draw_series(DashedLineSeries::new(
            [(data.x.0, 1.0), (data.x.1, 1.0)],
            6,
            4,
            ANOMALY_COLOR.mix(0.8).stroke_width(1),
        ))
        .map_err(draw_error)?;
    draw_lines(
        &mut chart,
        data.runs(|p| p.score),
        SCORE_COLOR.stroke_width(2),
    )?;
    chart
        .draw_series(
            data.points
                .iter()
                .filter_map(|p| Some((p.ts, p.score.filter(|s| *s > 1.0)?)))
                .map(|(ts, s)| Circle::new((ts, s), 2, ANOMALY_COLOR.filled())),
        )
        .map_err(draw_error)?;
    Ok(())
}

type TimeAxis = WithKeyPoints<plotters::coord::types::RangedCoordi64>;
type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<TimeAxis, plotters::coord::types::RangedCoordf64>,
>;

/// Draws each run as a line (a lone point as a dot); the annotation takes a legend entry.
fn draw_lines<'c, 'a, 'b>(
    chart: &'c mut Chart<'a, 'b>,
    runs: Vec<Vec<(i64, f64)>>,
    style: ShapeStyle,
) -> Result<&'c mut SeriesAnno<'a, BitMapBackend<'b>>, String> {
    let mut elements: Vec<DynElement<'static, BitMapBackend<'b>, (i64, f64)>> = Vec::new();
    for run in runs {
        if run.len() == 1 {
            elements.push(Circle::new(run[0], 1, style.filled()).into_dyn());
        } else {
            elements.push(PathElement::new(run, style).into_dyn());
        }
    }
    chart.draw_series(elements).map_err(draw_error)
}

/// A short axis label: up to 4 significant digits, SI suffixes for large magnitudes.
fn number_label(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e12 {
        (v / 1e12, "T")
    } else if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if scaled == 0.0 {
        "0".to_string()
    } else if scaled.abs() >= 100.0 {
        format!("{scaled:.0}")
    } else if scaled.abs() >= 10.0 {
        format!("{scaled:.1}")
    } else if scaled.abs() >= 0.01 {
        format!("{scaled:.2}")
    } else {
        format!("{scaled:.1e}")
    };
    let text = if text.contains('.') && !text.contains('e') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// Width and height from the IHDR chunk, which must come first.
    fn png_size(png: &[u8]) -> (u32, u32) {
        assert!(png.len() > 33, "too short for a PNG: {} bytes", png.len());
        assert_eq!(png[..8], PNG_SIGNATURE);
        assert_eq!(&png[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&png[16..20]), be(&png[20..24]))
    }

    /// Six hours at one minute: a daily-ish wave with noise, a spike two hours before the end.
    fn realistic() -> ChartData {
        let start = 1_795_000_000 - 1_795_000_000 % 60;
        let mut points = Vec::new();
        let spike = 240..252;
        for i in 0..360i64 {
            let t = i as f64;
            let base = 50.0 + 20.0 * (t / 60.0).sin();
            let noise = ((i * 7919 % 101) as f64 / 101.0 - 0.5) * 4.0;
            let y = if spike.contains(&i) {
                base + 45.0
            } else {
                base + noise
            };
            let yhat = base;
            let half = 6.0;
            let score = (y - yhat).abs() / half;
            points.push(ChartPoint {
                ts: start + i * 60,
                y: Some(y),
                yhat: Some(yhat),
                lower: Some(yhat - half),
                upper: Some(yhat + half),
                score: Some(score),
            });
        }
        ChartData {
            title: r#"cpu · instance="web-1:9100", job="node""#.into(),
            anomaly_from: start + 240 * 60,
            anomaly_to: start + 251 * 60,
            labelled: vec![(start + 230 * 60, start + 260 * 60)],
            points,
        }
    }

    #[test]
    fn a_series_with_a_spike_renders_a_png() {
        let data = realistic();
        for text in [true, false] {
            let png = render_with(&data, 800, 480, text && text_available()).unwrap();
            assert_eq!(png_size(&png), (800, 480));
            assert!(png.len() < 200_000, "PNG of {} bytes", png.len());
        }
        let png = render_png(&data, 800, 480).unwrap();
        assert_eq!(png_size(&png), (800, 480));
        if let Some(path) = std::env::var_os("MAD_CHART_SAMPLE") {
            std::fs::write(&path, &png).unwrap();
            let plain = render_with(&data, 800, 480, false).unwrap();
            let mut path = path;
            path.push(".plain.png");
            std::fs::write(path, plain).unwrap();
        }
    }

    #[test]
    fn nan_inf_gaps_and_disorder_do_not_panic() {
        let mut data = realistic();
        for (i, p) in data.points.iter_mut().enumerate() {
            match i % 17 {
                0 => p.y = Some(f64::NAN),
                3 => p.yhat = Some(f64::INFINITY),
                5 => p.lower = None,
                7 => p.score = Some(f64::NEG_INFINITY),
                _ => {}
            }
        }
        data.points.drain(100..130);
        data.points.reverse();
        data.points.push(data.points[3]);
        data.anomaly_from = data.anomaly_to + 10_000_000;
        assert_eq!(
            png_size(&render_with(&data, 640, 400, false).unwrap()),
            (640, 400)
        );
        assert_eq!(png_size(&render_png(&data, 640, 400).unwrap()), (640, 400));

        // Constant, one point, only scores, huge values, window around everything.
        let flat = |n: i64, v: Option<f64>, s: Option<f64>| ChartData {
            title: String::new(),
            points: (0..n)
                .map(|i| ChartPoint {
                    ts: i * 30,
                    y: v,
                    yhat: v,
                    lower: v,
                    upper: v,
                    score: s,
                })
                .collect(),
            anomaly_from: i64::MIN,
            anomaly_to: i64::MAX,
            labelled: vec![(i64::MIN, i64::MAX)],
        };
        for data in [
            flat(50, Some(3.0), Some(0.0)),
            flat(50, Some(0.0), Some(0.0)),
            flat(1, Some(-2.5), Some(7.0)),
            flat(20, None, Some(2.0)),
            flat(20, Some(1e300), Some(1e300)),
            flat(20, Some(f64::MIN_POSITIVE), None),
        ] {
            render_png(&data, 300, 200).unwrap();
            render_with(&data, 300, 200, false).unwrap();
        }
        let mut extreme = flat(3, Some(1.0), Some(0.5));
        extreme.points[0].y = Some(-f64::MAX);
        extreme.points[1].y = Some(f64::MAX);
        assert!(render_png(&extreme, 300, 200).is_err());
        let mut far = flat(2, Some(1.0), Some(0.5));
        far.points[0].ts = i64::MIN;
        far.points[1].ts = i64::MAX;
        assert!(render_png(&far, 300, 200).is_err());
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        assert!(render_png(&ChartData::default(), 800, 480).is_err());
        let all_nan = ChartData {
            points: (0..10)
                .map(|i| ChartPoint {
                    ts: i,
                    y: Some(f64::NAN),
                    score: Some(f64::INFINITY),
                    ..ChartPoint::default()
                })
                .collect(),
            ..ChartData::default()
        };
        assert!(render_png(&all_nan, 800, 480).is_err());
        assert!(render_png(&realistic(), 0, 480).is_err());
        assert!(render_png(&realistic(), 800, 100_000).is_err());
    }

    #[test]
    fn time_labels_are_utc() {
        assert_eq!(time_label(0, false), "00:00");
        assert_eq!(time_label(1_795_003_500, false), "12:05");
        assert_eq!(time_label(1_795_003_500, true), "11-18 12:05");
        assert_eq!(
            time_ticks(1_000, 4_600),
            vec![1_200, 1_800, 2_400, 3_000, 3_600, 4_200]
        );
        assert_eq!(
            time_ticks(0, 86_400 * 3),
            (0..7).map(|i| i * 43_200).collect::<Vec<_>>()
        );
        assert!(time_ticks(i64::MIN, i64::MAX).len() <= 16);
        assert_eq!(time_label(951_825_600, true), "02-29 12:00");
        assert_eq!(time_label(i64::MAX, true), "12-31 23:59");
        assert_eq!(time_label(-1, true), "01-01 00:00");
        assert_eq!(number_label(0.0), "0");
        assert_eq!(number_label(1.5), "1.5");
        assert_eq!(number_label(12_345.0), "12.3k");
        assert_eq!(number_label(-2_500_000.0), "-2.5M");
    }
}
