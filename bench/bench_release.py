#!/usr/bin/env python3
"""Release-build benchmarks for bgagent (issue 2), measured side by side in one run.

(a) Building a release from an unpacked CodeDeploy deployment-archive, ownership and modes
    included: bgagent (through the daemon: `bgagent hook AfterInstall`) against the tutorial
    way (`cp -r`, `chown -R`, `chmod -R 755`) and against the floor `cp -al`.
(b) `bgagent deploy release.tar.gz` against `tar -xzf` of the same file alone.
(c) The `hook` round trip for an event with nothing to do (median of many).
(d) The daemon's idle resident memory.

Each contender runs --rounds times, interleaved; medians are reported and ratios are computed
from them. Before each timed contender the disk is synced (so no contender pays for another's
writeback) and its input is read once (a warm page cache, as right after CodeDeploy unpacked
the revision). Nothing is deleted until the end of the run: on ext4 without a journal (this
project's machines), inodes freed in the last minute are skipped one by one when new inodes
are allocated, which made whoever ran after an `rm -rf` of 100,000 files several times slower.
Results go to stdout as Markdown and to --json. Run as root for the ownership part (chown to
--owner/--group).

    python3 bench/bench_release.py                 # full: 100k files, ~1 GB
    python3 bench/bench_release.py --smoke         # CI: 5k files, ~50 MB, 1 round
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
from common import (REPO, gen_magento_tree, hook_command, markdown_table, settle, start_daemon,  # noqa: E402
                    stop_daemon)


def run(argv, **kw):
    return subprocess.run(argv, check=True, **kw)


def timed(argv, env=None):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def tutorial(src, dest, owner, group):
    """The seed article's procedure: the agent copies the revision over the web root (`files:`
    in appspec.yml; `cp -r` stands in for the agent's own copy, which is slower), then
    scripts/after_install.sh as the article gives it."""
    run(["cp", "-r", str(src), str(dest)])
    if owner:
        run(["chown", "-R", f"{owner}:{group}", str(dest)])
    run(["chmod", "-R", "755", str(dest)])
    for d in ("generated/code", "generated/metadata", "generated/session"):
        run(["mkdir", "-p", str(dest / d)])
    if owner:
        run(["chown", "-R", f"{owner}:{group}", str(dest / "generated")])
        run(["chown", "-R", f"{owner}:{group}", str(dest / "var")])


def rm(path):
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--total-bytes", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hook-rounds", type=int, default=200)
    ap.add_argument("--owner", default="www-data")
    ap.add_argument("--group", default="www-data")
    ap.add_argument("--smoke", action="store_true", help="small tree, one round (for CI)")
    ap.add_argument("--settle", type=float, default=370.0,
                    help="seconds to wait after removing an earlier run's outputs, past ext4's "
                         "recently-deleted inode window (60 s, or 360 s while the inode table "
                         "block is dirty)")
    ap.add_argument("--json", default=None, help="write the raw results here")
    a = ap.parse_args()
    if a.smoke:
        a.files, a.total_bytes, a.rounds, a.hook_rounds, a.settle = 5000, "50M", 1, 30, 0.0
    if os.geteuid() != 0:
        a.owner = a.group = None
    bgagent = Path(a.bin)
    if not bgagent.exists():
        raise SystemExit(f"{bgagent} not found: build it first with `cargo build --release`")

    work = Path(a.work or tempfile.mkdtemp(prefix="bgagent-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "cd-root" / "g-bench" / "d-0" / "deployment-archive"
    tgz = work / "release.tar.gz"
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        gen_magento_tree(src, a.files, a.total_bytes, seed=1, tar_gz=tgz)
    nfiles = sum(len(f) for _, _, f in os.walk(src))
    nbytes = sum(os.lstat(os.path.join(d, x)).st_size for d, _, fs in os.walk(src) for x in fs)
    # Outputs are kept until the end (see above): three trees of the release's size a round.
    need = 3 * a.rounds * nbytes + 2**30
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, this run needs about "
                         f"{need / 2**30:.1f} GiB (use --rounds or --total-bytes to shrink it)")

    perms = ""
    if a.owner:
        perms = f"  owner: {a.owner}\n  group: {a.group}\n"
    cfg = work / "bgagent.yaml"
    cfg.write_text(
        "app_root: app\nstate_dir: state\nsocket:\n  path: run/bgagent.sock\n  group: null\n"
        "codedeploy:\n  deployment_root: cd-root\napp:\n  kind: magento\n"
        f"release:\n  keep: {a.rounds + 2}\n  shared_paths: []\n"
        f"permissions:\n{perms}"
    )
    daemon = start_daemon(bgagent, cfg, work / "run/bgagent.sock", work / "daemon.log")
    results = {"files": nfiles, "bytes": nbytes, "rounds": a.rounds, "owner": a.owner}
    try:
        time.sleep(0.3)
        results["daemon_idle_rss_kib"] = rss_kib(daemon.pid)

        def hook(event, dep):
            return hook_command(bgagent, cfg, event, dep, group="g-bench", lifecycle_event=True)

        # Outputs of earlier runs are gone; let their freed inodes age out once.
        olds = [work / o for o in ("tutorial", "cpal", "untar", "app-local", "state-local", "app/releases")]
        removed = [o for o in olds if os.path.lexists(o)]
        for old in removed:
            rm(old)
        marker = work / ".last-cleanup"
        since = time.time() - marker.stat().st_mtime if marker.exists() else float("inf")
        settle(wait=a.settle if removed else max(0.0, a.settle - since))
        times = {"bgagent": [], "tutorial": [], "cp_al": [], "bgagent_tgz": [], "tar_xzf": []}
        for r in range(a.rounds):
            # (a) bgagent: a fresh deployment id each round, the same revision directory
            dep = f"d-{r + 1}"
            dep_dir = src.parent.parent / dep
            rm(dep_dir)
            dep_dir.mkdir()
            os.rename(src.parent / "deployment-archive", dep_dir / "deployment-archive")
            src = dep_dir / "deployment-archive"
            # As CodeDeploy leaves it: root-owned, modes from the bundle. (Hard links share
            # inodes, so the previous round's policy must not carry over.)
            run(["chmod", "-R", "u=rwX,go=rX", str(src)])
            if a.owner:
                run(["chown", "-R", "root:root", str(src)])
            argv, env = hook("AfterInstall", dep)
            settle([src])
            times["bgagent"].append(timed(argv, env))

            dest = work / "tutorial" / str(r)
            dest.parent.mkdir(exist_ok=True)
            settle([src])
            t0 = time.perf_counter()
            tutorial(src, dest, a.owner, a.group)
            times["tutorial"].append(time.perf_counter() - t0)

            dest = work / "cpal" / str(r)
            dest.parent.mkdir(exist_ok=True)
            settle([src])
            times["cp_al"].append(timed(["cp", "-al", str(src), str(dest)]))

            # (b) archive intake against tar alone
            dest = work / "untar" / str(r)
            dest.mkdir(parents=True)
            settle([tgz])
            times["tar_xzf"].append(timed(["tar", "-xzf", str(tgz), "-C", str(dest)]))
            local = work / "local.yaml"
            local.write_text(cfg.read_text().replace("app_root: app", f"app_root: app-local/{r}")
                             .replace("state_dir: state", f"state_dir: state-local/{r}")
                             .replace("run/bgagent.sock", "run/none.sock"))
            settle([tgz])
            times["bgagent_tgz"].append(timed([str(bgagent), "--config", str(local), "deploy", str(tgz)]))

        # (c) hook round trip with nothing to do: AfterAllowTraffic of an unrelated deployment
        # that only records the node as live.
        rt = []
        for i in range(a.hook_rounds):
            argv, env = hook("BeforeAllowTraffic", "d-rt")
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rt.append(time.perf_counter() - t0)
        results["hook_round_trip_ms"] = {"median": statistics.median(rt) * 1000,
                                         "p90": sorted(rt)[int(len(rt) * 0.9)] * 1000}
        results["times_s"] = times
    finally:
        stop_daemon(daemon)
        for out in ("tutorial", "cpal", "untar", "app-local", "state-local"):
            rm(work / out)
        rm(work / "app/releases")
        (work / ".last-cleanup").touch()

    med = {k: statistics.median(v) for k, v in results["times_s"].items() if v}
    results["median_s"] = med
    ratio = lambda x, y: med[x] / med[y]
    if a.smoke:
        print(f"SMOKE RUN ({a.bin}, {nfiles} files, 1 round): this shows the benchmark runs end to end; "
              "its figures are not results (BENCHMARKS.md has those, from a release build on a full tree)")
    print(f"## Release build ({nfiles} files, {nbytes / 2**20:.0f} MiB, {a.rounds} rounds, "
          f"owner {a.owner or '(unchanged: not root)'})\n")
    print(markdown_table(["contender", "median s", "ratio"], [
        ["bgagent hook AfterInstall (policy + ownership)", f"{med['bgagent']:.3f}", "1.00"],
        ["tutorial (seed article): cp -r, chown -R, chmod -R 755, chown -R generated var", f"{med['tutorial']:.3f}",
         f"{ratio('tutorial', 'bgagent'):.2f}x slower"],
        ["floor: cp -al", f"{med['cp_al']:.3f}", f"bgagent is {ratio('bgagent', 'cp_al'):.2f}x of it"],
        ["bgagent deploy release.tar.gz", f"{med['bgagent_tgz']:.3f}", f"{ratio('bgagent_tgz', 'tar_xzf'):.2f}x of tar"],
        ["tar -xzf release.tar.gz", f"{med['tar_xzf']:.3f}", "1.00"],
    ], "lrr"))
    print(f"\nhook round trip (nothing to do): median {results['hook_round_trip_ms']['median']:.2f} ms, "
          f"p90 {results['hook_round_trip_ms']['p90']:.2f} ms over {a.hook_rounds}")
    print(f"daemon idle RSS: {results['daemon_idle_rss_kib'] / 1024:.1f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
