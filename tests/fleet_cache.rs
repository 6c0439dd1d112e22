//! The fleet test for cache generations: 8 agents (separate roots, sockets and readiness
//! ports; one Redis) run the same deployment at the same instant; all must choose the same
//! generation and exactly one must flush it. Then a second deployment takes the other slot,
//! and a rollback makes the first live again without a flush.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;
use support::fleet::{self, Agent};
use support::text;

const NODES: usize = 8;

fn agent(base: &Path, i: usize, redis: &str) -> Agent {
    agent_with(base, i, redis, "")
}

fn agent_with(base: &Path, i: usize, redis: &str, cache_extra: &str) -> Agent {
    let dir = base.join(format!("node{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("t.php.j2"),
        "<?php return [{{ deploy.cache.default_db }}, {{ deploy.cache.id_prefix }}];\n",
    )
    .unwrap();
    let cfg = format!(
        "app_root: app\nstate_dir: state\nsocket: {{ path: run/s.sock, group: null }}\ncodedeploy: {{ deployment_root: ../cd-root }}\n\
         app: {{ kind: php, name: shop }}\nrelease: {{ shared_paths: [] }}\n\
         templates: [ {{ source: t.php.j2, target: app/etc/env.php, check: [] }} ]\n\
         cache: {{ redis: \"{redis}\", node: node{i}{cache_extra} }}\nreadiness: {{ listen: \"127.0.0.1:{}\" }}\n\
         drain: {{ deregistration_delay: 0s }}\n",
        support::free_port()
    );
    Agent::spawn(&dir, &cfg)
}

/// `n` agents, node0 to node{n-1}, under `base`.
fn start_agents(base: &Path, n: usize, redis: &str) -> Vec<Agent> {
    (0..n).map(|i| agent(base, i, redis)).collect()
}

/// The cache slot of the release the agent serves.
fn slot(a: &Agent) -> u64 {
    a.status_json()["current_release"]["cache"]["slot"]
        .as_u64()
        .unwrap()
}

/// All nodes run `events` of `dep` concurrently, released by one barrier per event.
fn fleet_deploy(agents: &[Agent], dep: &str, events: &[&str]) -> Vec<Vec<Output>> {
    fleet::together(agents, dep, events)
        .into_iter()
        .map(|node| node.into_iter().map(|(out, _)| out).collect())
        .collect()
}

/// [`fleet_deploy`], where every hook must succeed.
fn fleet_deploy_ok(agents: &[Agent], dep: &str, events: &[&str]) -> Vec<Vec<Output>> {
    let outs = fleet_deploy(agents, dep, events);
    for o in outs.iter().flatten() {
        assert_eq!(o.status.code(), Some(0), "{}", text(o));
    }
    outs
}

/// One agent runs `events` of `dep` in order; each must succeed.
fn hooks_ok(a: &Agent, dep: &str, events: &[&str]) {
    for ev in events {
        let o = a.hook(ev, dep);
        assert!(o.status.success(), "{}", text(&o));
    }
}

fn revision(base: &Path, dep: &str) {
    let d = fleet::archive(&base.join("cd-root"), dep).join("pub");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("index.php"), dep).unwrap();
}

/// BeforeInstall to AfterAllowTraffic.
const EVENTS: &[&str] = support::IN_PLACE.split_at(3).1;

#[test]
fn eight_agents_agree_on_one_generation_flush_it_once_and_alternate() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let agents = start_agents(base.path(), NODES, &redis.url());

    // stale entries in slot 0's databases must be gone after the first deployment's flush
    redis.cli(0, &["SET", "stale-cache-entry", "x"]);
    redis.cli(2, &["SET", "PHPREDIS_SESSION:abc", "session"]);
    revision(base.path(), "d-1");
    let outs = fleet_deploy_ok(&agents, "d-1", &EVENTS);
    let flushes = outs
        .iter()
        .flatten()
        .filter(|o| text(o).contains("flushed cache generation slot 0"))
        .count();
    assert_eq!(flushes, 1, "exactly one node flushes the new generation");
    assert!(agents.iter().all(|a| slot(a) == 0));
    assert_eq!(redis.cli(0, &["EXISTS", "stale-cache-entry"]), "0");
    assert_eq!(
        redis.cli(2, &["GET", "PHPREDIS_SESSION:abc"]),
        "session",
        "sessions never flushed"
    );
    for a in &agents {
        let env = std::fs::read_to_string(a.dir.join("app/current/app/etc/env.php")).unwrap();
        assert_eq!(env, "<?php return [0, 'shop_0_'];\n");
    }
    assert!(
        redis
            .cli(2, &["GET", "bgagent:shop:live"])
            .contains("\"slot\":0")
    );

    // the old generation keeps its entries while a node serves it
    redis.cli(0, &["SET", "gen0-entry", "x"]);
    revision(base.path(), "d-2");
    let outs = fleet_deploy_ok(&agents, "d-2", &EVENTS);
    assert!(
        agents.iter().all(|a| slot(a) == 1),
        "the second deployment takes the other slot"
    );
    assert_eq!(
        redis.cli(0, &["EXISTS", "gen0-entry"]),
        "1",
        "slot 0 was not flushed"
    );
    assert_eq!(
        outs.iter()
            .flatten()
            .filter(|o| text(o).contains("flushed cache generation slot 1"))
            .count(),
        1
    );

    // rollback: slot 0 is live again, nothing flushed
    redis.cli(3, &["SET", "gen1-entry", "x"]);
    for a in &agents {
        let out = a.cli(&["rollback"]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(slot(a), 0);
    }
    assert!(
        redis
            .cli(2, &["GET", "bgagent:shop:live"])
            .contains("\"slot\":0")
    );
    assert_eq!(redis.cli(0, &["EXISTS", "gen0-entry"]), "1");
    assert_eq!(redis.cli(3, &["EXISTS", "gen1-entry"]), "1");

    // a third deployment would reuse slot 1: it is not served by anyone now, so it is flushed
    revision(base.path(), "d-3");
    fleet_deploy_ok(&agents, "d-3", &EVENTS[..2]);
    assert_eq!(redis.cli(3, &["EXISTS", "gen1-entry"]), "0");
}

#[test]
fn a_generation_still_served_is_never_flushed() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let a = agent(base.path(), 0, &redis.url());
    revision(base.path(), "d-1");
    hooks_ok(&a, "d-1", &EVENTS);
    // another node still serves slot 1 (fresh heartbeat)
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    // (coordination keys live in the session database, 2)
    redis.cli(2, &["HSET", "bgagent:shop:serving:1", "old-node", &now]);
    redis.cli(3, &["SET", "served-entry", "x"]);
    revision(base.path(), "d-2");
    let out = a.hook("AfterInstall", "d-2");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("slot 1 is still served by old-node"), "{t}");
    assert_eq!(redis.cli(3, &["EXISTS", "served-entry"]), "1");
}

#[test]
fn a_serving_node_keeps_its_registration_fresh() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let a = agent_with(base.path(), 0, &redis.url(), ", stale_after: 4s");
    revision(base.path(), "d-1");
    hooks_ok(&a, "d-1", &EVENTS);
    let first: u64 = redis
        .cli(2, &["HGET", "bgagent:shop:serving:0", "node0"])
        .parse()
        .unwrap();
    // the heartbeat runs every stale_after/4 = 1 s
    std::thread::sleep(Duration::from_millis(2500));
    let later: u64 = redis
        .cli(2, &["HGET", "bgagent:shop:serving:0", "node0"])
        .parse()
        .unwrap();
    assert!(
        later > first,
        "registration not refreshed: {first} -> {later}"
    );
}

/// Keys per database for the large-slot test: enough that a blocking FLUSHDB of one database
/// outlasts the Redis client's default 500 ms reply deadline on this kind of machine (400k
/// keys took 0.6 s here), few enough that filling both takes a few seconds.
const LARGE_SLOT_KEYS: &str = "600000";

/// Issue 16, break 1: a slot holding the cache of two releases back (hundreds of thousands
/// of keys per database) wedged the deployment. The blocking FLUSHDB outlasted the client's
/// 500 ms reply timeout, the flusher failed with "timed out", its claim was never given back
/// and every retry then waited for a flush that nobody would finish. Now the flush is
/// FLUSHDB ASYNC under its own deadline (Redis frees the keys in the background and keeps
/// answering the session database), and the deployment goes through on every node.
#[test]
fn a_large_slot_flush_does_not_time_out_or_block_the_session_database() {
    let redis = support::Redis::start_with(&["--enable-debug-command", "yes"]);
    let base = tempfile::tempdir().unwrap();
    for db in [0, 1] {
        assert_eq!(
            redis.cli(
                db,
                &["DEBUG", "POPULATE", LARGE_SLOT_KEYS, "magento_cache", "64"]
            ),
            "OK"
        );
    }
    redis.cli(2, &["SET", "PHPREDIS_SESSION:abc", "session"]);
    // every command from now on, with its arguments, lands in the slow log
    redis.cli(0, &["CONFIG", "SET", "slowlog-log-slower-than", "0"]);
    redis.cli(0, &["CONFIG", "SET", "slowlog-max-len", "100000"]);
    redis.cli(0, &["SLOWLOG", "RESET"]);
    let agents = start_agents(base.path(), 4, &redis.url());
    revision(base.path(), "d-1");
    let outs = fleet_deploy_ok(&agents, "d-1", &EVENTS[..2]);
    assert_eq!(
        outs.iter()
            .flatten()
            .filter(|o| text(o).contains("flushed cache generation slot 0"))
            .count(),
        1,
        "exactly one node flushes"
    );
    assert_eq!(redis.cli(0, &["DBSIZE"]), "0");
    assert_eq!(redis.cli(1, &["DBSIZE"]), "0");
    assert_eq!(redis.cli(2, &["GET", "PHPREDIS_SESSION:abc"]), "session");
    let slowlog = redis.cli(0, &["SLOWLOG", "GET", "100000"]);
    let flushes: Vec<&str> = slowlog
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].eq_ignore_ascii_case("flushdb"))
        .map(|w| w[1])
        .collect();
    assert_eq!(
        flushes,
        ["ASYNC", "ASYNC"],
        "each of the slot's two databases flushed once, without blocking Redis"
    );
}

/// Issue 16, break 1: a flush that failed kept its claim for a week, so every retry on every
/// node failed with "node X did not finish flushing slot 0". A failing FLUSHDB is made real
/// here with a Redis ACL that denies it; once the operator grants it, a retry on another
/// node takes the flush over and finishes the deployment.
#[test]
fn a_failed_flush_gives_its_claim_back_and_a_retry_on_another_node_finishes_it() {
    let redis = support::Redis::start();
    redis.cli(
        0,
        &[
            "ACL", "SETUSER", "bgagent", "on", ">s3cret", "~*", "&*", "+@all", "-flushdb",
        ],
    );
    let url = format!("redis://bgagent:s3cret@127.0.0.1:{}", redis.port);
    let base = tempfile::tempdir().unwrap();
    let agents: Vec<Agent> = (0..2)
        .map(|i| agent_with(base.path(), i, &url, ", flush_wait: 3s"))
        .collect();
    redis.cli(0, &["SET", "stale-cache-entry", "x"]);
    revision(base.path(), "d-1");
    for a in &agents {
        assert!(a.hook("BeforeInstall", "d-1").status.success());
    }
    let out = agents[0].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("Redis at redis://***@127.0.0.1")
            && t.contains("no permissions to run the 'flushdb' command"),
        "the failure names the server (never its password) and Redis's reason: {t}"
    );
    assert!(!t.contains("s3cret"), "{t}");
    assert_eq!(redis.cli(0, &["EXISTS", "stale-cache-entry"]), "1");

    // the operator fixes the cause; the retry goes to the other node
    redis.cli(0, &["ACL", "SETUSER", "bgagent", "+flushdb"]);
    let out = agents[1].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("flushed cache generation slot 0"), "{t}");
    assert_eq!(redis.cli(0, &["EXISTS", "stale-cache-entry"]), "0");
    // and the failed node's own retry goes through without flushing again
    let out = agents[0].hook("AfterInstall", "d-1");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(!t.contains("flushed cache generation"), "{t}");
}

/// Issue 16, break 3: Redis restarted without persistence in the middle of a deployment.
/// Nodes 0-1 had agreed on slot 1; nodes 2-3 found an empty Redis, re-derived slot 0 and
/// flushed it while the whole fleet served it: one deployment split across two slots. Now
/// the loss is detected (the release records the Redis state it was agreed in) and the
/// deployment is refused on every node with the reason; the next deployment agrees anew
/// without flushing the served slot.
#[test]
fn a_redis_restart_without_persistence_mid_deployment_is_refused_never_split() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let agents = start_agents(base.path(), 4, &redis.url());
    revision(base.path(), "d-1");
    fleet_deploy_ok(&agents, "d-1", &EVENTS);
    assert!(agents.iter().all(|a| slot(a) == 0));

    revision(base.path(), "d-2");
    fleet_deploy_ok(&agents[..2], "d-2", &EVENTS[..2]);
    redis.restart();
    // the fleet goes on serving slot 0 and fills it again
    redis.cli(0, &["SET", "gen0-entry", "x"]);
    for o in fleet_deploy(&agents[2..], "d-2", &EVENTS[..2])
        .iter()
        .map(|n| &n[1])
    {
        let t = text(o);
        assert_eq!(o.status.code(), Some(1), "{t}");
        assert!(
            t.contains("lost bgagent's fleet state")
                && t.contains("refuses deployment d-2 on every node")
                && t.contains("Start a new deployment"),
            "{t}"
        );
    }
    for a in &agents[..2] {
        let o = a.hook("ApplicationStart", "d-2");
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{t}");
        assert!(t.contains("lost bgagent's fleet state"), "{t}");
    }
    assert!(
        agents.iter().all(|a| slot(a) == 0),
        "every node still serves d-1's generation"
    );
    assert_eq!(
        redis.cli(0, &["EXISTS", "gen0-entry"]),
        "1",
        "the served slot was not flushed"
    );

    // a new deployment agrees anew: the other slot, on every node, the served one kept
    revision(base.path(), "d-3");
    fleet_deploy_ok(&agents, "d-3", &EVENTS);
    assert!(agents.iter().all(|a| slot(a) == 1));
    assert_eq!(redis.cli(0, &["EXISTS", "gen0-entry"]), "1");
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Issue 16: a node whose daemon was down longer than `cache.stale_after` (its nginx still
/// serving) had its slot flushed and reused under it. A silent registration now blocks the
/// flush; the refusal names the node, says it is silent, and gives the command that removes
/// it once the operator knows the node is gone; after that the retry goes through.
#[test]
fn a_silent_node_past_stale_after_still_blocks_the_flush_and_is_named() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let a = agent(base.path(), 0, &redis.url());
    revision(base.path(), "d-1");
    hooks_ok(&a, "d-1", &EVENTS);
    // web9 registered on slot 1 two hours ago (stale_after: 1h) and went silent
    let then = (now_secs() - 7200).to_string();
    redis.cli(2, &["HSET", "bgagent:shop:serving:1", "web9", &then]);
    redis.cli(3, &["SET", "served-entry", "x"]);
    revision(base.path(), "d-2");
    assert!(a.hook("BeforeInstall", "d-2").status.success());
    let out = a.hook("AfterInstall", "d-2");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("slot 1 is still served by web9 (silent for 2h")
            && t.contains("redis-cli -n 2 HDEL bgagent:shop:serving:1 <node>"),
        "{t}"
    );
    assert_eq!(redis.cli(3, &["EXISTS", "served-entry"]), "1");
    // the operator confirms web9 is gone and removes it as told; the retry flushes
    redis.cli(2, &["HDEL", "bgagent:shop:serving:1", "web9"]);
    let out = a.hook("AfterInstall", "d-2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(redis.cli(3, &["EXISTS", "served-entry"]), "0");
}

/// Issue 16: a late AfterAllowTraffic of a deployment that a newer one had superseded moved
/// the fleet's live pointer back to the old generation. Events of a superseded deployment
/// leave fleet state alone (the node's own event still succeeds).
#[test]
fn a_late_event_of_a_superseded_deployment_leaves_the_live_pointer_alone() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let agents = start_agents(base.path(), 2, &redis.url());
    revision(base.path(), "d-1");
    // node0 lags: it stops before d-1's AfterAllowTraffic
    hooks_ok(&agents[0], "d-1", &EVENTS[..5]);
    revision(base.path(), "d-2");
    hooks_ok(&agents[1], "d-2", &EVENTS);
    let live = redis.cli(2, &["GET", "bgagent:shop:live"]);
    assert!(live.contains("\"deployment\":\"d-2\""), "{live}");
    let o = agents[0].hook("AfterAllowTraffic", "d-1");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("deployment d-1 was superseded"),
        "{}",
        text(&o)
    );
    assert_eq!(
        redis.cli(2, &["GET", "bgagent:shop:live"]),
        live,
        "the late event moved the fleet's live pointer"
    );
}

/// Issue 16: `bgagent rollback` on one node rewrote the fleet-wide live pointer. A one-node
/// rollback is that node's decision; the pointer moves back only once no node serves the
/// live generation any more.
#[test]
fn a_rollback_on_one_node_leaves_the_fleet_live_pointer_alone() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let agents = start_agents(base.path(), 2, &redis.url());
    for dep in ["d-1", "d-2"] {
        revision(base.path(), dep);
        fleet_deploy_ok(&agents, dep, &EVENTS);
    }
    let rollback = |a: &Agent| {
        let out = a.cli(&["rollback"]);
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let live = || redis.cli(2, &["GET", "bgagent:shop:live"]);
    assert!(live().contains("\"slot\":1"), "{}", live());
    let t = rollback(&agents[0]);
    assert_eq!(slot(&agents[0]), 0);
    assert!(
        live().contains("\"slot\":1"),
        "one node's rollback moved the fleet's pointer: {} ({t})",
        live()
    );
    rollback(&agents[1]);
    assert!(live().contains("\"slot\":0"), "{}", live());
}

/// Issue 16: a node lagging behind deployment N (AfterInstall done, never switched) when
/// N+1 reached it could finish neither: N+1 needed the slot the lagging node still served,
/// and N was superseded on it. A drained node serves nothing, so N+1's ApplicationStop
/// deregisters it and N+1 supersedes N cleanly, taking that slot on every node.
#[test]
fn a_node_lagging_behind_a_deployment_does_not_block_the_next_one() {
    let redis = support::Redis::start();
    let base = tempfile::tempdir().unwrap();
    let agents = start_agents(base.path(), 2, &redis.url());
    revision(base.path(), "d-1");
    fleet_deploy_ok(&agents, "d-1", &EVENTS);
    // d-2: node1 goes all the way (slot 1 is live); node0 installs and lags on slot 0
    revision(base.path(), "d-2");
    hooks_ok(&agents[1], "d-2", &EVENTS);
    hooks_ok(&agents[0], "d-2", &EVENTS[..2]);
    assert_eq!(slot(&agents[0]), 0);
    redis.cli(0, &["SET", "gen0-entry", "x"]);
    // d-3 (a new deployment, or CodeDeploy's automatic rollback) reaches both nodes
    revision(base.path(), "d-3");
    let mut events = vec!["ApplicationStop"];
    events.extend_from_slice(&EVENTS);
    fleet_deploy_ok(&agents, "d-3", &events);
    assert!(agents.iter().all(|a| slot(a) == 0));
    assert_eq!(
        redis.cli(0, &["EXISTS", "gen0-entry"]),
        "0",
        "the slot left by the lagging node was flushed for d-3"
    );
    assert!(
        redis
            .cli(2, &["GET", "bgagent:shop:live"])
            .contains("\"deployment\":\"d-3\"")
    );
}
