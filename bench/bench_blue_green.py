#!/usr/bin/env python3
"""Blue/green end to end under load (issue 11): the figures of tests/blue_green_real.rs.

Runs that test's scenario (two fleets of one node each, blue and green, behind HAProxy as
the ALB; CodeDeploy's in-place, blue/green, blue/green rollback and failed-ValidateService
orders through `bgagent hook`; a daemon restart; a bounded constant-rate client through
HAProxy for the whole run) with BGAGENT_BG_OUT set, so the test writes every request (which
node and release answered, status, latency), every change of each node's /ready and every
event. This script turns them into a summary, time series and a plot:

    python3 bench/bench_blue_green.py                   # the test's scenario, 200 req/s
    python3 bench/bench_blue_green.py --packaged-times  # the packaged health startup budget
                                                        # (30 s); the drain is packaged either way
    python3 bench/bench_blue_green.py --smoke           # the blue/green deployment only (CI)

Writes NAME_{summary.json,series.csv,events.csv,ready.csv} and NAME.png into --out, NAME being
blue_green (blue_green_packaged with --packaged-times); --keep-requests: every request too,
NAME_requests.csv.gz. Exits non-zero when the test failed (the records and the plot are
still written: they show what went wrong).
"""

import argparse
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, read_csv, run_plot  # noqa: E402

TEST = "blue_green_in_codedeploys_orders_under_load_serves_every_request_from_a_ready_node"


def run_test(a, raw: Path) -> int:
    env = dict(os.environ, BGAGENT_BG_OUT=str(raw), BGAGENT_BG_RATE=str(a.rate))
    if a.packaged_times:
        env["BGAGENT_BG_PACKAGED_TIMES"] = "1"
    if a.smoke:
        env["BGAGENT_BG_SMOKE"] = "1"
    cmd = ["cargo", "test", "--test", "blue_green_real"]
    if a.release:
        cmd.append("--release")
    cmd += ["--", "--exact", TEST, "--nocapture"]
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def load(raw: Path):
    reqs = [
        dict(t=float(r["t"]), ms=float(r["took_ms"]), status=int(r["status"]), node=r["node"], release=r["release"])
        for r in read_csv(raw / "requests.csv")
    ]
    ready = defaultdict(list)
    for r in read_csv(raw / "ready.csv"):
        ready[r["node"]].append((float(r["t"]), int(r["ready"])))
    events = [
        dict(start=float(e["start"]), end=float(e["end"]), node=e["node"], event=e["event"],
             deployment=e["deployment"], exit=int(e["exit"]))
        for e in read_csv(raw / "events.csv")
    ]
    return reqs, dict(ready), events


def ready_at(changes, t):
    """(since when, code) of /ready at t: since when it has not said 200 if it does not."""
    code = None
    for (tc, c) in changes:
        if tc > t:
            break
        if code is None or c == 200 or code[1] == 200:
            code = (tc, c)
    return code


def pct(xs, q):
    xs = sorted(xs)
    return xs[max(0, int(round(len(xs) * q)) - 1)] if xs else float("nan")


def analyse(reqs, ready, events, probe_ms):
    ok = [r for r in reqs if 200 <= r["status"] < 300]
    failed = [r for r in reqs if not (200 <= r["status"] < 300)]
    span = (reqs[-1]["t"] - reqs[0]["t"]) if reqs else 0.0
    # How long after a node's /ready stopped saying 200 it still answered requests (sent then).
    lags = []
    for r in reqs:
        got = ready_at(ready.get(r["node"], []), r["t"])
        if got and got[1] != 200:
            lags.append((r["t"] - got[0]) * 1000)
    late = [x for x in lags if x > probe_ms]
    durations = defaultdict(list)
    for e in events:
        durations[e["event"]].append((e["end"] - e["start"]) * 1000)
    return {
        "requests": len(reqs),
        "seconds": round(span, 1),
        "rate": round(len(reqs) / span, 1) if span else 0,
        "failed": len(failed),
        "failed_first": failed[:10],
        "answered_by": dict(Counter(r["node"] for r in reqs)),
        "answered_by_release": {f"{k[0]} {k[1]}": v for k, v in sorted(Counter((r["node"], r["release"]) for r in ok).items())},
        "answered_after_ready_503": len(lags),
        "answered_after_ready_503_max_ms": round(max(lags), 1) if lags else 0,
        "answered_past_probe_interval": len(late),
        "latency_ms": {"p50": pct([r["ms"] for r in ok], 0.5), "p99": pct([r["ms"] for r in ok], 0.99),
                       "max": max((r["ms"] for r in ok), default=0)},
        "event_ms": {k: {"n": len(v), "median": round(pct(v, 0.5)), "max": round(max(v))} for k, v in durations.items()},
        "events": events,
    }


def series(reqs, bucket):
    rows = []
    if not reqs:
        return rows
    end = reqs[-1]["t"]
    t = reqs[0]["t"] - reqs[0]["t"] % bucket
    i = 0
    while t < end:
        b = []
        while i < len(reqs) and reqs[i]["t"] < t + bucket:
            b.append(reqs[i])
            i += 1
        by = Counter(r["node"] for r in b if 200 <= r["status"] < 300)
        lat = [r["ms"] for r in b if 200 <= r["status"] < 300]
        rows.append(dict(t=round(t, 2), blue=by["blue"] / bucket, green=by["green"] / bucket,
                         failed=sum(1 for r in b if not (200 <= r["status"] < 300)),
                         p99_ms=round(pct(lat, 0.99), 2) if lat else 0))
        t += bucket
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=200, help="requests per second through HAProxy")
    ap.add_argument("--packaged-times", action="store_true",
                    help="keep packaging/bgagent.yaml's health startup budget (the drain is packaged either way)")
    ap.add_argument("--release", action="store_true", help="cargo test --release")
    ap.add_argument("--smoke", action="store_true", help="the blue/green deployment only, 50 req/s")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--keep-requests", action="store_true", help="also write every request (blue_green_requests.csv.gz)")
    ap.add_argument("--records", help="summarise and plot records a run already wrote (BGAGENT_BG_OUT)")
    a = ap.parse_args()
    if a.smoke:
        a.rate = 50
    out = Path(a.out)
    name = "blue_green_packaged" if a.packaged_times else "blue_green"
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(a.records) if a.records else Path(tempfile.mkdtemp(prefix="bgagent-bg-"))
    try:
        rc = run_test(a, raw) if not a.records else 0
        if not (raw / "requests.csv").exists():
            raise SystemExit(f"the test wrote no records (exit {rc})")
        reqs, ready, events = load(raw)
        if a.keep_requests:
            with open(raw / "requests.csv", "rb") as f, gzip.open(out / f"{name}_requests.csv.gz", "wb") as g:
                shutil.copyfileobj(f, g)
        shutil.copy(raw / "ready.csv", out / f"{name}_ready.csv")
        shutil.copy(raw / "events.csv", out / f"{name}_events.csv")
    finally:
        if not a.records:
            shutil.rmtree(raw, ignore_errors=True)
    s = analyse(reqs, ready, events, probe_ms=100)
    s["test_exit"] = rc
    s["packaged_times"] = a.packaged_times
    (out / f"{name}_summary.json").write_text(json.dumps(s, indent=2))
    rows = series(reqs, 0.5)
    with open(out / f"{name}_series.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=["t", "blue", "green", "failed", "p99_ms"])
        w.writeheader()
        w.writerows(rows)
    title = (f"blue/green through HAProxy, {a.rate} req/s"
             + (", packaged startup budget" if a.packaged_times else ""))
    run_plot(str(REPO / "bench/plot_blue_green.py"), str(out), name, title)

    print(f"## Blue/green end to end: {s['requests']} requests in {s['seconds']} s ({s['rate']}/s)\n")
    lat = s["latency_ms"]
    print(markdown_table(["requests", "failed", "answered after /ready 503 (any)", "max ms after /ready 503",
                          "past the 100 ms probe interval", "p50 ms", "p99 ms"],
                         [[s["requests"], s["failed"], s["answered_after_ready_503"], s["answered_after_ready_503_max_ms"],
                           s["answered_past_probe_interval"], f"{lat['p50']:.1f}", f"{lat['p99']:.1f}"]], "rrrrrrr"))
    print("\nAnswered by node and release: " + ", ".join(f"{k}: {v}" for k, v in s["answered_by_release"].items()))
    print("\n" + markdown_table(["event", "runs", "median ms", "max ms"],
                                [[k, v["n"], v["median"], v["max"]] for k, v in s["event_ms"].items()], "lrrr"))
    print(f"\nPlot: {out / (name + '.png')}")
    sys.exit(rc)


if __name__ == "__main__":
    main()
