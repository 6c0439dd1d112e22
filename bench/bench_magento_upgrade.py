#!/usr/bin/env python3
"""Magento upgrade under load (issue 15): an additive schema change deployed three ways.

Two nodes (each: nginx + php-fpm serving <node>/app/current/pub, a bgagent daemon with its
readiness listener) behind HAProxy (health check on /ready, as an ALB), one MariaDB, one
Redis. The release is the Magento model (tests/fixtures/magento-model): v1 is deployed and
upgraded first; then, under a constant-rate client through HAProxy (GET /catalog three times
out of four, /write the fourth), v2 = the `additive` variant (Vendor_Shop 1.0.0 -> 1.1.0: new
table shop_review, nullable column shop_product.subtitle) is deployed:

  bgagent     in-place, one node at a time through `bgagent hook` (ApplicationStop drains the
              node, AfterInstall runs the Magento gate and setup:upgrade once for the fleet
              under the MySQL lock, ApplicationStart switches, ValidateService); env.php has
              deployment/blue_green/enabled, so old code keeps serving on the upgraded DB.
  maintenance the procedure the peers use (Deployer's magento2 recipe, ece-tools): the new
              release built on both nodes (bgagent AfterInstall, no schema step), then
              maintenance:enable on both (in the current release), setup:upgrade once, the
              switch on both (a link renamed over `current`, as Deployer's deploy:symlink),
              maintenance:disable on both.
  flag-off    as bgagent, with the blue_green flag absent from env.php. bgagent refuses such a
              release under schema.policy: upgrade, so this contender runs the same
              setup:upgrade once for the fleet under the lock as a plain schema.migration of
              an app.kind: php config (no Magento checks): what operators get from a rolling
              deployment without the flag.

Failed = not 2xx, or no answer. The downtime window = from the first to the last failed
request. Errors are grouped by what old code answered.

    python3 bench/bench_magento_upgrade.py                 # 200 req/s, the three contenders
    python3 bench/bench_magento_upgrade.py --smoke         # bgagent only, 50 req/s (CI)

Writes magento_upgrade_{summary.json,series.csv} and magento_upgrade.png into --out.
Exits 1 when the bgagent contender failed a request or a deployment step failed.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Load, MariaDb, Redis, Web, first_line, free_port, markdown_table, run_hook,  # noqa: E402
                    run_plot, start_daemon, stop_daemon, wait_port)

FIX = REPO / "tests/fixtures"
PATHS = ["/catalog", "/catalog", "/catalog", "/write"]


def sh(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


class Node:
    def __init__(self, i, base: Path, db, redis, flag: bool, schema_yaml: str, bin_: str, upgrade_ms: int,
                 kind: str = "magento"):
        self.name = f"node{i}"
        self.d = base / self.name
        self.d.mkdir(parents=True)
        self.bin = bin_
        self.web = Web(self.d / "web", f"{self.d}/app/current/pub")
        self.ready = free_port()
        (self.d / "params.yaml").write_text(
            f"db: {{ host: 127.0.0.1, port: {db.port}, name: app, user: app, password: apppass }}\nsecure: [db.password]\n")
        bg = "'deployment' => ['blue_green' => ['enabled' => true]], " if flag else ""
        # model/upgrade_ms: setup:upgrade lasts at least this long (a real one takes minutes).
        bg += f"'model' => ['upgrade_ms' => {upgrade_ms}], "
        (self.d / "env.php.j2").write_text(
            "<?php return [" + bg + "'db' => ['connection' => ['default' => ['host' => {{ params.db.host }}, "
            "'port' => {{ params.db.port }}, 'dbname' => {{ params.db.name }}, 'username' => {{ params.db.user }}, "
            "'password' => {{ params.db.password }}]]]];\n")
        health = f"http://127.0.0.1:{self.web.port}/health.php"
        (self.d / "bgagent.yaml").write_text(f"""app_root: app
state_dir: state
socket: {{ path: run/s.sock, group: null }}
codedeploy: {{ deployment_root: ../cd-root }}
app: {{ kind: {kind}, name: shop }}
release: {{ shared_paths: [] }}
params: {{ source: file, path: params.yaml }}
templates: [ {{ source: env.php.j2, target: app/etc/env.php }} ]
cache: {{ redis: "redis://127.0.0.1:{redis.port}", node: {self.name} }}
readiness: {{ listen: "127.0.0.1:{self.ready}", status_listen: null }}
drain: {{ deregistration_delay: 1s }}
health:
  checks: [ {{ name: app, http: {{ url: "{health}", expect_status: [200] }} }} ]
  period: 100ms
  success_threshold: 1
schema:
  database: {{ host: 127.0.0.1, port: {db.port}, user: app, database: app, password_param: db.password }}
{schema_yaml}
""")
        self.daemon = start_daemon(bin_, self.d / "bgagent.yaml", self.d / "run/s.sock", self.d / "daemon.log",
                                   timeout=20)
        self.web.start()

    def hook(self, event, dep):
        return run_hook(self.bin, self.d / "bgagent.yaml", event, dep, app="shop", check=False)

    def magento(self, *args):
        cur = self.d / "app/current"
        return subprocess.run(["php", str(cur / "bin/magento"), *args], cwd=cur, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def stop(self):
        self.web.stop()
        stop_daemon(self.daemon)


class Haproxy:
    def __init__(self, d: Path, nodes):
        d.mkdir(parents=True)
        self.port = free_port()
        servers = "\n".join(
            f"  server {n.name} 127.0.0.1:{n.web.port} check port {n.ready} inter 100 fall 2 rise 2" for n in nodes)
        (d / "haproxy.cfg").write_text(f"""global
  pidfile {d}/haproxy.pid
defaults
  mode http
  timeout connect 2s
  timeout client 10s
  timeout server 10s
  option redispatch
  retries 0
frontend fe
  bind 127.0.0.1:{self.port}
  default_backend be
backend be
  balance roundrobin
  option httpchk GET /ready
  http-check expect status 200
{servers}
""")
        self.p = subprocess.Popen(["haproxy", "-Ws", "-f", str(d / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        self.p.terminate()
        self.p.wait(10)


def revision(base: Path, dep: str, variant, rid: str):
    root = base / f"cd-root/g/{dep}/deployment-archive"
    root.mkdir(parents=True)
    sh(["cp", "-a", f"{FIX}/magento-model/.", str(root)])
    if variant:
        sh(["cp", "-a", f"{FIX}/magento-variants/{variant}/.", str(root)])
    (root / "RELEASE_ID").write_text(rid)


def contender(name, a, work: Path):
    base = work / name
    base.mkdir(parents=True)
    db, redis = MariaDb(base / "db"), Redis(base / "redis")
    db.sql("CREATE DATABASE app; CREATE USER 'app'@'%' IDENTIFIED BY 'apppass'; GRANT ALL ON app.* TO 'app'@'%';")
    flag = name != "flag-off"
    # The maintenance contender builds with bgagent but runs no schema step: the operator's
    # procedure does it, under maintenance.
    schema = {
        "bgagent": "  magento_gate: true\n  policy: upgrade\n",
        "maintenance": "  magento_gate: false\n  policy: ignore\n",
        # bgagent refuses a Magento release without the flag under policy: upgrade; what the
        # flag changes is measured with the same rolling procedure and the same setup:upgrade
        # run once for the fleet under the lock, as a plain migration (no Magento checks).
        "flag-off": "  magento_gate: false\n  policy: ignore\n"
                    "  migration: { argv: [php, bin/magento, setup:upgrade, --keep-generated] }\n",
    }[name]
    nodes, hap, steps, fails = [], None, [], []
    try:
        # v1 installed with the upgrade path first (the database starts empty).
        # (flag-off: bgagent refuses that release under policy: upgrade, so its own schema
        # config, the plain migration, installs v1 too.)
        setup = schema if name == "flag-off" else "  magento_gate: true\n  policy: upgrade\n"
        kind = "php" if name == "flag-off" else "magento"
        nodes = [Node(i, base, db, redis, flag, setup, a.bin, a.upgrade_ms, kind) for i in range(2)]
        revision(base, "d-1", None, "v1")
        for n in nodes:
            for ev in ["BeforeInstall", "AfterInstall", "ApplicationStart", "ValidateService"]:
                h = n.hook(ev, "d-1")
                if h.returncode != 0:
                    raise SystemExit(f"{name}: v1 {ev} on {n.name} failed:\n{h.output}")
        # The contender's own config, re-read on SIGHUP (between deployments).
        for n in nodes:
            cfg = (n.d / "bgagent.yaml").read_text().replace(setup, schema)
            (n.d / "bgagent.yaml").write_text(cfg)
            n.daemon.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        before = db.sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade'").strip()
        hap = Haproxy(base / "haproxy", nodes)
        time.sleep(1.0)
        revision(base, "d-2", "additive", "v2")
        load = Load(hap.port, a.rate, a.max_seconds, workers=32, paths=PATHS, headers={}, summarise=first_line)
        load.start()
        time.sleep(a.steady)

        def step(label, f):
            t0 = load.now()
            ok, out = f()
            # What the gate said (classification, flag, the once-per-fleet upgrade).
            said = [ln.split("  ", 1)[-1].strip()[:300] for ln in out.splitlines()
                    if any(k in ln for k in ("additive", "breaking", "blue_green", "setup:upgrade", "schema change"))]
            steps.append(dict(step=label, start=round(t0, 3), end=round(load.now(), 3), ok=ok, said=said[:8]))
            if not ok:
                fails.append(f"{label}: {out[-2000:]}")

        def hook(n, ev):
            return lambda: (lambda h: (h.returncode == 0, h.output))(n.hook(ev, "d-2"))

        def magento(n, *args):
            return lambda: (lambda r: (r.returncode == 0, r.stdout))(n.magento(*args))

        def switch(n):
            # As Deployer's deploy:symlink: a new link renamed over `current` (mv -T).
            def f():
                rels = n.d / "app/releases"
                rel = sorted(p for p in rels.iterdir() if not p.name.startswith("."))[-1]
                tmp = n.d / "app/current.tmp"
                os.symlink(f"releases/{rel.name}", tmp)
                os.replace(tmp, n.d / "app/current")
                return True, ""
            return f

        if name == "maintenance":
            for n in nodes:
                step(f"{n.name} BeforeInstall", hook(n, "BeforeInstall"))
                step(f"{n.name} AfterInstall (build, no schema step)", hook(n, "AfterInstall"))
            for n in nodes:
                step(f"{n.name} maintenance:enable", magento(n, "maintenance:enable"))
            new = nodes[0].d / "app/releases"
            rel = sorted(p for p in new.iterdir() if not p.name.startswith("."))[-1]
            step("setup:upgrade (once)", lambda: (lambda r: (r.returncode == 0, r.stdout))(
                subprocess.run(["php", "bin/magento", "setup:upgrade", "--keep-generated"], cwd=rel,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
            for n in nodes:
                step(f"{n.name} switch", switch(n))
            for n in nodes:
                step(f"{n.name} maintenance:disable", magento(n, "maintenance:disable"))
        else:
            # CodeDeploy in-place, one node at a time.
            for n in nodes:
                for ev in ["ApplicationStop", "BeforeInstall", "AfterInstall", "ApplicationStart",
                           "ValidateService", "AfterAllowTraffic"]:
                    step(f"{n.name} {ev}", hook(n, ev))
        time.sleep(a.steady)
        recs = load.finish()
        upgrades = int(db.sql("SELECT COUNT(*) FROM app.model_runs WHERE command = 'setup:upgrade'")) - int(before)
    finally:
        if hap:
            hap.stop()
        for n in nodes:
            n.stop()
        db.stop()
        redis.stop()
    return analyse(name, recs, steps, fails, upgrades)


def analyse(name, recs, steps, fails, upgrades):
    failed = [r for r in recs if not (200 <= r[2] < 300)]
    ok_lat = sorted(r[1] for r in recs if 200 <= r[2] < 300)
    span = (recs[-1][0] - recs[0][0]) if recs else 0
    return {
        "contender": name,
        "requests": len(recs),
        "rate": round(len(recs) / span, 1) if span else 0,
        "failed": len(failed),
        "downtime_s": round(failed[-1][0] - failed[0][0], 3) if failed else 0.0,
        "first_failure_s": round(failed[0][0], 3) if failed else None,
        "errors": dict(Counter(f"{r[2]} {r[3]}" for r in failed).most_common()),
        "answered_by_release": dict(Counter(r[3].split()[0] for r in recs if 200 <= r[2] < 300)),
        "p50_ms": round(ok_lat[len(ok_lat) // 2] * 1000, 1) if ok_lat else 0,
        "p99_ms": round(ok_lat[max(0, int(len(ok_lat) * 0.99) - 1)] * 1000, 1) if ok_lat else 0,
        "setup_upgrade_runs": upgrades,
        "steps": steps,
        "step_failures": fails,
        "series": series(recs),
    }


def series(recs, bucket=0.25):
    rows, i = [], 0
    if not recs:
        return rows
    t, end = 0.0, recs[-1][0]
    while t <= end:
        b = []
        while i < len(recs) and recs[i][0] < t + bucket:
            b.append(recs[i])
            i += 1
        rows.append((round(t, 2), sum(1 for r in b if 200 <= r[2] < 300) / bucket,
                     sum(1 for r in b if not (200 <= r[2] < 300)) / bucket))
        t += bucket
    return rows


def plot(out: Path, results, rate):
    data = {r["contender"]: {"series": r["series"], "steps": r["steps"]} for r in results}
    (out / "magento_upgrade_plot.json").write_text(json.dumps(data))
    code = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, rate = sys.argv[1], sys.argv[2]
data = json.load(open(out + "/magento_upgrade_plot.json"))
fig, axes = plt.subplots(len(data), 1, figsize=(11, 3.0 * len(data)), sharex=False, squeeze=False)
for ax, (name, d) in zip(axes[:, 0], data.items()):
    t = [r[0] for r in d["series"]]
    ax.plot(t, [r[1] for r in d["series"]], color="tab:green", label="2xx /s")
    ax.fill_between(t, [r[2] for r in d["series"]], color="tab:red", alpha=0.6, label="failed /s")
    for s in d["steps"]:
        if any(k in s["step"] for k in ("AfterInstall", "ApplicationStart", "setup:upgrade", "switch", "maintenance")):
            ax.axvspan(s["start"], s["end"], color="tab:blue", alpha=0.08)
    ax.set_title(name)
    ax.set_ylabel("req/s")
    ax.legend(loc="lower left", fontsize=8)
axes[-1, 0].set_xlabel("seconds (shaded: AfterInstall, ApplicationStart, setup:upgrade, switch, maintenance steps)")
fig.suptitle("Additive Magento upgrade on 2 nodes behind HAProxy, " + rate)
fig.tight_layout()
fig.savefig(out + "/magento_upgrade.png", dpi=90)
'''
    run_plot("-c", code, str(out), str(rate))
    (out / "magento_upgrade_plot.json").unlink(missing_ok=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/debug/bgagent"))
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of load before and after")
    ap.add_argument("--max-seconds", type=float, default=180, help="bound on the load")
    ap.add_argument("--upgrade-ms", type=int, default=5000,
                    help="setup:upgrade takes at least this long (the model's model/upgrade_ms)")
    ap.add_argument("--only", action="append", choices=["bgagent", "maintenance", "flag-off"])
    ap.add_argument("--smoke", action="store_true", help="bgagent only, 50 req/s, 1 s of steady load")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    a = ap.parse_args()
    if a.smoke:
        a.rate, a.steady, a.only, a.upgrade_ms = 50, 1.0, ["bgagent"], 1000
    names = a.only or ["bgagent", "maintenance", "flag-off"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bgagent-mu-"))
    results = []
    try:
        for name in names:
            print(f"+ {name}", file=sys.stderr)
            results.append(contender(name, a, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = [{k: v for k, v in r.items() if k != "series"} for r in results]
    (out / "magento_upgrade_summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "magento_upgrade_series.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["contender", "t", "ok_per_s", "failed_per_s"])
        for r in results:
            for row in r["series"]:
                w.writerow([r["contender"], *row])
    plot(out, results, f"{a.rate} req/s, setup:upgrade >= {a.upgrade_ms} ms")
    print(f"## Additive Magento upgrade, 2 nodes behind HAProxy, {a.rate} req/s, setup:upgrade >= {a.upgrade_ms} ms\n")
    rows = []
    for r in results:
        errs = "; ".join(f"{n} x {e}" for e, n in list(r["errors"].items())[:3]) or "-"
        rows.append([r["contender"], r["requests"], r["rate"], r["failed"], r["downtime_s"], r["setup_upgrade_runs"],
                     r["p50_ms"], r["p99_ms"], errs])
    print(markdown_table(["contender", "requests", "achieved req/s", "failed", "downtime window s", "setup:upgrade runs",
                          "p50 ms", "p99 ms", "what failed requests got"], rows, "lrrrrrrrl"))
    for r in results:
        for f in r["step_failures"]:
            print(f"\n{r['contender']}: step failed: {f}")
    print(f"\nPlot: {out / 'magento_upgrade.png'}")
    bad = [r for r in results if r["step_failures"] or (r["contender"] == "bgagent" and r["failed"])]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
