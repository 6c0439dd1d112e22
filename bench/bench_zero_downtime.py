#!/usr/bin/env python3
"""Zero-downtime benchmark (issue 3): consecutive in-place deploys under continuous load.

Starts php-fpm and nginx privately on 127.0.0.1, serving <root>/current/pub (bgagent) or a
live directory (the tutorial baseline). A bounded load generator sends requests at a fixed
rate through nginx for the whole run and records every response. Each release answers with
its own id, so a response from the old release after ApplicationStart returned is counted
as stale.

  bgagent:  every event of each deploy runs through `bgagent hook` (daemon, exec backend:
            config tests, php-fpm USR2 and nginx reload, HTTP health check, readiness).
  baseline: the tutorial's procedure (../shared/seeds/000_*): stop nginx, copy over the live
            root, chown -R, chmod -R 755, start nginx, sleep, curl.

    python3 bench/bench_zero_downtime.py                     # 10 deploys each, 200 req/s
    python3 bench/bench_zero_downtime.py --smoke             # 2 deploys, short sleep
Writes CSV time series and a PNG (bench/plot.py) into --out.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Load, Web, free_port, lifecycle_events, markdown_table, release_number,  # noqa: E402
                    run_hook, run_plot, start_daemon, stop_daemon, wait_port, write_csv)


def make_release(dst: Path, rid: str):
    (dst / "pub").mkdir(parents=True, exist_ok=True)
    (dst / "pub/index.php").write_text(
        "<?php header('Content-Type: text/plain'); echo 'release=' . trim(file_get_contents(__DIR__ . '/../RELEASE_ID')) . \"\\n\";\n")
    (dst / "pub/health.php").write_text("<?php echo \"OK\\n\";\n")
    (dst / "RELEASE_ID").write_text(rid)


def series(records, events, label, bucket=0.5):
    rows = []
    if not records:
        return rows
    end = max(r[0] for r in records)
    t = 0.0
    i = 0
    recs = records
    while t + bucket <= end:  # whole buckets only
        b = []
        while i < len(recs) and recs[i][0] < t + bucket:
            b.append(recs[i])
            i += 1
        lat = sorted(r[1] for r in b)
        p99 = lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0] * 1000 if lat else 0
        errs = sum(1 for r in b if not (200 <= r[2] < 300))
        rows.append((round(t, 2), len(b) / bucket, errs, round(p99, 2), label))
        t += bucket
    return rows


def run_bgagent(a, work: Path):
    root = work / "bg"
    app = root / "app"
    app.mkdir(parents=True)
    web = Web(root / "web", f"{app}/current/pub")
    cfg = root / "bgagent.yaml"
    ready = free_port()
    cfg.write_text(f"""app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: bench }}
release: {{ keep: 3, shared_paths: [] }}
{web.services_yaml()}{web.health_yaml()}readiness: {{ listen: "127.0.0.1:{ready}" }}
""")
    daemon = start_daemon(a.bin, cfg, root / "run/bgagent.sock", root / "daemon.log")

    def deploy(n):
        dep = f"d-{n}"
        make_release(root / "cd-root/g" / dep / "deployment-archive", f"r{n}")
        marks = []
        for ev in lifecycle_events(first=n == 0):
            t_ev = load.now() if load else 0
            run_hook(a.bin, cfg, ev, dep)
            marks.append((t_ev, load.now() if load else 0, ev))
        return marks

    load = None
    web.start()
    try:
        deploy(0)  # initial release before the load starts
        load = Load(web.port, a.rate, a.max_seconds)
        load.start()
        recs, events, switched = deploys_under_load(a, load, deploy)
    finally:
        stop_daemon(daemon)
        web.stop()
    return recs, events, switched


def run_baseline(a, work: Path):
    root = work / "tutorial"
    live = root / "html"
    live.mkdir(parents=True)
    web = Web(root / "web", f"{live}/pub")
    owner = "www-data" if os.geteuid() == 0 else None
    load = None

    def deploy(n):
        src = root / f"rev{n}"
        make_release(src, f"r{n}")
        marks = []
        # BeforeInstall: systemctl stop nginx
        t = load.now() if load else 0
        if n > 0:
            subprocess.run(web.nginx + ["-s", "quit"], check=False)
            pid = web.d / "run/nginx.pid"
            while pid.exists():
                time.sleep(0.01)
        marks.append((t, load.now() if load else 0, "BeforeInstall"))
        # CodeDeploy's files: copy over the live root; AfterInstall: chown -R, chmod -R 755
        t = load.now() if load else 0
        subprocess.run(["cp", "-r", f"{src}/.", str(live)], check=True)
        if owner:
            subprocess.run(["chown", "-R", f"{owner}:{owner}", str(live)], check=True)
        subprocess.run(["chmod", "-R", "755", str(live)], check=True)
        marks.append((t, load.now() if load else 0, "AfterInstall"))
        # ApplicationStart: systemctl start nginx
        t = load.now() if load else 0
        subprocess.run(web.nginx, check=True)
        marks.append((t, load.now() if load else 0, "ApplicationStart"))
        # ValidateService: sleep 30; curl --fail
        t = load.now() if load else 0
        time.sleep(a.tutorial_sleep)
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{web.port}/health.php"], check=True)
        marks.append((t, load.now() if load else 0, "ValidateService"))
        return marks

    subprocess.run(web.fpm, check=True)
    try:
        make_release(live, "r0")
        subprocess.run(web.nginx, check=True)
        wait_port(web.port)
        load = Load(web.port, a.rate, a.max_seconds)
        load.start()
        recs, events, switched = deploys_under_load(a, load, deploy)
    finally:
        web.stop()
    return recs, events, switched


def deploys_under_load(a, load, deploy):
    """--deploys deploys r1.. under the running load, --settle s apart and around; returns
    the load's records, every event's (start, end, event, release) and each switch's
    (ApplicationStart's end, release)."""
    time.sleep(a.settle)
    events, switched = [], []
    for n in range(1, a.deploys + 1):
        for (t0, t1, ev) in deploy(n):
            events.append((t0, t1, ev, f"r{n}"))
            if ev == "ApplicationStart":
                switched.append((t1, f"r{n}"))
        time.sleep(a.settle)
    return load.finish(), events, switched


def analyse(name, recs, events, switched):
    failed = sum(1 for r in recs if not (200 <= r[2] < 300))
    # stale: a response from an older release to a request sent after ApplicationStart returned
    stale = 0
    for (t_sw, rel) in switched:
        nxt = [t for (t, _) in switched if t > t_sw]
        end = nxt[0] if nxt else float("inf")
        for r in recs:
            # older than the release switched to; a newer one only means the next switch
            # happened before its hook returned
            if t_sw <= r[0] < end and 200 <= r[2] < 300 and release_number(r[3]) < release_number(rel):
                stale += 1
                if os.environ.get("BENCH_DEBUG"):
                    print(name, "STALE", rel, round(t_sw, 3), [round(r[0], 3), round(r[1], 4), r[2], r[3]], file=sys.stderr)
    if os.environ.get("BENCH_DEBUG"):
        for (t_sw, rel) in switched:
            print(name, "switch", round(t_sw, 3), rel, file=sys.stderr)
        for r in recs:
            if not (200 <= r[2] < 300):
                print(name, "failed", [round(r[0], 3), round(r[1], 4), r[2], r[3]], file=sys.stderr)
        for (t_sw, rel) in switched:
            for r in recs:
                if t_sw - 0.3 <= r[0] < t_sw + 0.5:
                    print(name, "near", rel, [round(r[0], 3), round(r[1], 4), r[2], r[3]], file=sys.stderr)
    lat = sorted(r[1] for r in recs if 200 <= r[2] < 300)
    # p99 in the windows around switches (ApplicationStart +- 1 s) against the rest
    near = [r[1] for r in recs if any(abs(r[0] - t) < 1.0 for (t, _) in switched) and 200 <= r[2] < 300]
    far = [r[1] for r in recs if all(abs(r[0] - t) >= 1.0 for (t, _) in switched) and 200 <= r[2] < 300]
    p = lambda xs, q: sorted(xs)[max(0, int(len(xs) * q) - 1)] * 1000 if xs else float("nan")
    dur = max(r[0] for r in recs) if recs else 0
    return {
        "name": name, "requests": len(recs), "failed": failed, "stale": stale,
        "rps": len(recs) / dur if dur else 0, "p99_ms": p(lat, 0.99),
        "p99_switch_ms": p(near, 0.99), "p99_steady_ms": p(far, 0.99),
        "validate_ms": [round((t1 - t0) * 1000) for (t0, t1, ev, _) in events if ev == "ValidateService"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--deploys", type=int, default=10)
    ap.add_argument("--rate", type=int, default=200, help="requests per second (bounded)")
    ap.add_argument("--max-seconds", type=float, default=900, help="hard bound on the load's duration")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between deploys")
    ap.add_argument("--tutorial-sleep", type=float, default=30.0, help="the tutorial's `sleep 30`")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.deploys, a.tutorial_sleep, a.max_seconds, a.rate = 2, 1.0, 120, 100
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bgagent-zd-", dir="/var/tmp"))
    results = {}
    all_rows, all_events = [], []
    try:
        for name, fn in [("bgagent", run_bgagent), ("tutorial", run_baseline)]:
            recs, events, switched = fn(a, work)
            results[name] = analyse(name, recs, events, switched)
            all_rows += series(recs, events, name)
            all_events += [(round(t0, 2), name, ev) for (t0, _, ev, _) in events]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_csv(out / "zero_downtime_series.csv", "t_seconds,rps,errors,p99_ms,label", all_rows)
    write_csv(out / "zero_downtime_events.csv", "t_seconds,label,event", all_events)
    (out / "zero_downtime.json").write_text(json.dumps(results, indent=2))
    run_plot(str(REPO / "bench/plot.py"), str(out / "zero_downtime_series.csv"),
             str(out / "zero_downtime_events.csv"), str(out / "zero_downtime.png"))
    print(f"## Zero downtime: {a.deploys} in-place deploys each under {a.rate} req/s\n")
    rows = []
    for r in (results["bgagent"], results["tutorial"]):
        v = statistics.median(r["validate_ms"]) if r["validate_ms"] else float("nan")
        rows.append([r["name"], r["requests"], r["failed"], r["stale"], f"{r['p99_ms']:.1f}",
                     f"{r['p99_switch_ms']:.1f}", f"{r['p99_steady_ms']:.1f}", f"{v:.0f}"])
    print(markdown_table(["", "requests", "failed", "stale after ApplicationStart", "p99 ms (all)",
                          "p99 ms near switch", "p99 ms steady", "ValidateService ms (median)"], rows, "lrrrrrrr"))
    print(f"\nPlot: {out / 'zero_downtime.png'}")


if __name__ == "__main__":
    main()
