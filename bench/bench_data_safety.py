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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, MariaDb, Redis, markdown_table, run_at_once, run_hook, start_daemon, stop_daemon  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--deploys", type=int, default=5)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bgagent-ds-", dir="/var/tmp"))
    redis, db = Redis(work / "redis"), MariaDb(work / "mariadb")
    rp, dp = redis.port, db.port
    db.sql("CREATE DATABASE app; CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'apppass'; "
           "GRANT ALL ON *.* TO 'app'@'127.0.0.1';")
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
                    daemons.append(start_daemon(a.bin, d / "bgagent.yaml", d / "run/s.sock", timeout=30))
                    dirs.append(d)
                times = []
                for k in range(a.deploys):
                    dep = f"d-{mode}-{n}-{k}"
                    rev = base / "cd-root/g" / dep / "deployment-archive/pub"
                    rev.mkdir(parents=True)
                    (rev / "index.php").write_text("<?php echo 1;")

                    def after_install(i):
                        run_hook(a.bin, dirs[i] / "bgagent.yaml", "AfterInstall", dep, app="b")

                    times.append(run_at_once(n, after_install))
                results[(n, mode)] = statistics.median(times)
                for p in daemons:
                    stop_daemon(p)
    finally:
        db.stop()
        redis.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"## Data-safety overhead: fleet AfterInstall, median of {a.deploys} deployments\n")
    rows = []
    for n in a.nodes:
        p, s = results[(n, "plain")] * 1000, results[(n, "safe")] * 1000
        rows.append([n, f"{p:.0f}", f"{s:.0f}", f"{s - p:.0f}"])
    print(markdown_table(["nodes", "plain ms", "with cache generation + once-per-fleet migration ms", "added ms"],
                         rows, "rrrr"))


if __name__ == "__main__":
    main()
