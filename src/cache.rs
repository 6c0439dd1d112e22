//! Cache generations: each release gets its own Redis databases for Magento's cache
//! frontends, so old and new code never share cache entries while both serve.
//!
//! The config names two (or more) generation slots, each mapping the `default` and
//! `page_cache` frontends to Redis databases; sessions keep one database that never
//! alternates. The chosen slot reaches templates as `deploy.cache` and is shown in status.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct CacheConfig {
    /// Redis used to agree on generations across the fleet, e.g. redis://10.0.0.5:6379.
    /// Unset: no agreement is possible, every release uses slot 0.
    pub redis: Option<String>,
    /// Sessions' database: never alternates, never flushed.
    pub session_db: u32,
    pub slots: Vec<Slot>,
    /// Prefix of cache ids; the slot number is appended. Default: the application name.
    pub id_prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub struct Slot {
    pub default_db: u32,
    pub page_cache_db: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis: None,
            session_db: 2,
            slots: vec![
                Slot {
                    default_db: 0,
                    page_cache_db: 1,
                },
                Slot {
                    default_db: 3,
                    page_cache_db: 4,
                },
            ],
            id_prefix: None,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.slots.is_empty() {
            out.push((
                "cache.slots".into(),
                "name at least one slot (two to alternate)".into(),
            ));
        }
        let mut seen = std::collections::BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.default_db == s.page_cache_db {
                out.push((
                    format!("cache.slots.{i}"),
                    "default_db and page_cache_db must differ".into(),
                ));
            }
            for db in [s.default_db, s.page_cache_db] {
                if db == self.session_db {
                    out.push((
                        format!("cache.slots.{i}"),
                        format!("database {db} is the session database; sessions never alternate"),
                    ));
                }
                if let Some(j) = seen.insert(db, i).filter(|j| *j != i) {
                    out.push((
                        format!("cache.slots.{i}"),
                        format!("database {db} is also used by slot {j}"),
                    ));
                }
            }
        }
        out
    }

    /// The template facts for `slot`.
    pub fn facts(&self, slot: usize, app: &str) -> serde_json::Value {
        let s = self.slots.get(slot).copied().unwrap_or(Slot {
            default_db: 0,
            page_cache_db: 1,
        });
        let prefix = self
            .id_prefix
            .clone()
            .unwrap_or_else(|| format!("{}_", sanitize(app)));
        serde_json::json!({
            "slot": slot,
            "default_db": s.default_db,
            "page_cache_db": s.page_cache_db,
            "session_db": self.session_db,
            "id_prefix": format!("{prefix}{slot}_"),
        })
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect()
}

/// The slot after the live one (slot 0 when none is live). Pure.
pub fn next_slot(live: Option<usize>, n_slots: usize) -> usize {
    match live {
        Some(l) if n_slots > 0 => (l + 1) % n_slots,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_alternate() {
        assert_eq!(next_slot(None, 2), 0);
        assert_eq!(next_slot(Some(0), 2), 1);
        assert_eq!(next_slot(Some(1), 2), 0);
        assert_eq!(next_slot(Some(1), 3), 2);
    }

    #[test]
    fn overlapping_databases_are_refused() {
        let mut c = CacheConfig::default();
        c.slots[1].default_db = 1;
        c.session_db = 0;
        let v = c.validate();
        assert!(
            v.iter().any(|(_, m)| m.contains("session database")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|(_, m)| m.contains("also used by slot 0")),
            "{v:?}"
        );
        assert!(CacheConfig::default().validate().is_empty());
    }

    #[test]
    fn facts_carry_a_prefix_per_generation() {
        let f = CacheConfig::default().facts(1, "magento prod");
        assert_eq!(f["default_db"], 3);
        assert_eq!(f["id_prefix"], "magento_prod_1_");
    }
}
