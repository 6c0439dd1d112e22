#!/usr/bin/env python3
"""Flushing a large cache slot on a fleet (issue 16): what sessions see and what it adds.

Starts Redis privately on 127.0.0.1 (no persistence, DEBUG POPULATE enabled) and N bgagent
daemons (separate roots, sockets and readiness ports), and times the fleet's AfterInstall
(all nodes released at once; done when the last node returns) while a prober sends GET to
the session database over one connection as fast as it answers. Measured side by side in
one run, each case with a fresh application name so the deployment takes slot 0:
  empty:   slot 0's two databases are empty
  large:   slot 0's two databases hold --keys keys each (DEBUG POPULATE, 64-byte values)
  blocking reference: the same large databases flushed with plain FLUSHDB (what bgagent did
           before issue 16), no deployment: how long sessions stall behind it

    python3 bench/bench_flush.py [--keys 2000000] [--nodes 4] [--runs 3]
"""
import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Redis, free_port, markdown_table, run_at_once, run_hook, start_daemon,  # noqa: E402
                    stop_daemon)


class Resp:
    """A bare RESP client: enough for GET/SELECT/DEBUG, one command at a time."""

    def __init__(self, port, db):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")
        self.cmd("SELECT", str(db))

    def cmd(self, *args):
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            out += b"$" + str(len(b)).encode() + b"\r\n" + b + b"\r\n"
        self.s.sendall(out)
        return self.read()

    def read(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t in (b"+", b":"):
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if t == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")


class Prober(threading.Thread):
    """GETs a session key in a loop; records each round trip's latency in ms."""

    def __init__(self, port, db):
        super().__init__(daemon=True)
        self.c = Resp(port, db)
        self.c.cmd("SET", "PHPREDIS_SESSION:bench", "x" * 200)
        self.samples = []
        self.on = False
        self.stop = False

    def run(self):
        while not self.stop:
            t0 = time.perf_counter()
            self.c.cmd("GET", "PHPREDIS_SESSION:bench")
            ms = (time.perf_counter() - t0) * 1000
            if self.on:
                self.samples.append(ms)


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p / 100))] if v else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--keys", type=int, default=2_000_000, help="keys per database of the slot")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bgagent-flush-", dir="/var/tmp"))
    redis = Redis(work / "redis", "--enable-debug-command", "yes")
    rp = redis.port
    admin = Resp(rp, 0)
    prober = Prober(rp, 2)
    prober.start()
    rows = {"empty": [], "large": []}
    lat = {"empty": [], "large": [], "blocking": []}
    blocking_ms = []
    daemons = []
    try:
        dirs = []
        for i in range(a.nodes):
            d = work / f"node{i}"
            d.mkdir(parents=True)
            (d / "env.php.j2").write_text("<?php return [{{ deploy.cache.default_db }}];\n")
            dirs.append(d)

        def configure(app):
            for p in daemons:
                stop_daemon(p)
            daemons.clear()
            for i, d in enumerate(dirs):
                sock = d / "run/s.sock"
                if sock.exists():
                    sock.unlink()
                (d / "bgagent.yaml").write_text(
                    "app_root: app\nstate_dir: state\nsocket: { path: run/s.sock, group: null }\n"
                    "codedeploy: { deployment_root: ../cd-root }\n"
                    f"app: {{ kind: php, name: {app} }}\nrelease: {{ shared_paths: [] }}\n"
                    "templates: [ { source: env.php.j2, target: app/etc/env.php, check: [] } ]\n"
                    f"cache: {{ redis: \"redis://127.0.0.1:{rp}\", node: n{i} }}\n"
                    f"readiness: {{ listen: \"127.0.0.1:{free_port()}\" }}\n")
                daemons.append(start_daemon(a.bin, d / "bgagent.yaml", sock, timeout=30))

        def hook(i, ev, dep):
            run_hook(a.bin, dirs[i] / "bgagent.yaml", ev, dep, app="b")

        def fill():
            for db in (0, 1):
                admin.cmd("SELECT", str(db))
                admin.cmd("DEBUG", "POPULATE", str(a.keys), "magento_cache", "64")

        for run in range(a.runs):
            for case in ("empty", "large"):
                app = f"b{run}{case}"
                configure(app)
                for db in (0, 1):
                    admin.cmd("SELECT", str(db))
                    admin.cmd("FLUSHDB")
                if case == "large":
                    fill()
                dep = f"d-{app}"
                rev = work / "cd-root/g" / dep / "deployment-archive/pub"
                rev.mkdir(parents=True)
                (rev / "index.php").write_text("<?php echo 1;")
                for i in range(a.nodes):
                    hook(i, "BeforeInstall", dep)
                prober.samples = []
                prober.on = True
                took = run_at_once(a.nodes, lambda i: hook(i, "AfterInstall", dep))
                prober.on = False
                rows[case].append(took * 1000)
                lat[case].extend(prober.samples)
            # the blocking reference
            fill()
            prober.samples = []
            prober.on = True
            t0 = time.perf_counter()
            for db in (0, 1):
                admin.cmd("SELECT", str(db))
                admin.cmd("FLUSHDB")
            blocking_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
            prober.on = False
            lat["blocking"].extend(prober.samples)
    finally:
        prober.stop = True
        for p in daemons:
            stop_daemon(p)
        redis.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"## Large slot flush: {a.nodes} nodes, {a.keys:,} keys in each of the slot's 2 databases, "
          f"median of {a.runs} runs\n")
    table = []
    for case, label in (("empty", "empty slot"), ("large", "large slot, FLUSHDB ASYNC (bgagent)")):
        v = lat[case]
        table.append([label, f"{statistics.median(rows[case]):.0f}", f"{pct(v, 50):.2f}", f"{pct(v, 99):.2f}",
                      f"{max(v) if v else 0:.1f}", len(v)])
    v = lat["blocking"]
    table.append(["reference: plain FLUSHDB of the same databases (no deployment)",
                  f"{statistics.median(blocking_ms):.0f} (the two flushes)", f"{pct(v, 50):.2f}", f"{pct(v, 99):.2f}",
                  f"{max(v) if v else 0:.1f}", len(v)])
    print(markdown_table(["case", "fleet AfterInstall ms", "session GET p50 ms", "p99 ms", "max ms", "GETs answered"],
                         table, "lrrrrr"))
    print(f"\nAdded deploy time for the large slot: "
          f"{statistics.median(rows['large']) - statistics.median(rows['empty']):.0f} ms (median large - median empty).")


if __name__ == "__main__":
    main()
