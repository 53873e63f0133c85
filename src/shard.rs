//! Horizontal sharding: which of N exporter replicas scores a series, and which trainer trains a
//! detector.
//!
//! A series goes to `jump(hash(series), N)` (Lamping and Veach's jump consistent hash, ten lines
//! that need no table): every replica computes the same owner from the labels alone, and when N
//! grows to N + 1 a series either stays or moves to the new replica — only the share that must
//! move does. The hash is FNV-1a over the canonical series key, fixed here so owners never change
//! between builds or machines.

use mad_training::contract::series_key;
use serde::Deserialize;

use crate::source::Labels;

/// Environment variables a replica learns its place from (Kubernetes: a StatefulSet's pod name
/// ends in its ordinal; an Indexed Job sets `JOB_COMPLETION_INDEX`).
pub const SHARDS_ENV: &str = "MAD_SHARDS";
pub const SHARD_ENV: &str = "MAD_SHARD";
pub const JOB_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";
pub const POD_NAME_ENV: &str = "MAD_POD_NAME";

/// This replica's place: `index` of `shards` (config `sharding:` or the environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: u32,
    pub shards: u32,
}

impl Shard {
    /// Checks `index < shards`.
    pub fn new(index: u32, shards: u32) -> Result<Shard, String> {
        if shards == 0 || index >= shards {
            return Err(format!(
                "shard {index} of {shards}: the index must be below the number of shards (≥ 1)"
            ));
        }
        Ok(Shard { index, shards })
    }

    /// From `MAD_SHARDS` and `MAD_SHARD`, else `JOB_COMPLETION_INDEX`, else the ordinal at the
    /// end of `MAD_POD_NAME` (`mad-exporter-2` → 2); `None` without `MAD_SHARDS`.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>, String> {
        let Some(shards) = var(SHARDS_ENV) else {
            return Ok(None);
        };
        let shards: u32 = shards
            .trim()
            .parse()
            .map_err(|_| format!("{SHARDS_ENV}={shards:?}: expected a whole number"))?;
        let index = if let Some(i) = var(SHARD_ENV).or_else(|| var(JOB_INDEX_ENV)) {
            i.trim()
                .parse()
                .map_err(|_| format!("shard index {i:?}: expected a whole number"))?
        } else if let Some(pod) = var(POD_NAME_ENV) {
            pod.rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("{POD_NAME_ENV}={pod:?} does not end in -<ordinal>"))?
        } else {
            return Err(format!(
                "{SHARDS_ENV} is set but not this replica's index: set {SHARD_ENV}, \
                 {JOB_INDEX_ENV} or {POD_NAME_ENV}"
            ));
        };
        Shard::new(index, shards).map(Some)
    }

    /// Whether this replica scores the series (or group) with these labels.
    pub fn owns_series(&self, labels: &Labels) -> bool {
        self.owns(&series_key(labels))
    }

    /// Whether this replica owns `key`.
    pub fn owns(&self, key: &str) -> bool {
        jump(fnv1a(key.as_bytes()), self.shards) == self.index
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Jump consistent hash (Lamping and Veach, 2014): a bucket in `0..buckets`.
fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn every_key_has_one_owner_and_growing_moves_keys_only_to_the_new_shard() {
        let keys: Vec<String> = (0..3_000)
            .map(|i| format!("{{instance=\"n{i}\"}}"))
            .collect();
        let owner = |key: &str, n: u32| {
            (0..n)
                .filter(|i| {
                    Shard {
                        index: *i,
                        shards: n,
                    }
                    .owns(key)
                })
                .collect::<Vec<_>>()
        };
        let mut moved = 0;
        for key in &keys {
            let (before, after) = (owner(key, 3), owner(key, 4));
            assert_eq!((before.len(), after.len()), (1, 1), "{key}");
            if before != after {
                moved += 1;
                assert_eq!(after, vec![3], "{key} moved between old shards");
            }
        }
        // A quarter of the keys belong to the fourth shard; the rest stay put.
        assert!((600..900).contains(&moved), "{moved} of 3000 moved");
    }

    #[test]
    fn the_place_comes_from_the_environment() {
        assert_eq!(Shard::from_env(env(&[])), Ok(None));
        let from = |pairs: &[(&str, &str)]| Shard::from_env(env(pairs));
        assert_eq!(
            from(&[("MAD_SHARDS", "3"), ("MAD_POD_NAME", "mad-exporter-2")]),
            Ok(Some(Shard {
                index: 2,
                shards: 3
            }))
        );
        assert_eq!(
            from(&[
                ("MAD_SHARDS", "3"),
                ("JOB_COMPLETION_INDEX", "1"),
                ("MAD_POD_NAME", "x-2")
            ]),
            Ok(Some(Shard {
                index: 1,
                shards: 3
            }))
        );
        assert!(from(&[("MAD_SHARDS", "3"), ("MAD_SHARD", "3")])
            .is_err_and(|e| e.contains("below the number")));
        assert!(from(&[("MAD_SHARDS", "3")]).is_err_and(|e| e.contains("MAD_POD_NAME")));
        assert!(from(&[("MAD_SHARDS", "three")]).is_err());
    }
}
