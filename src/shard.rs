//! Horizontal sharding: which of N exporter replicas scores a series, and which trainer trains a
//! detector.
//!
//! Two ways to know one's place. **Fixed**: `MAD_SHARDS=N` and an index; changing N means
//! restarting the replicas, and while they roll, old and new ones disagree. **Members**
//! (`MAD_SHARDS=members`, with PostgreSQL): every exporter heartbeats into a table and reads who
//! is alive; a series belongs to the live member with the highest hash of (member, series)
//! (rendezvous hashing), so all replicas agree within one heartbeat of a change, a newcomer takes
//! only the series it wins, and a leaver's series spread over the rest.
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

/// How a replica finds its share (config `sharding:` or `MAD_SHARDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    Fixed(Shard),
    /// The live members registered in PostgreSQL decide (`sharding: members`).
    Members,
}

/// The word that selects [`Sharding::Members`].
pub const MEMBERS: &str = "members";

impl<'de> Deserialize<'de> for Sharding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Word(String),
            Fixed(Shard),
        }
        match Repr::deserialize(d)? {
            Repr::Fixed(shard) => Ok(Sharding::Fixed(shard)),
            Repr::Word(w) if w == MEMBERS => Ok(Sharding::Members),
            Repr::Word(w) => Err(serde::de::Error::custom(format!(
                "expected {{index, shards}} or \"{MEMBERS}\", got {w:?}"
            ))),
        }
    }
}

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
    /// end of `MAD_POD_NAME` (`mad-exporter-2` → 2); `MAD_SHARDS=members` for
    /// [`Sharding::Members`]; `None` without `MAD_SHARDS`.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Sharding>, String> {
        let Some(shards) = var(SHARDS_ENV) else {
            return Ok(None);
        };
        if shards.trim() == MEMBERS {
            return Ok(Some(Sharding::Members));
        }
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
        Shard::new(index, shards).map(|s| Some(Sharding::Fixed(s)))
    }

    /// Whether this replica owns `key`.
    pub fn owns(&self, key: &str) -> bool {
        jump(fnv1a(key.bytes()), self.shards) == self.index
    }
}

/// This replica's view of the live members (for [`Sharding::Members`]), refreshed by the
/// exporter's heartbeat.
#[derive(Debug)]
pub struct Membership {
    me: String,
    live: std::sync::RwLock<Vec<String>>,
}

impl Membership {
    pub fn new(me: impl Into<String>) -> Membership {
        let me = me.into();
        Membership {
            live: std::sync::RwLock::new(vec![me.clone()]),
            me,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Replaces the live members (this replica always counts itself in).
    pub fn set_live(&self, mut members: Vec<String>) {
        if !members.contains(&self.me) {
            members.push(self.me.clone());
        }
        members.sort();
        members.dedup();
        if let Ok(mut live) = self.live.write() {
            *live = members;
        }
    }

    /// Whether this replica owns `key`: it has the highest rendezvous hash among the live.
    pub fn owns(&self, key: &str) -> bool {
        let Ok(live) = self.live.read() else {
            return true;
        };
        rendezvous(&live, key) == Some(self.me.as_str())
    }
}

/// Which series an exporter scores, as its [`Sharding`] says.
#[derive(Debug, Clone)]
pub enum Owner {
    Fixed(Shard),
    Members(std::sync::Arc<Membership>),
}

impl Owner {
    /// Whether this replica scores the series (or group) with these labels.
    pub fn owns_series(&self, labels: &Labels) -> bool {
        let key = series_key(labels);
        match self {
            Owner::Fixed(shard) => shard.owns(&key),
            Owner::Members(members) => members.owns(&key),
        }
    }
}

/// The member with the highest hash of (member, key).
fn rendezvous<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let bytes = m.bytes().chain([0xff]).chain(key.bytes());
            mix(fnv1a(bytes))
        })
        .map(String::as_str)
}

/// SplitMix64's finaliser: FNV-1a alone spreads keys that differ in their last bytes poorly.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
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
        let fixed = |index, shards| Ok(Some(Sharding::Fixed(Shard { index, shards })));
        assert_eq!(
            from(&[("MAD_SHARDS", "3"), ("MAD_POD_NAME", "mad-exporter-2")]),
            fixed(2, 3)
        );
        assert_eq!(
            from(&[
                ("MAD_SHARDS", "3"),
                ("JOB_COMPLETION_INDEX", "1"),
                ("MAD_POD_NAME", "x-2")
            ]),
            fixed(1, 3)
        );
        assert_eq!(
            from(&[("MAD_SHARDS", "members")]),
            Ok(Some(Sharding::Members))
        );
        assert!(from(&[("MAD_SHARDS", "3"), ("MAD_SHARD", "3")])
            .is_err_and(|e| e.contains("below the number")));
        assert!(from(&[("MAD_SHARDS", "3")]).is_err_and(|e| e.contains("MAD_POD_NAME")));
        assert!(from(&[("MAD_SHARDS", "three")]).is_err());
    }

    #[test]
    fn members_agree_and_a_newcomer_takes_only_what_it_wins() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let views: Vec<Membership> = names.iter().map(|n| Membership::new(n.clone())).collect();
        let keys: Vec<String> = (0..3_000)
            .map(|i| format!("{{instance=\"n{i}\"}}"))
            .collect();
        for v in &views[..2] {
            v.set_live(names[..2].to_vec());
        }
        let owners = |views: &[Membership]| -> Vec<Vec<usize>> {
            keys.iter()
                .map(|k| (0..views.len()).filter(|i| views[*i].owns(k)).collect())
                .collect()
        };
        let before = owners(&views[..2]);
        assert!(before.iter().all(|o| o.len() == 1));
        for v in &views {
            v.set_live(names.clone());
        }
        let after = owners(&views);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.len(), 1);
            if a != b {
                moved += 1;
                assert_eq!(a, &vec![2], "moved between the old members");
            }
        }
        assert!((800..1_200).contains(&moved), "{moved} of 3000 moved");
        // A member that leaves hands its series to the others; theirs stay.
        for v in &views[..2] {
            v.set_live(names[..2].to_vec());
        }
        assert_eq!(owners(&views[..2]), before);
    }
}
