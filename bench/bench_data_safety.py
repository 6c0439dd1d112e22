#!/usr/bin/env python3
"""Time the data-safety steps add to a deployment (issue 5), with 1 node and with 8.

Starts Redis and MariaDB privately on 127.0.0.1, runs N bgagent daemons (separate roots,
sockets and readiness ports), and times AfterInstall for the whole fleet (all nodes start
together; the fleet is done when the last node returns), in two configurations measured
side by side:
  plain:  release intake and env.php rendering only
  safe:   the same plus the cache generation agreed through Redis (SET NX, one FLUSHDB per
          generation) and a migration run once per deployment under a MySQL named lock
          (the migration itself is `true`, so only bgagent's overhead is measured)

    python3 bench/bench_data_safety.py [--deploys 5] [--nodes 1 8]
"""
import argparse
import os
import socket
import statistics
import subprocess
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


def wait_port(port):
    for _ in range(1000):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing on {port}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--deploys", type=int, default=5)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bgagent-ds-", dir="/var/tmp"))
    rp, dp = free_port(), free_port()
    subprocess.run(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--daemonize", "yes", "--dir", str(work), "--pidfile", str(work / "redis.pid"),
                    "--logfile", str(work / "redis.log")], check=True)
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={work}/db", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)
    db = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={work}/db", f"--socket={work}/mysqld.sock",
                           f"--port={dp}", "--bind-address=127.0.0.1", f"--log-error={work}/mariadb.err", "--user=root",
                           "--skip-name-resolve", "--innodb-buffer-pool-size=64M"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    wait_port(rp)
    wait_port(dp)
    subprocess.run(["mariadb", "--no-defaults", f"--socket={work}/mysqld.sock", "-uroot", "-e",
                    "CREATE DATABASE app; CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'apppass'; "
                    "GRANT ALL ON *.* TO 'app'@'127.0.0.1';"], check=True)
    results = {}
    try:
        for n in a.nodes:
            for mode in ["plain", "safe"]:
                base = work / f"{mode}-{n}"
                daemons = []
                dirs = []
                for i in range(n):
                    d = base / f"node{i}"
                    d.mkdir(parents=True)
                    (d / "params.yaml").write_text(f"db: {{ host: 127.0.0.1, port: {dp}, password: apppass }}\nsecure: [db.password]\n")
                    (d / "env.php.j2").write_text("<?php return [{{ params.db.host }}, {{ deploy.cache.default_db }}];\n")
                    extra = ""
                    if mode == "safe":
                        extra = (f"cache: {{ redis: \"redis://127.0.0.1:{rp}\", node: n{i} }}\n"
                                 f"schema:\n  database: {{ host: 127.0.0.1, port: {dp}, user: app, database: app, password_param: db.password }}\n"
                                 f"  migration: {{ argv: [\"true\"] }}\n")
                    (d / "bgagent.yaml").write_text(
                        "app_root: app\nstate_dir: state\nsocket: { path: run/s.sock, group: null }\n"
                        "codedeploy: { deployment_root: ../cd-root }\napp: { kind: php, name: " + f"bench{n}" + " }\n"
                        "release: { shared_paths: [] }\nparams: { source: file, path: params.yaml }\n"
                        "templates: [ { source: env.php.j2, target: app/etc/env.php, check: [] } ]\n" + extra)
                    daemons.append(subprocess.Popen([a.bin, "--config", str(d / "bgagent.yaml"), "daemon"],
                                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL))
                    dirs.append(d)
                for d in dirs:
                    while not (d / "run/s.sock").exists():
                        time.sleep(0.02)
                times = []
                for k in range(a.deploys):
                    dep = f"d-{mode}-{n}-{k}"
                    rev = base / "cd-root/g" / dep / "deployment-archive/pub"
                    rev.mkdir(parents=True)
                    (rev / "index.php").write_text("<?php echo 1;")
                    barrier = threading.Barrier(n)
                    ends = [0.0] * n
                    codes = [0] * n

                    def run(i):
                        env = dict(os.environ, DEPLOYMENT_ID=dep, DEPLOYMENT_GROUP_ID="g", APPLICATION_NAME="b")
                        barrier.wait()
                        r = subprocess.run([a.bin, "--config", str(dirs[i] / "bgagent.yaml"), "hook", "AfterInstall"],
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                        ends[i] = time.perf_counter()
                        codes[i] = r.returncode
                        if r.returncode:
                            print(r.stdout[-1500:])

                    t0 = time.perf_counter()
                    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    assert not any(codes), "a node failed"
                    times.append(max(ends) - t0)
                results[(n, mode)] = statistics.median(times)
                for p in daemons:
                    p.terminate()
                    p.wait()
    finally:
        db.terminate()
        db.wait()
        subprocess.run(["sh", "-c", f"kill $(cat {work}/redis.pid)"], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"## Data-safety overhead: fleet AfterInstall, median of {a.deploys} deployments\n")
    print("| nodes | plain ms | with cache generation + once-per-fleet migration ms | added ms |")
    print("|---:|---:|---:|---:|")
    for n in a.nodes:
        p, s = results[(n, "plain")] * 1000, results[(n, "safe")] * 1000
        print(f"| {n} | {p:.0f} | {s:.0f} | {s - p:.0f} |")


if __name__ == "__main__":
    main()
