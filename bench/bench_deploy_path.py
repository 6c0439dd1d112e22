#!/usr/bin/env python3
"""The deployment's critical path (issue 11, "Figures"), measured side by side in one run.

(1) From app healthy to ValidateService success, in each of --deploys in-place deploys of a
    Magento-shaped release (--files-small, 20,000 by default) with release.keep: 5 and five
    older releases on disk, so every deploy has a release to prune (pruning runs after the
    node is ready, off the critical path: see src/cleanup.rs). "App healthy" is the first
    moment the node's health URL answers 200 on the new release after ApplicationStart
    returned; the figure is ValidateService's return minus that moment.
(2) One node's whole in-place deployment of a --files-large (100,000 by default) Magento-
    shaped release through `bgagent hook`, from the revision unpacked (CodeDeploy's
    deployment-archive) to ready: ApplicationStop (the drain: no load balancer probes here,
    so it goes on at once, i.e. the drain delay is excluded), BeforeInstall, AfterInstall,
    ApplicationStart, ValidateService, BeforeAllowTraffic, AfterAllowTraffic; beside the
    tutorial's procedure (../shared/seeds/000_*) on the same tree in the same run: stop
    nginx, copy the revision over the live root (CodeDeploy's `files:`), chown -R, chmod -R
    755, start nginx, `sleep 30`, curl. The tutorial's figure is given with and without its
    fixed `sleep 30`. The floor, in the same run: `cp -al` of the same revision (links and
    directories only: no owner, no modes), what any tree built from the revision costs at least.

Both contenders serve through the same private nginx + php-fpm (127.0.0.1). Before each timed
contender the disk is synced and its input read once (a warm page cache, as right after
CodeDeploy unpacked the revision).

    python3 bench/bench_deploy_path.py --bin target/release/bgagent   # full: 10 x 20k, 1 x 100k
    python3 bench/bench_deploy_path.py --smoke                        # CI: 2 x 1k, 1 x 2k
Writes Markdown to stdout and the raw figures to --json.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Web, free_port, gen_magento_tree, http_get, lifecycle_events, markdown_table,  # noqa: E402
                    run_hook, settle, start_daemon, stop_daemon, wait_port)


class Node:
    """bgagent's daemon (exec backend) in front of the private web server."""

    def __init__(self, a, root: Path, keep: int):
        self.a, self.root = a, root
        self.app = root / "app"
        self.app.mkdir(parents=True)
        self.web = Web(root / "web", f"{self.app}/current/pub")
        owner = "  owner: root\n  group: www-data\n" if os.geteuid() == 0 else ""
        self.cfg = root / "bgagent.yaml"
        self.cfg.write_text(f"""app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: magento, name: bench }}
release: {{ keep: {keep}, shared_paths: [pub/media, var/log] }}
permissions:
{owner}  writable:
    - {{ path: var, dir_mode: "2770", file_mode: "0660" }}
    - {{ path: generated, dir_mode: "2770", file_mode: "0660" }}
    - {{ path: pub/static, dir_mode: "2770", file_mode: "0660" }}
{self.web.services_yaml()}{self.web.health_yaml()}readiness: {{ listen: "127.0.0.1:{free_port()}", status_listen: null }}
opcache: {{ switch: reload }}
""")
        self.web.start()
        self.daemon = start_daemon(a.bin, self.cfg, root / "run/bgagent.sock", root / "daemon.log")

    def revision(self, dep: str) -> Path:
        return self.root / "cd-root/g" / dep / "deployment-archive"

    def deploy(self, dep, first=False):
        """Every event; returns {event: seconds} and the ValidateService figure."""
        out, fig = {}, None
        self.intake_s = None
        for ev in lifecycle_events(first):
            h = run_hook(self.a.bin, self.cfg, ev, dep, lifecycle_event=True)
            t1 = h.end
            out[ev] = t1 - h.start
            if ev == "AfterInstall":
                # "release R built from S in 2.02s: ...": the intake's share of AfterInstall
                m = re.search(r"release \S+ built from .* in ([0-9.]+)s", h.output)
                self.intake_s = float(m.group(1)) if m else None
            if ev == "ApplicationStart":
                rid = (self.revision(dep) / "RELEASE_ID").read_text().strip()
                while True:
                    code, body = http_get(f"http://127.0.0.1:{self.web.port}/")
                    if code == 200 and f"release={rid}" in body:
                        healthy = time.perf_counter()
                        break
                    if time.perf_counter() - t1 > 60:
                        raise SystemExit(f"{dep}: the new release did not answer within 60 s: {code} {body[:200]}")
                    time.sleep(0.005)
            if ev == "ValidateService":
                fig = t1 - healthy
        return out, fig

    def stop(self):
        stop_daemon(self.daemon)
        self.web.stop()


def tutorial(a, root: Path, revision: Path, previous: Path):
    """The tutorial's in-place procedure on the same tree; returns {step: seconds}."""
    live = root / "html"
    web = Web(root / "web", f"{live}/pub")
    subprocess.run(["cp", "-a", f"{previous}/.", str(live) + "/"], check=True)
    subprocess.run(web.fpm, check=True)
    subprocess.run(web.nginx, check=True)
    wait_port(web.port)
    owner = "www-data:www-data" if os.geteuid() == 0 else None
    steps = {}
    try:
        settle([revision])
        t = time.perf_counter()
        subprocess.run(web.nginx + ["-s", "quit"], check=False)  # BeforeInstall: systemctl stop nginx
        while (web.d / "run/nginx.pid").exists():
            time.sleep(0.005)
        steps["BeforeInstall (stop nginx)"] = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(["cp", "-r", f"{revision}/.", str(live) + "/"], check=True)  # Install (files:)
        steps["Install (cp -r)"] = time.perf_counter() - t
        t = time.perf_counter()
        if owner:
            subprocess.run(["chown", "-R", owner, str(live)], check=True)
        subprocess.run(["chmod", "-R", "755", str(live)], check=True)
        steps["AfterInstall (chown -R, chmod -R 755)"] = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(web.nginx, check=True)  # ApplicationStart: systemctl start nginx
        wait_port(web.port)
        steps["ApplicationStart (start nginx)"] = time.perf_counter() - t
        t = time.perf_counter()
        time.sleep(a.tutorial_sleep)  # ValidateService: sleep 30; curl --fail
        code, _ = http_get(f"http://127.0.0.1:{web.port}/health.php")
        if code != 200:
            raise SystemExit(f"tutorial: health.php answered {code}")
        steps[f"ValidateService (sleep {a.tutorial_sleep:g}, curl)"] = time.perf_counter() - t
    finally:
        web.stop()
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--deploys", type=int, default=10)
    ap.add_argument("--files-small", type=int, default=20_000)
    ap.add_argument("--files-large", type=int, default=100_000)
    ap.add_argument("--tutorial-sleep", type=float, default=30.0)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--part", choices=["1", "2", "both"], default="both",
                    help="(1) healthy -> ValidateService, (2) the whole deployment beside the tutorial")
    ap.add_argument("--smoke", action="store_true", help="2 x 1,000 files and 1 x 2,000, sleep 1 (CI)")
    a = ap.parse_args()
    if a.smoke:
        a.deploys, a.files_small, a.files_large, a.tutorial_sleep = 2, 1_000, 2_000, 1.0
    if not Path(a.bin).exists():
        raise SystemExit(f"{a.bin} not found: build it first (cargo build --release)")
    # Sizes kept modest (the count of files is what the figures are about) so that every tree
    # stays on disk until the end of the run: 2 KiB a file for (1), 5 KiB for (2).
    small_bytes = f"{max(1, a.files_small * 2 // 1000)}M"
    large_bytes = f"{max(1, a.files_large * 5 // 1000)}M"
    work = Path(a.work or tempfile.mkdtemp(prefix="bgagent-path-", dir="/var/tmp"))
    res = {"bin": a.bin, "deploys": a.deploys, "files_small": a.files_small, "files_large": a.files_large}
    try:
        # (2) first, before anything is deleted (on this machine's ext4, inodes freed in the
        # last minute slow every later file creation): one whole deployment of the large tree,
        # bgagent then the tutorial, on the same tree
        n = Node(a, work / "large", keep=5) if a.part != "1" else None
        try:
            if n is None:
                raise StopIteration
            gen_magento_tree(n.revision("d-0"), a.files_large, large_bytes, seed=2, release_id="big0")
            n.deploy("d-0", first=True)
            gen_magento_tree(n.revision("d-1"), a.files_large, large_bytes, seed=2, release_id="big1")
            settle([n.revision("d-1")])
            t0 = time.perf_counter()
            events, _ = n.deploy("d-1")
            res["bgagent_whole_s"] = time.perf_counter() - t0
            res["bgagent_events_s"] = events
            res["bgagent_intake_s"] = n.intake_s
            n.stop()
            settle([n.revision("d-1")])
            t = time.perf_counter()
            subprocess.run(["cp", "-al", str(n.revision("d-1")), str(work / "floor")], check=True)
            res["floor_cp_al_s"] = time.perf_counter() - t
            steps = tutorial(a, work / "tutorial", n.revision("d-1"), n.revision("d-0"))
            res["tutorial_steps_s"] = steps
            res["tutorial_whole_s"] = sum(steps.values())
            res["tutorial_without_sleep_s"] = res["tutorial_whole_s"] - a.tutorial_sleep
            subprocess.run(["rm", "-rf", str(work / "large"), str(work / "tutorial"), str(work / "floor")], check=True)
        except StopIteration:
            pass
        finally:
            if n is not None:
                n.stop()
        # (1) keep: 5, five older releases, then --deploys measured deploys (each prunes one)
        n = Node(a, work / "small", keep=5) if a.part != "2" else None
        try:
            if n is None:
                raise StopIteration
            for i in range(6 + a.deploys):
                dep = f"d-{i}"
                gen_magento_tree(n.revision(dep), a.files_small, small_bytes, seed=1, release_id=f"r{i}")
                settle([n.revision(dep)])
                events, fig = n.deploy(dep, first=(i == 0))
                if i >= 6:
                    res.setdefault("healthy_to_validated_s", []).append(fig)
                    res.setdefault("application_start_s", []).append(events["ApplicationStart"])
                    res.setdefault("validate_service_s", []).append(events["ValidateService"])
                # The revision is CodeDeploy's (it keeps a few); removed here to keep the disk
                # in bounds: a shared 2-core machine's disk, not an instance's.
                shutil.rmtree(n.revision(dep).parent)
            time.sleep(2)
            res["releases_on_disk_after"] = len(list((n.app / "releases").iterdir()))
        except StopIteration:
            pass
        finally:
            if n is not None:
                n.stop()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)

    print(f"## Critical path ({a.bin})\n")
    if "healthy_to_validated_s" in res:
        part1(a, res)
    if "bgagent_whole_s" in res:
        part2(a, res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def part1(a, res):
    h = res["healthy_to_validated_s"]
    print(f"(1) From app healthy to ValidateService success, {a.deploys} deploys of {a.files_small:,} files, "
          "release.keep 5 with five older releases:\n")
    rows = [[i, f"{f * 1000:.0f}", f"{s * 1000:.0f}", f"{v * 1000:.0f}"]
            for i, (f, s, v) in enumerate(zip(h, res["application_start_s"], res["validate_service_s"]), 1)]
    print(markdown_table(["deploy", "healthy -> ValidateService ok (ms)", "ApplicationStart (ms)",
                          "ValidateService (ms)"], rows))
    print(f"\nmedian {statistics.median(h) * 1000:.0f} ms, max {max(h) * 1000:.0f} ms; "
          f"the tutorial's ValidateService alone is `sleep {a.tutorial_sleep:g}`: "
          f"{a.tutorial_sleep / statistics.median(h):.0f}x the median.")
    print(f"\nreleases on disk after (1): {res['releases_on_disk_after']} (keep 5; pruning runs after ready)\n")


def part2(a, res):
    print(f"(2) One whole in-place deployment of {a.files_large:,} files, revision unpacked -> ready:\n")
    rows = [["bgagent", ev, f"{s:.2f}"] for ev, s in res["bgagent_events_s"].items()]
    rows.append(["bgagent", "**whole**", f"**{res['bgagent_whole_s']:.2f}**"])
    if res.get("bgagent_intake_s") is not None:
        rows.append(["bgagent", "of which intake (the release tree built in AfterInstall)", f"{res['bgagent_intake_s']:.2f}"])
    rows.append(["floor", "`cp -al` of the revision (links and directories only)", f"{res['floor_cp_al_s']:.2f}"])
    rows += [["tutorial", st, f"{s:.2f}"] for st, s in res["tutorial_steps_s"].items()]
    rows.append(["tutorial", "**whole**", f"**{res['tutorial_whole_s']:.2f}**"])
    rows.append(["tutorial", "whole without its `sleep`", f"{res['tutorial_without_sleep_s']:.2f}"])
    print(markdown_table(["contender", "step", "s"], rows))
    print(f"\nbgagent / tutorial: {res['bgagent_whole_s'] / res['tutorial_whole_s']:.2f}x "
          f"({res['bgagent_whole_s'] / res['tutorial_without_sleep_s']:.2f}x of the tutorial without its sleep); "
          f"bgagent's whole deployment / `cp -al` alone: {res['bgagent_whole_s'] / res['floor_cp_al_s']:.2f}x")


if __name__ == "__main__":
    main()
