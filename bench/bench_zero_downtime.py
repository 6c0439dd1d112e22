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
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=10):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def fpm_bin():
    for b in ["/usr/sbin/php-fpm8.2", "/usr/sbin/php-fpm"]:
        if os.path.exists(b):
            return b
    raise SystemExit("php-fpm not installed: run scripts/install-test-deps.sh")


class Web:
    def __init__(self, d: Path, docroot: str):
        self.d = d
        for s in ["run", "logs", "tmp"]:
            (d / s).mkdir(parents=True, exist_ok=True)
        (d / "php-fpm.conf").write_text(
            f"[global]\npid = {d}/run/php-fpm.pid\nerror_log = {d}/logs/php-fpm.log\ndaemonize = yes\n"
            f"process_control_timeout = 10s\n[www]\nuser = root\nlisten = {d}/run/php-fpm.sock\nlisten.mode = 0666\n"
            "pm = static\npm.max_children = 8\n")
        self.port = free_port()
        (d / "nginx.conf").write_text(
            f"user root; worker_processes 2; pid {d}/run/nginx.pid; error_log {d}/logs/nginx.err warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n"
            f"fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n"
            f"server {{ listen 127.0.0.1:{self.port}; root {docroot}; index index.php;\n"
            "location / { try_files $uri /index.php$is_args$args; }\n"
            "location ~ \\.php$ { include /etc/nginx/fastcgi_params;\n"
            "fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;\n"
            "fastcgi_param DOCUMENT_ROOT $realpath_root;\n"
            f"fastcgi_pass unix:{d}/run/php-fpm.sock; }} }} }}\n")
        self.nginx = ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/nginx.err")]
        self.fpm = [fpm_bin(), "-R", "-y", str(d / "php-fpm.conf")]

    def start(self):
        subprocess.run(self.fpm, check=True)
        subprocess.run(self.nginx, check=True)
        wait_port(self.port)

    def stop(self):
        for pid_file in ["run/nginx.pid", "run/php-fpm.pid"]:
            try:
                os.kill(int((self.d / pid_file).read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(0.3)


class Load:
    """A bounded constant-rate client: --rate requests per second for at most --max seconds."""

    def __init__(self, port, rate, max_seconds, workers=8):
        self.port, self.rate, self.max = port, rate, max_seconds
        self.records = []  # (t_start, latency_s, status or 0, release or error)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers = workers
        self.t0 = None

    def run(self):
        self.t0 = time.perf_counter()
        interval = self.workers / self.rate
        threads = [threading.Thread(target=self.worker, args=(i * interval / self.workers, interval)) for i in range(self.workers)]
        for t in threads:
            t.start()
        self.threads = threads

    def worker(self, offset, interval):
        nxt = self.t0 + offset
        conn = None
        while not self.stop.is_set() and time.perf_counter() - self.t0 < self.max:
            now = time.perf_counter()
            if now < nxt:
                time.sleep(nxt - now)
            nxt += interval
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/", headers={"Connection": "keep-alive"})
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                rel = body.strip().split("release=")[-1] if "release=" in body else ""
                rec = (start - self.t0, time.perf_counter() - start, r.status, rel)
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # socket errors count as failures
                rec = (start - self.t0, time.perf_counter() - start, 0, type(e).__name__)
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.records.append(rec)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        return sorted(self.records)

    def now(self):
        return time.perf_counter() - self.t0


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
    hp = web.port
    ready = free_port()
    cfg.write_text(f"""app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: bench }}
release: {{ keep: 3, shared_paths: [] }}
services:
  backend: exec
  list:
    - {{ name: php-fpm, kind: php-fpm, test: [{web.fpm[0]}, -t, -R, -y, {web.d}/php-fpm.conf], reload: [kill, -USR2, "{{pid}}"], pid_file: {web.d}/run/php-fpm.pid, config_file: {web.d}/php-fpm.conf }}
    - {{ name: nginx, kind: nginx, test: [nginx, -t, -q, -p, {web.d}, -c, {web.d}/nginx.conf, -e, {web.d}/logs/nginx.err], reload: [nginx, -p, {web.d}, -c, {web.d}/nginx.conf, -e, {web.d}/logs/nginx.err, -s, reload] }}
health:
  checks: [ {{ name: app, http: {{ url: "http://127.0.0.1:{hp}/health.php", body_contains: OK }} }} ]
  period: 50ms
  success_threshold: 2
readiness: {{ listen: "127.0.0.1:{ready}" }}
""")
    daemon = subprocess.Popen([a.bin, "--config", str(cfg), "daemon"], stdin=subprocess.DEVNULL,
                              stdout=open(root / "daemon.log", "w"), stderr=subprocess.STDOUT)
    sock = root / "run/bgagent.sock"
    for _ in range(500):
        if sock.exists():
            break
        time.sleep(0.02)

    def hook(ev, dep):
        env = dict(os.environ, DEPLOYMENT_ID=dep, DEPLOYMENT_GROUP_ID="g", APPLICATION_NAME="bench")
        r = subprocess.run([a.bin, "--config", str(cfg), "hook", ev], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bgagent hook {ev} failed:\n{r.stdout[-2000:]}")
        return r

    def deploy(n):
        dep = f"d-{n}"
        make_release(root / "cd-root/g" / dep / "deployment-archive", f"r{n}")
        marks = []
        for ev in ["ApplicationStop", "BeforeInstall", "AfterInstall", "ApplicationStart", "ValidateService",
                   "BeforeAllowTraffic", "AfterAllowTraffic"]:
            if ev == "ApplicationStop" and n == 0:
                continue
            t_ev = load.now() if load else 0
            hook(ev, dep)
            marks.append((t_ev, load.now() if load else 0, ev))
        return marks

    load = None
    web.start()
    try:
        deploy(0)  # initial release before the load starts
        load = Load(web.port, a.rate, a.max_seconds)
        load.run()
        time.sleep(a.settle)
        events, switched, healthy = [], [], []
        for n in range(1, a.deploys + 1):
            for (t0, t1, ev) in deploy(n):
                events.append((t0, t1, ev, f"r{n}"))
                if ev == "ApplicationStart":
                    switched.append((t1, f"r{n}"))
            time.sleep(a.settle)
        recs = load.finish()
    finally:
        daemon.terminate()
        daemon.wait()
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
        load.run()
        time.sleep(a.settle)
        events, switched = [], []
        for n in range(1, a.deploys + 1):
            for (t0, t1, ev) in deploy(n):
                events.append((t0, t1, ev, f"r{n}"))
                if ev == "ApplicationStart":
                    switched.append((t1, f"r{n}"))
            time.sleep(a.settle)
        recs = load.finish()
    finally:
        web.stop()
    return recs, events, switched


def rnum(rel):
    try:
        return int(rel.lstrip("r"))
    except ValueError:
        return -1


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
            if t_sw <= r[0] < end and 200 <= r[2] < 300 and rnum(r[3]) < rnum(rel):
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
    with open(out / "zero_downtime_series.csv", "w") as f:
        f.write("t_seconds,rps,errors,p99_ms,label\n")
        for r in all_rows:
            f.write(",".join(str(x) for x in r) + "\n")
    with open(out / "zero_downtime_events.csv", "w") as f:
        f.write("t_seconds,label,event\n")
        for r in all_events:
            f.write(",".join(str(x) for x in r) + "\n")
    (out / "zero_downtime.json").write_text(json.dumps(results, indent=2))
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # Debian's matplotlib
    subprocess.run([py, str(REPO / "bench/plot.py"), str(out / "zero_downtime_series.csv"),
                    str(out / "zero_downtime_events.csv"), str(out / "zero_downtime.png")], check=False)
    b, t = results["bgagent"], results["tutorial"]
    print(f"## Zero downtime: {a.deploys} in-place deploys each under {a.rate} req/s\n")
    print("| | requests | failed | stale after ApplicationStart | p99 ms (all) | p99 ms near switch | p99 ms steady | ValidateService ms (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in (b, t):
        v = statistics.median(r["validate_ms"]) if r["validate_ms"] else float("nan")
        print(f"| {r['name']} | {r['requests']} | {r['failed']} | {r['stale']} | {r['p99_ms']:.1f} | "
              f"{r['p99_switch_ms']:.1f} | {r['p99_steady_ms']:.1f} | {v:.0f} |")
    print(f"\nPlot: {out / 'zero_downtime.png'}")


if __name__ == "__main__":
    main()
