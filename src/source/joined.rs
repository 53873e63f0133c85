//! What a detector reads: one query's series as they come, or, for a multivariate detector,
//! each input query's series cut down to the join labels and tagged with `input="<name>"`, so
//! the series of one group (one value set of the join labels) line up across inputs.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use super::{Client, Labels, Series, SourceError};
use crate::config::{Queries, INPUT_LABEL};

impl Client {
    /// Runs every query of a detector over `[start, end]`.
    pub async fn query_detector(
        &self,
        queries: Queries<'_>,
        start: i64,
        end: i64,
        step: i64,
    ) -> Result<Vec<Series>, SourceError> {
        match queries {
            Queries::Single(query) => self.query_range(query, start, end, step).await,
            Queries::Joined { inputs, join_on } => {
                let join_on: Vec<&str> = join_on.iter().map(|l| l.0.as_str()).collect();
                let mut joined: BTreeMap<Labels, Series> = BTreeMap::new();
                for (input, query) in inputs {
                    let fetched = self.query_range(&query.0, start, end, step).await?;
                    join(&input.0, &join_on, fetched, &mut joined)?;
                }
                Ok(joined.into_values().collect())
            }
        }
    }
}

/// Adds one input's series to `joined`, keyed by their join labels plus the input's name. Two
/// series of one input in one group would be scored as one: that is the query's mistake (it
/// keeps a label the join drops) and is refused with the labels that collide.
fn join(
    input: &str,
    join_on: &[&str],
    fetched: Vec<Series>,
    joined: &mut BTreeMap<Labels, Series>,
) -> Result<(), SourceError> {
    for series in fetched {
        let mut labels: Labels = join_on
            .iter()
            .map(|name| {
                let value = series.labels.get(*name).cloned().unwrap_or_default();
                (name.to_string(), value)
            })
            .collect();
        labels.insert(INPUT_LABEL.to_string(), input.to_string());
        match joined.entry(labels) {
            Entry::Occupied(taken) => {
                return Err(SourceError::Join {
                    input: input.to_string(),
                    message: format!(
                        "two series in the group {:?}: aggregate the query by ({})",
                        taken.key(),
                        join_on.join(", ")
                    ),
                })
            }
            Entry::Vacant(slot) => {
                let labels = slot.key().clone();
                slot.insert(Series {
                    labels,
                    points: series.points,
                });
            }
        }
    }
    Ok(())
}

/// A multivariate series' group (its labels without `input`) and its input's name.
pub fn group_of(labels: &Labels) -> (Labels, Option<&str>) {
    let mut group = labels.clone();
    group.remove(INPUT_LABEL);
    (group, labels.get(INPUT_LABEL).map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(pairs: &[(&str, &str)], value: f64) -> Series {
        Series {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            points: vec![(60, value)],
        }
    }

    #[test]
    fn inputs_line_up_by_join_labels() {
        let mut joined = BTreeMap::new();
        let cpu = vec![
            series(&[("instance", "a"), ("job", "node")], 0.5),
            series(&[("instance", "b"), ("job", "node")], 0.7),
        ];
        let memory = vec![series(&[("instance", "a")], 1e9)];
        join("cpu", &["instance"], cpu, &mut joined).expect("cpu");
        join("memory", &["instance"], memory, &mut joined).expect("memory");
        let keys: Vec<Vec<(String, String)>> = joined
            .keys()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .collect();
        let pair = |i: &str, input: &str| {
            vec![
                ("input".to_string(), input.to_string()),
                ("instance".to_string(), i.to_string()),
            ]
        };
        assert_eq!(
            keys,
            vec![pair("a", "cpu"), pair("b", "cpu"), pair("a", "memory")]
        );
        let (group, input) = group_of(joined.keys().next().expect("one"));
        assert_eq!(input, Some("cpu"));
        assert_eq!(group.get("instance").map(String::as_str), Some("a"));
        assert_eq!(group.len(), 1);
    }

    #[test]
    fn two_series_of_one_input_in_one_group_is_an_error_naming_the_fix() {
        let mut joined = BTreeMap::new();
        let cpu = vec![
            series(&[("instance", "a"), ("mode", "user")], 0.5),
            series(&[("instance", "a"), ("mode", "system")], 0.1),
        ];
        let err = join("cpu", &["instance"], cpu, &mut joined)
            .expect_err("collision")
            .to_string();
        assert!(
            err.contains("cpu") && err.contains("by (instance)"),
            "{err}"
        );
    }
}
