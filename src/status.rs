//! `bgagent status`: what is deployed, how each event went, whether the node is ready.
//!
//! The JSON document ([`build`]) follows a stable schema, `bgagent.status/v1`, documented in
//! docs/status.md: fields are only ever added within v1. The human view is rendered from the
//! same document, so the two never disagree. No parameter value is ever part of it.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::release::Layout;
use crate::state::StateDoc;

pub const SCHEMA: &str = "bgagent.status/v1";

/// Builds the status document. `readiness` is the daemon's live readiness state, or None
/// when it is not known (daemon not running).
pub fn build(
    doc: &StateDoc,
    layout: &Layout,
    state_dir: &std::path::Path,
    readiness: Option<Value>,
    daemon_running: bool,
    procs: &crate::procs::ProcessesConfig,
) -> Value {
    let current = layout.current();
    // Read live: a consumer started by hand after the last sweep shows up too.
    let old_processes = current
        .as_deref()
        .map(|c| crate::procs::scan(layout.root(), c, procs))
        .unwrap_or_default();
    let on_disk = layout.list().unwrap_or_default();
    let previous = doc.rollback_target(current.as_deref(), &on_disk);
    let release = |id: &Option<String>| -> Value {
        match id {
            None => Value::Null,
            Some(id) => {
                let rec = doc.releases.get(id);
                json!({
                    "id": id,
                    "path": layout.release_dir(id),
                    "created_at": rec.map(|r| r.created_at.clone()),
                    "deployment_id": rec.map(|r| r.deployment_id.clone()),
                    "source": rec.map(|r| r.source.clone()),
                    "params": rec.map(|r| r.params.clone()).unwrap_or(Value::Null),
                    "cache": rec.map(|r| r.cache.clone()).unwrap_or(Value::Null),
                })
            }
        }
    };
    let releases: Vec<Value> = on_disk
        .into_iter()
        .map(|id| {
            json!({
                "id": id,
                "current": current.as_deref() == Some(id.as_str()),
                "previous": previous.as_deref() == Some(id.as_str()),
                "created_at": doc.releases.get(&id).map(|r| r.created_at.clone()),
                "deployment_id": doc.releases.get(&id).map(|r| r.deployment_id.clone()),
                "validation": doc.releases.get(&id).and_then(|r| r.validation),
            })
        })
        .collect();
    json!({
        "schema": SCHEMA,
        "app_root": layout.root(),
        "daemon": if daemon_running { "running" } else { "not_running" },
        "node": {
            "traffic": doc.node.traffic,
            "traffic_since": doc.node.since,
            "readiness": readiness,
            "drained": doc.node.drained,
        },
        "current_release": release(&current),
        "previous_release": release(&previous),
        "rollback_target": previous,
        "last_deployment": doc.deployment,
        "last_switch": doc.switches.last(),
        "releases": releases,
        "cleanup_pending": crate::cleanup::pending(layout),
        "opcache": doc.opcache,
        "old_processes": old_processes,
        "last_process_sweep": doc.old_processes,
        "cron": doc.cron,
        "maintenance": crate::maintenance::node_status(state_dir, layout),
        "warnings": doc.disagreements(current.as_deref()),
    })
}

/// The human view of a status document.
pub fn render_text(s: &Value) -> String {
    let mut o = String::new();
    let str_of = |v: &Value| v.as_str().map(String::from).unwrap_or_else(|| "-".into());
    let _ = writeln!(o, "app root:   {}", str_of(&s["app_root"]));
    let readiness = match &s["node"]["readiness"] {
        Value::Null => "unknown (daemon not running)".to_string(),
        Value::String(r) => r.clone(),
        v => v["state"].as_str().unwrap_or("unknown").to_string(),
    };
    let _ = writeln!(o, "daemon:     {}", str_of(&s["daemon"]).replace('_', " "));
    let _ = writeln!(o, "readiness:  {readiness}");
    let _ = writeln!(o, "traffic:    {}", str_of(&s["node"]["traffic"]));
    for w in s["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "warning:    {}", str_of(w));
    }
    for (label, key) in [
        ("current:   ", "current_release"),
        ("rollback:  ", "previous_release"),
    ] {
        let r = &s[key];
        if r.is_null() {
            let _ = writeln!(o, "{label} none");
        } else {
            let _ = writeln!(
                o,
                "{label} {} (deployment {}, built {})",
                str_of(&r["id"]),
                str_of(&r["deployment_id"]),
                str_of(&r["created_at"])
            );
            if let Some(slot) = r["cache"]["slot"].as_u64() {
                // `agreed: false`: no cache.redis, so every release shares slot 0
                let note = if r["cache"]["agreed"] == Value::Bool(false) {
                    " (not alternating: cache.redis is not set)"
                } else {
                    ""
                };
                let _ = writeln!(o, "            cache generation slot {slot}{note}");
            }
        }
    }
    render_opcache(&mut o, &s["opcache"]);
    render_old_processes(&mut o, s);
    render_cron(&mut o, &s["cron"]);
    render_maintenance(&mut o, &s["maintenance"]);
    if let Some(p) = s["cleanup_pending"].as_array().filter(|p| !p.is_empty()) {
        let _ = writeln!(
            o,
            "cleanup:    {} old release(s) or abandoned build(s) being removed in the background",
            p.len()
        );
    }
    let d = &s["last_deployment"];
    if d.is_null() {
        let _ = writeln!(o, "\nno deployment yet");
    } else {
        let _ = writeln!(
            o,
            "\nlast deployment {}: {} (started {})",
            str_of(&d["id"]),
            str_of(&d["status"]).replace('_', " "),
            str_of(&d["started_at"])
        );
        if let Some(events) = d["events"].as_array() {
            for e in events {
                let dur = e["duration_ms"]
                    .as_u64()
                    .map(|ms| format!("{:.2}s", ms as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    o,
                    "  {:<19} {:<11} {:>8}  {}{}",
                    str_of(&e["event"]),
                    str_of(&e["status"]),
                    dur,
                    str_of(&e["started_at"]),
                    e["message"]
                        .as_str()
                        .map(|m| format!("\n  {:<19} {m}", ""))
                        .unwrap_or_default()
                );
            }
        }
        render_schema(&mut o, &d["schema"]);
    }
    o
}

/// The schema gate's account of the last deployment (Magento).
fn render_schema(o: &mut String, r: &Value) {
    if r.is_null() {
        return;
    }
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    if !r["blue_green"].is_null() {
        let _ = writeln!(
            o,
            "  schema: env.php deployment/blue_green/enabled: {}",
            s(&r["blue_green"]).replace('_', " ")
        );
    }
    if !r["class"].is_null() {
        let against = match r["compared_with"].as_str() {
            Some(live) => format!("against release {live}"),
            None => "nothing to compare with".into(),
        };
        let declared = match r["declared"].as_str() {
            Some(d) if r["declared"] != r["analysed"] => {
                format!(
                    " (declared {d}; bgagent's analysis says {})",
                    s(&r["analysed"])
                )
            }
            Some(_) => " (declared, and the analysis agrees)".into(),
            None => String::new(),
        };
        let _ = writeln!(
            o,
            "  schema: change {}{declared}, {against}",
            s(&r["class"])
        );
        for f in r["findings"].as_array().into_iter().flatten() {
            let _ = writeln!(
                o,
                "    {}: {}: {} ({})",
                s(&f["class"]),
                s(&f["element"]),
                s(&f["what"]),
                s(&f["file"])
            );
        }
    }
    for step in r["outcome"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "  schema: {}", s(step));
    }
}

/// The php-fpm pools' opcache: memory, keys, hit rate, cached scripts per release, the last
/// switch's choice and a pending reclaim.
fn render_opcache(o: &mut String, pools: &Value) {
    let Some(pools) = pools.as_object() else {
        return;
    };
    let mib = |v: &Value| format!("{:.1} MiB", v.as_f64().unwrap_or(0.0) / 1048576.0);
    for (name, p) in pools {
        let _ = writeln!(
            o,
            "opcache {name} ({})",
            p["fastcgi"].as_str().unwrap_or("-")
        );
        let s = &p["snapshot"];
        if !s.is_null() {
            let _ = writeln!(
                o,
                "            memory {} used, {} free, {} wasted ({}%); keys {} of {}; hit rate {}% (at {})",
                mib(&s["used_memory"]),
                mib(&s["free_memory"]),
                mib(&s["wasted_memory"]),
                s["wasted_percent"],
                s["cached_keys"],
                s["max_cached_keys"],
                s["hit_rate"],
                s["at"].as_str().unwrap_or("-")
            );
            if let Some(rs) = s["releases"].as_object() {
                for (id, r) in rs {
                    let label = if id.is_empty() {
                        "(outside releases)"
                    } else {
                        id
                    };
                    let _ = writeln!(
                        o,
                        "            {label}: {} scripts, {}",
                        r["scripts"],
                        mib(&r["memory"])
                    );
                }
            }
        }
        let l = &p["last_switch"];
        if !l.is_null() {
            let plan = l["plan"].as_str().unwrap_or("-").replace('_', " ");
            let _ = writeln!(
                o,
                "            last switch to {}: {plan}: {}",
                l["release"].as_str().unwrap_or("-"),
                l["reason"].as_str().unwrap_or("-")
            );
            let c = &l["precompile"];
            if !c.is_null() {
                let _ = writeln!(
                    o,
                    "            precompile: {} compiled, {} already, {} failed, {} skipped in {} ms",
                    c["compiled"], c["already"], c["failed"], c["skipped"], c["ms"]
                );
            }
        }
        if let Some(r) = p["reclaim_due"].as_str() {
            let _ = writeln!(o, "            reclaim due at the next deploy: {r}");
        }
    }
}

/// Processes running an old release's code now, and what the last sweep did.
fn render_old_processes(o: &mut String, s: &Value) {
    let str_of = |v: &Value| v.as_str().unwrap_or("-").to_string();
    for p in s["old_processes"].as_array().into_iter().flatten() {
        let left = match p["left"].as_str() {
            Some("interactive") => " (has a terminal: left alone)",
            Some("ignored") => " (in processes.ignore: left alone)",
            _ => "",
        };
        let _ = writeln!(
            o,
            "old code:   pid {} {} (uid {}) runs release {} ({} {}){left}",
            p["pid"],
            str_of(&p["name"]),
            p["uid"],
            str_of(&p["release"]),
            str_of(&p["by"]),
            str_of(&p["path"]),
        );
    }
    let sw = &s["last_process_sweep"];
    if let Some(ps) = sw["processes"].as_array().filter(|p| !p.is_empty()) {
        let mut by_fate = std::collections::BTreeMap::<String, usize>::new();
        for p in ps {
            *by_fate.entry(str_of(&p["fate"])).or_default() += 1;
        }
        let counts = by_fate
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "last sweep: {} after the switch to {}: {counts}",
            str_of(&sw["at"]),
            str_of(&sw["current"])
        );
    }
}

/// Magento's maintenance on this node: a line only when the flag is on or bgagent put it on.
fn render_maintenance(o: &mut String, m: &Value) {
    let flag = m["flag"] == Value::Bool(true);
    let w = &m["window"];
    let by = w["deployment"].as_str();
    let line = match (flag, by) {
        (false, None) => return,
        (true, Some(d)) => format!(
            "ON: Magento's {} is in the current release (the storefront answers 503), put there by deployment {d}'s maintenance window (release {}); `bgagent maintenance status` shows the window, `bgagent maintenance close` ends it for the fleet",
            crate::maintenance::FLAG,
            w["release"].as_str().unwrap_or("-")
        ),
        (true, None) => format!(
            "ON: Magento's {} is in the current release (the storefront answers 503), not put there by bgagent: `bin/magento maintenance:disable` ends it",
            crate::maintenance::FLAG
        ),
        (false, Some(d)) => format!(
            "off in the current release; deployment {d}'s maintenance window had put release {} into maintenance, and the daemon takes that off when the window closes",
            w["release"].as_str().unwrap_or("-")
        ),
    };
    let _ = writeln!(o, "maintenance: {line}");
}

/// The last deployment's cron pause.
fn render_cron(o: &mut String, c: &Value) {
    if c.is_null() {
        return;
    }
    let str_of = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let scope = if c["scope"] == "redis" {
        "fleet-wide"
    } else {
        "this node"
    };
    let state = match c["resumed_at"].as_str() {
        Some(at) => format!("resumed at {at}"),
        None => "still paused (lapses after cron.pause_ttl)".into(),
    };
    let _ = writeln!(
        o,
        "cron:       paused {scope} by deployment {} at {}, waited {:.1}s for {} job(s); {state}",
        str_of(&c["deployment"]),
        str_of(&c["paused_at"]),
        c["waited_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        c["waited_for"].as_array().map_or(0, |a| a.len()),
    );
    for j in c["still_running"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "            still running when the budget ran out: {}",
            str_of(j)
        );
    }
}

/// `bgagent releases`: one line per release, current marked.
pub fn render_releases(s: &Value) -> String {
    let mut o = String::new();
    if let Some(rs) = s["releases"].as_array() {
        if rs.is_empty() {
            o.push_str("no releases\n");
        }
        for r in rs {
            let mark = if r["current"].as_bool() == Some(true) {
                "* "
            } else if r["previous"].as_bool() == Some(true) {
                "- "
            } else {
                "  "
            };
            let _ = writeln!(
                o,
                "{mark}{}  {}",
                r["id"].as_str().unwrap_or("?"),
                r["deployment_id"].as_str().unwrap_or("")
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cache(cache: Value) -> Value {
        json!({
            "app_root": "/srv/app",
            "node": { "traffic": "live", "readiness": null },
            "current_release": {
                "id": "20261122T120000Z-d-A", "deployment_id": "d-A",
                "created_at": "2026-11-22T12:00:00.000Z", "cache": cache
            },
            "previous_release": null,
            "last_deployment": null,
        })
    }

    #[test]
    fn text_status_says_when_cache_generations_do_not_alternate() {
        let alone = render_text(&with_cache(json!({ "slot": 0, "agreed": false })));
        assert!(
            alone.contains("cache generation slot 0 (not alternating: cache.redis is not set)"),
            "{alone}"
        );
        let fleet = render_text(&with_cache(json!({ "slot": 1, "agreed": true })));
        assert!(fleet.contains("cache generation slot 1\n"), "{fleet}");
        assert!(!fleet.contains("not alternating"), "{fleet}");
        let none = render_text(&with_cache(Value::Null));
        assert!(!none.contains("cache generation"), "{none}");
        assert!(none.contains("rollback:   none"), "{none}");
    }

    #[test]
    fn a_node_in_magento_maintenance_looked_healthy_in_status() {
        let with = |m: Value| {
            let mut s = with_cache(Value::Null);
            s["maintenance"] = m;
            render_text(&s)
        };
        let off = with(json!({ "flag": false, "window": null }));
        assert!(!off.contains("maintenance:"), "{off}");
        let by_hand = with(json!({ "flag": true, "window": null }));
        assert!(
            by_hand.contains("maintenance: ON: Magento's var/.maintenance.flag is in the current release (the storefront answers 503), not put there by bgagent"),
            "{by_hand}"
        );
        let by_window =
            with(json!({ "flag": true, "window": { "deployment": "d-2", "release": "r1" } }));
        assert!(
            by_window.contains("put there by deployment d-2's maintenance window (release r1)")
                && by_window.contains("`bgagent maintenance close`"),
            "{by_window}"
        );
        // An older document without the field renders as before.
        assert!(!render_text(&with_cache(Value::Null)).contains("maintenance:"));
    }
}
