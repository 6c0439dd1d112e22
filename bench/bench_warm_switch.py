#!/usr/bin/env python3
"""Warm switch benchmark (issue 14): latency in the second after a switch, side by side.

Starts php-fpm (opcache on) and nginx privately on 127.0.0.1 for each contender, serving an
autoloaded PHP app (a class map and a front controller that loads --per-request classes of
--classes, in inheritance chains of ten, like Composer's autoloader), and sends --rate
requests per second through nginx for the whole run (bounded by --max-seconds). Each
contender runs --deploys deploys of a fresh copy of the release:

  warm:     bgagent, every event through `bgagent hook`, opcache.switch: warm (precompile
            over FastCGI, switch without a php-fpm reload when opcache has room)
  reload:   bgagent as it was (opcache.switch: reload: switch, then php-fpm USR2)
  deployer: Deployer's way: copy the release, `ln -sfn` + rename the `current` link, then
            php-fpm USR2

Per contender: failed requests, stale responses (an older release answering after the
switch step returned), and p50/p99/max latency in the switch windows (from the start of the
switch step to one second after it returned) against the steady state (every other request).
A request counts in a switch window when it was in flight during it. php-fpm's memory (PSS
of master and workers) after each deploy gives the growth per deploy.
With --big N, also the precompile time and opcache memory of an N-file release.

    python3 bench/bench_warm_switch.py                      # 10 deploys each, 200 req/s
    python3 bench/bench_warm_switch.py --smoke              # 2 deploys each, short
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import (REPO, Load, free_port, lifecycle_events, markdown_table, release_number,  # noqa: E402
                    run_hook, run_plot, start_daemon, stop_daemon, write_csv)


def make_app(dst: Path, classes: int, per_request: int, bulk: int = 2):
    """The autoloaded app (the same shape as tests/support's autoload_app)."""
    lib = dst / "vendor/acme/lib"
    lib.mkdir(parents=True, exist_ok=True)
    (dst / "vendor/composer").mkdir(parents=True, exist_ok=True)
    (dst / "pub").mkdir(parents=True, exist_ok=True)
    m = ["<?php\nreturn [\n"]
    for i in range(classes):
        parent = "" if i % 10 == 0 else f" extends C{i - 1}"
        body = [f"<?php\nnamespace Acme;\nclass C{i}{parent} {{\n    public function v{i}(int $x): int {{ return $x + {i}; }}\n"]
        for k in range(bulk):
            body.append(f"    public function m{k}(array $a): array {{ $o = []; foreach ($a as $k => $v) {{ $o[$k . '_{k}'] = is_int($v) ? $v * {k} : strrev((string) $v); }} return $o; }}\n")
        body.append("}\n")
        (lib / f"C{i}.php").write_text("".join(body))
        m.append(f"    'Acme\\\\C{i}' => __DIR__ . '/../acme/lib/C{i}.php',\n")
    m.append("];\n")
    (dst / "vendor/composer/autoload_classmap.php").write_text("".join(m))
    (dst / "vendor/autoload.php").write_text(
        "<?php\n$map = require __DIR__ . '/composer/autoload_classmap.php';\n"
        "spl_autoload_register(function ($c) use ($map) { if (isset($map[$c])) { require $map[$c]; } });\n")
    (dst / "pub/index.php").write_text(
        "<?php\nrequire __DIR__ . '/../vendor/autoload.php';\nheader('Content-Type: text/plain');\n$s = 0;\n"
        f"for ($i = 0; $i < {per_request}; $i++) {{ $c = 'Acme\\\\C' . $i; $o = new $c(); $m = 'v' . $i; $s += $o->$m(1); }}\n"
        "echo 'release=' . trim((string) @file_get_contents(__DIR__ . '/../RELEASE_ID')) . \"\\n\";\n")
    (dst / "pub/health.php").write_text("<?php echo \"OK\\n\";\n")


class Web(common.Web):
    """The private web server with opcache set up as the contenders need (the restrict_api
    directory is where bgagent writes its FastCGI snippets)."""

    def __init__(self, d: Path, docroot: str, vt: int, opcache_mb: int = 128, max_files: int = 10000):
        self.snippets = d / "fcgi"
        super().__init__(d, docroot, php_must_exist=True, stop_grace=0.5,
                         php_ini=["-d", f"opcache.validate_timestamps={vt}",
                                  "-d", f"opcache.memory_consumption={opcache_mb}",
                                  "-d", f"opcache.max_accelerated_files={max_files}",
                                  "-d", f"opcache.restrict_api={self.snippets}"])

    def pss_kib(self):
        """PSS of php-fpm's master and workers (shared opcache pages split between them)."""
        m = self.master()
        total = 0
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                if int(p) != m and ppid != m:
                    continue
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except (OSError, ValueError):
                pass
        return total


def bgagent_config(root: Path, web: Web, mode: str, globs=None):
    ready = free_port()
    opc = "opcache: { switch: reload }\n"
    if mode == "warm":
        opc = (f"opcache:\n  switch: warm\n  snippet_dir: {web.snippets}\n  budget: 60s\n  timeout: 60s\n"
               f"  globs: {json.dumps(globs or [])}\n")
    cfg = root / "bgagent.yaml"
    cfg.write_text(f"""app_root: app
state_dir: state
socket: {{ path: run/bgagent.sock, group: null }}
codedeploy: {{ deployment_root: cd-root }}
app: {{ kind: php, name: bench }}
release: {{ keep: 3, shared_paths: [] }}
params: {{ source: none }}
{web.services_yaml(fastcgi=True)}{web.health_yaml()}readiness: {{ listen: "127.0.0.1:{ready}" }}
{opc}""")
    return cfg


class Bgagent:
    def __init__(self, a, root: Path, web: Web, mode: str, globs=None):
        self.a, self.root, self.web = a, root, web
        self.cfg = bgagent_config(root, web, mode, globs)
        self.daemon = start_daemon(a.bin, self.cfg, root / "run/bgagent.sock", root / "daemon.log")

    def deploy(self, n, template: Path, clock):
        """Returns (switch step start, switch step end, ApplicationStart's log)."""
        dep = f"d-{n}"
        src = self.root / "cd-root/g" / dep / "deployment-archive"
        src.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(template), str(src)], check=True)
        (src / "RELEASE_ID").write_text(f"r{n}")
        t_sw = (0.0, 0.0)
        log = ""
        for ev in lifecycle_events(first=n == 0):
            t0 = clock()
            out = run_hook(self.a.bin, self.cfg, ev, dep).output
            if ev == "ApplicationStart":
                t_sw, log = (t0, clock()), out
        return t_sw, log

    def status(self):
        r = subprocess.run([self.a.bin, "--config", str(self.cfg), "status", "--json"], stdout=subprocess.PIPE, text=True)
        return json.loads(r.stdout)

    def stop(self):
        stop_daemon(self.daemon)


class Deployer:
    """Deployer's recipe: release dir, `current` symlink swapped with a rename, php-fpm USR2."""

    def __init__(self, root: Path, web: Web):
        self.root, self.web = root, web
        (root / "app/releases").mkdir(parents=True, exist_ok=True)

    def deploy(self, n, template: Path, clock):
        rel = self.root / f"app/releases/{n}"
        subprocess.run(["cp", "-a", str(template), str(rel)], check=True)
        (rel / "RELEASE_ID").write_text(f"r{n}")
        t0 = clock()
        tmp = self.root / "app/current.tmp"
        subprocess.run(["ln", "-sfn", f"releases/{n}", str(tmp)], check=True)
        os.rename(tmp, self.root / "app/current")
        os.kill(self.web.master(), signal.SIGUSR2)
        return (t0, clock()), ""

    def stop(self):
        pass


def run_contender(a, work: Path, name: str, vt: int, template: Path):
    root = work / f"{name}-vt{vt}"
    (root / "app").mkdir(parents=True)
    web = Web(root / "web", f"{root}/app/current/pub", vt)
    web.start()
    agent = Deployer(root, web) if name == "deployer" else Bgagent(a, root, web, name)
    load = None
    clock = lambda: load.now() if load else 0.0  # noqa: E731
    switches, pss, logs = [], [], []
    try:
        agent.deploy(0, template, clock)
        time.sleep(1.0)
        for _ in range(20):  # the first release warm before the load starts, for everyone
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{web.port}/"], check=False)
        load = Load(web.port, a.rate, a.max_seconds)
        load.start()
        time.sleep(a.settle)
        pss.append(web.pss_kib())
        for n in range(1, a.deploys + 1):
            t_sw, log = agent.deploy(n, template, clock)
            switches.append((t_sw[0], t_sw[1], f"r{n}"))
            logs.append(log)
            time.sleep(a.settle)
            pss.append(web.pss_kib())
        recs = load.finish()
        status = agent.status() if isinstance(agent, Bgagent) else None
    finally:
        agent.stop()
        web.stop()
    return recs, switches, pss, logs, status


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(len(xs) * q)) - 1))] * 1000


def analyse(recs, switches):
    ok = lambda r: 200 <= r[2] < 300  # noqa: E731
    failed = sum(1 for r in recs if not ok(r))
    stale = 0
    for i, (_, t_end, rel) in enumerate(switches):
        nxt = switches[i + 1][0] if i + 1 < len(switches) else float("inf")
        stale += sum(1 for r in recs if t_end <= r[0] < nxt and ok(r) and release_number(r[3]) < release_number(rel))
    # A request belongs to a switch window when it was in flight during it (a request sent
    # just before a reload and held up by it counts).
    in_win = lambda r: any(r[0] <= e + 1.0 and r[0] + r[1] >= s for (s, e, _) in switches)  # noqa: E731
    win = [r[1] for r in recs if ok(r) and in_win(r)]
    steady = [r[1] for r in recs if ok(r) and not in_win(r)]
    return {
        "requests": len(recs), "failed": failed, "stale": stale,
        "steady": {"n": len(steady), "p50": pct(steady, .5), "p99": pct(steady, .99), "max": pct(steady, 1.0)},
        "switch": {"n": len(win), "p50": pct(win, .5), "p99": pct(win, .99), "max": pct(win, 1.0)},
        "switch_ms": [round((e - s) * 1000) for (s, e, _) in switches],
    }


def series(recs, switches, label, bucket=0.25):
    rows = []
    if not recs:
        return rows
    t, i, end = 0.0, 0, max(r[0] for r in recs)
    while t + bucket <= end:
        b = []
        while i < len(recs) and recs[i][0] < t + bucket:
            b.append(recs[i])
            i += 1
        lat = [r[1] for r in b if 200 <= r[2] < 300]
        rows.append((round(t, 2), round(pct(lat, .99), 2) if lat else 0, round(pct(lat, 1.0), 2) if lat else 0,
                     sum(1 for r in b if not 200 <= r[2] < 300), label))
        t += bucket
    return rows


def big_precompile(a, work: Path, n_files: int):
    """An n-file release deployed twice with warm switches and a glob over all of it: the
    second deploy's precompile time and the opcache memory it took (from bgagent status)."""
    root = work / "big"
    (root / "app").mkdir(parents=True)
    tpl = work / "big-template"
    make_app(tpl, n_files, 300)
    web = Web(root / "web", f"{root}/app/current/pub", 1, opcache_mb=512, max_files=4 * n_files)
    web.start()
    agent = Bgagent(a, root, web, "warm", globs=["vendor/**/*.php", "pub/*.php"])
    try:
        agent.deploy(0, tpl, lambda: 0.0)
        st0 = agent.status()["opcache"]["php-fpm"]
        t_sw, log = agent.deploy(1, tpl, lambda: time.perf_counter())
        st1 = agent.status()["opcache"]["php-fpm"]
    finally:
        agent.stop()
        web.stop()
    pre = st1["last_switch"]["precompile"]
    rels = st1["snapshot"]["releases"]
    cur = max(rels, key=lambda k: k)
    return {
        "files": n_files, "precompile": pre, "application_start_ms": round((t_sw[1] - t_sw[0]) * 1000),
        "release_scripts": rels[cur]["scripts"], "release_opcache_bytes": rels[cur]["memory"],
        "opcache_used_after_first_deploy": st0["snapshot"]["used_memory"],
        "plan": st1["last_switch"]["plan"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target/release/bgagent"))
    ap.add_argument("--deploys", type=int, default=10)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=300, help="hard bound on each contender's load")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between deploys")
    ap.add_argument("--classes", type=int, default=3000)
    ap.add_argument("--per-request", type=int, default=300)
    ap.add_argument("--vt", type=int, nargs="+", default=[1, 0], help="opcache.validate_timestamps values")
    ap.add_argument("--contenders", nargs="+", default=["warm", "reload", "deployer"])
    ap.add_argument("--big", type=int, default=20000, help="files of the precompile-size release (0: skip)")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.deploys, a.rate, a.max_seconds, a.settle, a.classes, a.per_request, a.big, a.vt = 2, 50, 60, 1.0, 200, 50, 0, [1]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bgagent-warm-", dir="/var/tmp"))
    results, rows, marks = {}, [], []
    try:
        tpl = work / "template"
        make_app(tpl, a.classes, a.per_request)
        for vt in a.vt:
            for name in a.contenders:
                label = f"{name} vt={vt}"
                print(f"running {label} ...", file=sys.stderr, flush=True)
                recs, switches, pss, logs, status = run_contender(a, work, name, vt, tpl)
                r = analyse(recs, switches)
                r["pss_kib"] = pss
                r["pss_growth_kib_per_deploy"] = round((pss[-1] - pss[0]) / max(1, len(pss) - 1))
                r["plans"] = sorted({l.split("php-fpm: ")[1].split(":")[0] for log in logs for l in log.splitlines()
                                     if "php-fpm: switch" in l or "php-fpm: reloading" in l})
                if status and status.get("opcache"):
                    r["last_precompile"] = status["opcache"]["php-fpm"]["last_switch"].get("precompile")
                results[label] = r
                rows += series(recs, switches, label)
                marks += [(round(s, 2), round(e, 2), label) for (s, e, _) in switches]
        if a.big:
            print(f"precompiling a {a.big}-file release ...", file=sys.stderr, flush=True)
            results["big"] = big_precompile(a, work, a.big)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (out / "warm_switch.json").write_text(json.dumps(results, indent=2))
    write_csv(out / "warm_switch_series.csv", "t_seconds,p99_ms,max_ms,errors,label", rows)
    write_csv(out / "warm_switch_switches.csv", "t_start,t_end,label", marks)
    run_plot(str(HERE / "plot_warm_switch.py"), str(out / "warm_switch_series.csv"),
             str(out / "warm_switch_switches.csv"), str(out / "warm_switch.png"))
    if a.smoke:
        print("(smoke run: a tiny app at a low rate proves the harness works; its figures are not results)\n")
    print(f"## Warm switch: {a.deploys} deploys per contender, {a.rate} req/s, {a.classes} classes, "
          f"{a.per_request} loaded per request\n")
    table = []
    for label, r in results.items():
        if label == "big":
            continue
        s, w = r["steady"], r["switch"]
        table.append([label, r["requests"], r["failed"], r["stale"], f"{s['p50']:.1f} / {s['p99']:.1f} / {s['max']:.1f}",
                      f"{w['p50']:.1f} / {w['p99']:.1f} / {w['max']:.1f}", f"{w['p99'] / s['p99']:.2f}",
                      f"{w['max'] / s['max']:.2f}", r["pss_growth_kib_per_deploy"], f"{statistics.median(r['switch_ms']):.0f}"])
    print(markdown_table(["contender", "requests", "failed", "stale", "steady p50 / p99 / max ms",
                          "switch window p50 / p99 / max ms", "p99 ratio", "max ratio", "PSS growth KiB/deploy",
                          "switch step ms (median)"], table, "lrrrllrrrr"))
    if "big" in results:
        b = results["big"]
        p = b["precompile"]
        print(f"\n{b['files']}-file release: precompile {p['compiled']} compiled, {p['already']} already, "
              f"{p['failed']} failed, {p['skipped']} skipped in {p['ms']} ms; ApplicationStart {b['application_start_ms']} ms; "
              f"the release takes {b['release_opcache_bytes'] / 1048576:.1f} MiB of opcache for {b['release_scripts']} scripts")
    print(f"\nPlot: {out / 'warm_switch.png'}")
    sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)  # after the results: deleting ~100k files is slow


if __name__ == "__main__":
    main()
