"""The harness the benchmarks share, so that each bench script holds only what it measures.

One piece per concern: ports; the private web server (nginx + php-fpm on 127.0.0.1) and how
bgagent is told to manage it; private Redis and MariaDB; bgagent's daemon and its hooks; the
bounded constant-rate HTTP client; Magento-shaped trees (bench/gen-magento-tree) and the
disk settling done before each timed contender; running a step on a fleet at once; CSV,
Markdown tables and plots. Bench scripts import this module and never each other.

Everything here is the standard library only: the plot scripts import it too, and they run
under Debian's /usr/bin/python3 (for python3-matplotlib) in an empty environment.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import http.client
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# CodeDeploy's in-place order of the hooks bgagent answers (appspec.yml).
LIFECYCLE_EVENTS = ["ApplicationStop", "BeforeInstall", "AfterInstall", "ApplicationStart", "ValidateService",
                    "BeforeAllowTraffic", "AfterAllowTraffic"]


def lifecycle_events(first: bool = False) -> list:
    """The hooks CodeDeploy runs for an in-place deployment, in order; a node's first has no
    ApplicationStop (CodeDeploy runs it from the previous revision, and there is none)."""
    return LIFECYCLE_EVENTS[1:] if first else list(LIFECYCLE_EVENTS)


# --- ports ---------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port: int, timeout: float = 10.0):
    """Returns once something accepts connections on 127.0.0.1:port; exits after `timeout` s."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


# --- the private web server ----------------------------------------------------------------

def fpm_bin() -> str:
    """The php-fpm binary (Debian's php-fpm8.2)."""
    for b in ["/usr/sbin/php-fpm8.2", "/usr/sbin/php-fpm"]:
        if os.path.exists(b):
            return b
    raise SystemExit("php-fpm not installed: run scripts/install-test-deps.sh")


class Web:
    """nginx in front of php-fpm (8 static workers), both private to directory `d` and
    listening on 127.0.0.1 only, serving `docroot` (a path through `current` for bgagent).

    php_ini: extra `-d name=value` settings for php-fpm (they go before -R -y, so that
    php-fpm's config test can be run with the same argv plus -t).
    php_must_exist: nginx answers 404 for a .php path that is not a file (`try_files $uri
    =404`) instead of passing it to php-fpm.
    stop_grace: seconds stop() waits after signalling both servers.
    """

    def __init__(self, d: Path, docroot: str, php_ini=(), php_must_exist: bool = False, stop_grace: float = 0.3):
        self.d = d
        self.stop_grace = stop_grace
        for s in ["run", "logs", "tmp"]:
            (d / s).mkdir(parents=True, exist_ok=True)
        (d / "php-fpm.conf").write_text(
            f"[global]\npid = {d}/run/php-fpm.pid\nerror_log = {d}/logs/php-fpm.log\ndaemonize = yes\n"
            f"process_control_timeout = 10s\n[www]\nuser = root\nlisten = {d}/run/php-fpm.sock\nlisten.mode = 0666\n"
            "pm = static\npm.max_children = 8\n")
        self.port = free_port()
        must_exist = "try_files $uri =404; " if php_must_exist else ""
        (d / "nginx.conf").write_text(
            f"user root; worker_processes 2; pid {d}/run/nginx.pid; error_log {d}/logs/nginx.err warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n"
            f"fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n"
            f"server {{ listen 127.0.0.1:{self.port}; root {docroot}; index index.php;\n"
            "location / { try_files $uri /index.php$is_args$args; }\n"
            f"location ~ \\.php$ {{ {must_exist}include /etc/nginx/fastcgi_params;\n"
            "fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;\n"
            "fastcgi_param DOCUMENT_ROOT $realpath_root;\n"
            f"fastcgi_pass unix:{d}/run/php-fpm.sock; }} }} }}\n")
        self.nginx = ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "logs/nginx.err")]
        self.fpm = [fpm_bin(), *php_ini, "-R", "-y", str(d / "php-fpm.conf")]

    def start(self):
        subprocess.run(self.fpm, check=True)
        subprocess.run(self.nginx, check=True)
        wait_port(self.port)

    def master(self) -> int:
        """php-fpm's master pid."""
        return int((self.d / "run/php-fpm.pid").read_text().strip())

    def stop(self):
        for pid_file in ["run/nginx.pid", "run/php-fpm.pid"]:
            try:
                os.kill(int((self.d / pid_file).read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(self.stop_grace)

    def services_yaml(self, fastcgi: bool = False) -> str:
        """bgagent's `services:` for this server (exec backend): each one's config test and
        graceful reload (php-fpm USR2, nginx -s reload) as their units would run them;
        `fastcgi`: php-fpm's socket too (for opcache's precompile and status)."""
        d = self.d
        fcgi = f', fastcgi: "unix:{d}/run/php-fpm.sock"' if fastcgi else ""
        test = json.dumps(self.fpm[:-3] + ["-t"] + self.fpm[-3:])
        return ("services:\n  backend: exec\n  list:\n"
                f"    - {{ name: php-fpm, kind: php-fpm, test: {test}, reload: [kill, -USR2, \"{{pid}}\"], "
                f"pid_file: {d}/run/php-fpm.pid, config_file: {d}/php-fpm.conf{fcgi} }}\n"
                f"    - {{ name: nginx, kind: nginx, test: [nginx, -t, -q, -p, {d}, -c, {d}/nginx.conf, -e, {d}/logs/nginx.err], "
                f"reload: [nginx, -p, {d}, -c, {d}/nginx.conf, -e, {d}/logs/nginx.err, -s, reload] }}\n")

    def health_yaml(self) -> str:
        """bgagent's `health:`: this server's /health.php answering OK, every 50 ms, twice."""
        return ("health:\n"
                f"  checks: [ {{ name: app, http: {{ url: \"http://127.0.0.1:{self.port}/health.php\", body_contains: OK }} }} ]\n"
                "  period: 50ms\n  success_threshold: 2\n")


# --- databases -----------------------------------------------------------------------------

class Redis:
    """redis-server on 127.0.0.1 without persistence, private to directory `d`; `extra`:
    more command-line settings (e.g. "--enable-debug-command", "yes")."""

    def __init__(self, d: Path, *extra: str):
        d.mkdir(parents=True, exist_ok=True)
        self.d = d
        self.port = free_port()
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        *extra, "--daemonize", "yes", "--dir", str(d), "--pidfile", str(d / "r.pid"),
                        "--logfile", str(d / "r.log")], check=True)
        wait_port(self.port)

    def stop(self, timeout: float = 10.0):
        """SIGTERM, then waits (at most `timeout` s) until it has exited: it writes its log
        until then, which would race a removal of its directory."""
        try:
            pid = int((self.d / "r.pid").read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.02)


class MariaDb:
    """A fresh mariadbd on 127.0.0.1, private to directory `d` (root over its Unix socket)."""

    def __init__(self, d: Path):
        self.d = d
        (d / "run").mkdir(parents=True)
        self.port = free_port()
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={d}/db", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.p = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={d}/db", f"--socket={d}/run/m.sock", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--pid-file={d}/run/m.pid", f"--log-error={d}/m.err", "--user=root",
             "--skip-name-resolve", "--innodb-buffer-pool-size=64M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 30)

    def sql(self, q: str) -> str:
        """Runs `q` as root; returns what it printed (no column names)."""
        return subprocess.run(["mariadb", "--no-defaults", "-uroot", f"--socket={self.d}/run/m.sock", "-N", "-e", q],
                              check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout

    def stop(self):
        self.p.terminate()
        self.p.wait(30)


# --- bgagent's daemon and hooks ------------------------------------------------------------

def start_daemon(bin_, cfg: Path, sock: Path, log: Path = None, timeout: float = 10.0) -> subprocess.Popen:
    """`bgagent --config cfg daemon`, its output to `log` (or nowhere); returns once its
    socket `sock` accepts connections, exits after `timeout` s with the log's tail."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        p = subprocess.Popen([str(bin_), "--config", str(cfg), "daemon"], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    t0 = time.time()
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.close()
            return p
        except OSError:
            s.close()
        if p.poll() is not None or time.time() - t0 > timeout:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else "(not kept)"
            stop_daemon(p)
            raise SystemExit(f"{cfg}: the daemon did not listen on {sock} within {timeout:g} s; its log:\n{tail}")
        time.sleep(0.02)


def stop_daemon(p: subprocess.Popen, timeout: float = 10.0):
    """SIGTERM, then SIGKILL if it has not exited after `timeout` s."""
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def hook_command(bin_, cfg: Path, event: str, dep: str, app: str = "bench", group: str = "g",
                 lifecycle_event: bool = False):
    """(argv, env) of `bgagent hook EVENT` as CodeDeploy runs it for deployment `dep`;
    `lifecycle_event`: LIFECYCLE_EVENT set too (CodeDeploy sets it)."""
    env = dict(os.environ, DEPLOYMENT_ID=dep, DEPLOYMENT_GROUP_ID=group, APPLICATION_NAME=app)
    if lifecycle_event:
        env["LIFECYCLE_EVENT"] = event
    return [str(bin_), "--config", str(cfg), "hook", event], env


@dataclass
class HookRun:
    """One `bgagent hook` run: its exit code, output (stdout and stderr) and perf_counter()
    just before it started and just after it ended."""
    event: str
    dep: str
    returncode: int
    output: str
    start: float
    end: float


def run_hook(bin_, cfg: Path, event: str, dep: str, *, app: str = "bench", group: str = "g",
             lifecycle_event: bool = False, check: bool = True) -> HookRun:
    """Runs `bgagent hook EVENT` (hook_command) and times it; `check`: exits with the
    hook's output when it fails."""
    argv, env = hook_command(bin_, cfg, event, dep, app, group, lifecycle_event)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t1 = time.perf_counter()
    if check and r.returncode != 0:
        raise SystemExit(f"bgagent hook {event} ({dep}, {cfg}) failed with exit {r.returncode}:\n{r.stdout[-3000:]}")
    return HookRun(event, dep, r.returncode, r.stdout, t0, t1)


def run_at_once(n: int, fn) -> float:
    """Runs fn(0) .. fn(n - 1) in n threads released together (a barrier), as a fleet's
    nodes run a lifecycle event; returns the seconds from the release to the last return.
    The first exception a thread raised is raised here, after all have ended."""
    barrier = threading.Barrier(n)
    ends = [0.0] * n
    errors = []

    def go(i):
        try:
            barrier.wait()
            fn(i)
            ends[i] = time.perf_counter()
        except BaseException as e:  # noqa: BLE001  (SystemExit too: it is re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(ends) - t0


# --- load ----------------------------------------------------------------------------------

def release_of(body: str) -> str:
    """What a bench release answers: `release=<id>` gives the id; anything else ""."""
    return body.strip().split("release=")[-1] if "release=" in body else ""


def first_line(body: str) -> str:
    """The body's first line, at most 90 characters."""
    lines = body.strip().splitlines()
    return lines[0][:90] if lines else ""


def release_number(rel: str) -> int:
    """`r7` -> 7; -1 for what is not a release id (an error)."""
    try:
        return int(rel.lstrip("r"))
    except ValueError:
        return -1


class Load:
    """A bounded constant-rate HTTP client: `rate` GET requests per second to 127.0.0.1:port
    for at most `max_seconds` s, from `workers` threads with one keep-alive connection each,
    cycling through `paths`. Records (t sent, latency s, status or 0, summarise(body) or the
    error's name), t from start()."""

    def __init__(self, port, rate, max_seconds, workers=8, paths=("/",), headers=None, summarise=release_of):
        self.port, self.rate, self.max = port, rate, max_seconds
        self.workers, self.paths, self.summarise = workers, list(paths), summarise
        self.headers = {"Connection": "keep-alive"} if headers is None else headers
        self.records = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t0 = None

    def start(self):
        self.t0 = time.perf_counter()
        interval = self.workers / self.rate
        self.threads = [threading.Thread(target=self.worker, args=(i, i * interval / self.workers, interval))
                        for i in range(self.workers)]
        for t in self.threads:
            t.start()

    def worker(self, w, offset, interval):
        nxt, conn, k = self.t0 + offset, None, w
        while not self.stop.is_set() and time.perf_counter() - self.t0 < self.max:
            now = time.perf_counter()
            if now < nxt:
                time.sleep(nxt - now)
            nxt += interval
            path = self.paths[k % len(self.paths)]
            k += 1
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", path, headers=self.headers)
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                rec = (start - self.t0, time.perf_counter() - start, r.status, self.summarise(body))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001  (socket errors count as failures)
                rec = (start - self.t0, time.perf_counter() - start, 0, type(e).__name__)
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.records.append(rec)

    def now(self) -> float:
        """Seconds since start()."""
        return time.perf_counter() - self.t0

    def finish(self):
        """Stops the workers; returns the records sorted by the time they were sent."""
        self.stop.set()
        for t in self.threads:
            t.join()
        return sorted(self.records)


def http_get(url: str, timeout: float = 5):
    """(status, body) of a GET; (0, the error) when it fails or answers an HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001  (a refused or failed request is "not yet")
        return 0, str(e)


# --- trees and the disk --------------------------------------------------------------------

def gen_magento_tree(out: Path, files: int, total_bytes: str, seed: int, release_id: str = None,
                     tar_gz: Path = None):
    """A Magento-shaped release of `files` files totalling `total_bytes` (e.g. "50M") at
    `out` (bench/gen-magento-tree, deterministic for a seed); `tar_gz`: its archive too."""
    argv = [sys.executable, str(REPO / "bench/gen-magento-tree"), "--files", str(files),
            "--total-bytes", total_bytes, "--out", str(out), "--seed", str(seed)]
    if release_id is not None:
        argv += ["--release-id", release_id]
    if tar_gz is not None:
        argv += ["--tar-gz", str(tar_gz)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def settle(paths=(), wait: float = 0.0):
    """Syncs the disk (no contender pays for another's writeback), waits `wait` s, then
    reads `paths` once (files, or every file of a directory) so the contender starts from a
    warm page cache, as right after CodeDeploy unpacked the revision."""
    subprocess.run(["sync"], check=True)
    time.sleep(wait)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            # tar does not read file contents when writing to /dev/null itself: pipe it.
            tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(p), "."], stdout=subprocess.PIPE)
            while tar.stdout.read(1 << 20):
                pass
            tar.wait()
        else:
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


# --- output --------------------------------------------------------------------------------

def write_csv(path: Path, header: str, rows):
    """`header` (comma-separated names), then one line a row, values joined by commas."""
    with open(path, "w") as f:
        f.write(header + "\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")


def markdown_table(header, rows, align: str = "") -> str:
    """A Markdown table: `header` and each row a list of cells (str() of each; an empty cell
    is one space), `align` one letter a column, r for right-aligned (`---:`), else left."""
    def line(cells):
        return "|" + "|".join(f" {c} " if str(c) != "" else " " for c in cells) + "|"

    sep = "|" + "|".join("---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def run_plot(*args: str):
    """Runs `python3 ARGS` (a plot script and its arguments) with Debian's python3 and
    python3-matplotlib, outside any virtualenv or pyenv the caller may have; a plot that
    fails does not fail the benchmark."""
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", py, *args], check=False)


def read_csv(path) -> list:
    """A CSV file with a header line, as a list of dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), imported when a plot is
    drawn: the bench scripts themselves need no matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
