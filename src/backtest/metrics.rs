//! Detection metrics over labelled rows: point-wise F1 (at a threshold, and the best over all
//! thresholds, without point-adjust) and per anomaly event.

/// Point-wise F1 of `detected` against `labels`, with precision and recall.
pub fn f1(detected: impl Iterator<Item = bool>, labels: &[bool]) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (d, l) in detected.zip(labels) {
        match (d, *l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            _ => {}
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
    let f1 = if tp > 0.0 {
        2.0 * tp / (2.0 * tp + fp + fn_)
    } else {
        0.0
    };
    (f1, precision, recall)
}

/// The best point-wise F1 over every threshold (each distinct score), and that threshold.
pub fn best_f1(scores: &[f64], labels: &[bool]) -> (f64, f64) {
    let positives = labels.iter().filter(|l| **l).count() as f64;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut best = (0.0, f64::INFINITY);
    for (rank, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        // Only at the end of a run of equal scores is this a threshold one could set.
        let last_of_tie = order
            .get(rank + 1)
            .is_none_or(|next| scores[*next] != scores[i]);
        if last_of_tie && tp > 0.0 {
            let f = 2.0 * tp / (tp + fp + positives);
            if f > best.0 {
                best = (f, scores[i]);
            }
        }
    }
    best
}

/// The runs of `true` in `flags`, as `[start, end)` row ranges.
pub fn runs(flags: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] {
            let start = i;
            while i < flags.len() && flags[i] {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Per anomaly event at a threshold: a labelled event is found when one of its rows is above the
/// threshold; a detection (a run of rows above it) is right when it overlaps an event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventScores {
    pub events: usize,
    pub found: usize,
    pub detections: usize,
    pub right: usize,
}

impl EventScores {
    pub fn of(scores: &[f64], labels: &[bool], threshold: f64) -> EventScores {
        let events = runs(labels);
        let above: Vec<bool> = scores.iter().map(|s| *s > threshold).collect();
        let detections = runs(&above);
        let overlaps = |(a, b): (usize, usize), others: &[(usize, usize)]| {
            others.iter().any(|(c, d)| a < *d && *c < b)
        };
        EventScores {
            events: events.len(),
            found: events.iter().filter(|e| overlaps(**e, &detections)).count(),
            detections: detections.len(),
            right: detections.iter().filter(|d| overlaps(**d, &events)).count(),
        }
    }

    pub fn precision(&self) -> f64 {
        ratio(self.right, self.detections)
    }

    pub fn recall(&self) -> f64 {
        ratio(self.found, self.events)
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        }
    }
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_f1_picks_the_separating_threshold_and_respects_ties() {
        let scores = [0.9, 0.8, 0.8, 0.1];
        let labels = [true, true, false, false];
        let (f, t) = best_f1(&scores, &labels);
        // At 0.9: tp 1, fp 0, fn 1 -> 2/3. At 0.8 (both tied rows): tp 2, fp 1 -> 0.8.
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(t, 0.8);
        assert_eq!(best_f1(&[0.5], &[false]), (0.0, f64::INFINITY));
    }

    #[test]
    fn f1_at_a_threshold() {
        let (f, p, r) = f1([true, false, true].into_iter(), &[true, true, false]);
        assert_eq!((p, r), (0.5, 0.5));
        assert!((f - 0.5).abs() < 1e-12);
    }

    #[test]
    fn events_are_found_by_any_row_and_detections_judged_by_overlap() {
        let labels = [false, true, true, false, false, true, false, false];
        let scores = [0.0, 0.5, 2.0, 0.1, 3.0, 0.2, 0.0, 1.5];
        let e = EventScores::of(&scores, &labels, 1.0);
        assert_eq!((e.events, e.found, e.detections, e.right), (2, 1, 3, 1));
        assert_eq!((e.recall(), e.precision()), (0.5, 1.0 / 3.0));
        assert!((e.f1() - 0.4).abs() < 1e-12);
        assert_eq!(runs(&[true, true, false, true]), vec![(0, 2), (3, 4)]);
    }
}
