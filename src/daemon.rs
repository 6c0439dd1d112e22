//! The long-running service: the control socket, one deployment at a time, systemd
//! integration.
//!
//! The socket is bound, given its group and mode 0660, and only then is READY=1 sent to
//! systemd, so `bgagent hook` never races the daemon's start. Each connection sends one
//! request; its work runs inside a span whose log lines are streamed back (see
//! [`crate::logstream`]). Work is serialised by one lock around the [`Engine`]: CodeDeploy
//! runs one event at a time, and `deploy`/`rollback` wait their turn.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, mpsc};
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::events::{Engine, HookEnv, Outcome};
use crate::lifecycle::Event;
use crate::logstream::Stream;
use crate::protocol::{self, Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] crate::events::EngineError),
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another bgagent daemon is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error(
        "socket.group: no group named `{0}` on this host; create it (the package's sysusers file does) or change socket.group"
    )]
    NoSuchGroup(String),
}

struct Shared {
    engine: Mutex<Engine>,
    /// The health checks the steady-state monitor runs; replaced on SIGHUP.
    health: tokio::sync::watch::Sender<crate::health::HealthConfig>,
    allowed_gid: Option<u32>,
    state_dir: PathBuf,
    layout: crate::release::Layout,
    readiness: crate::readiness::Readiness,
    /// Which old-release processes `status` marks as left alone; replaced on SIGHUP.
    processes: std::sync::Mutex<crate::procs::ProcessesConfig>,
    /// What holds the engine now, and since when: named to requests that wait for it.
    holder: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let socket_path = cfg.socket.path.clone();
    let mode = crate::fsutil::parse_mode(&cfg.socket.mode).unwrap_or(0o660);
    let allowed_gid = match &cfg.socket.group {
        Some(g) => match crate::perms::lookup_group(g) {
            Some(gid) => Some(gid),
            None if rustix::process::geteuid().is_root() => {
                return Err(DaemonError::NoSuchGroup(g.clone()));
            }
            None => {
                warn!(
                    "socket.group `{g}` does not exist; only root and this user may use the socket"
                );
                None
            }
        },
        None => None,
    };
    let state_dir = cfg.state_dir.clone();
    let layout = crate::release::Layout::new(&cfg.app_root);
    let listen = cfg.readiness.listen.clone();
    let status_listen = cfg.readiness.status_listen.clone();
    let engine = Engine::open(cfg)?;
    let readiness = engine.readiness();
    if let Some(addr) = &listen {
        let bound = crate::readiness::serve(
            addr,
            readiness.clone(),
            crate::readiness::Surface::LoadBalancer,
        )
        .await
        .map_err(|e| DaemonError::Io {
            action: "listen for readiness on",
            path: PathBuf::from(addr),
            source: e.source,
        })?;
        info!("readiness listener on http://{bound} (/ready, /live)");
    }
    // The operators' listener: a node must deploy even when its port is taken.
    if let Some(addr) = &status_listen {
        match crate::readiness::serve(addr, readiness.clone(), crate::readiness::Surface::Operator)
            .await
        {
            Ok(bound) => info!("status listener on http://{bound} (/status, /metrics)"),
            Err(e) => warn!(
                "{e}; /status and /metrics are not served (set readiness.status_listen to a free address, or null)"
            ),
        }
    }
    // A cleanup of old releases cut short by a stop goes on (at idle I/O priority).
    if !crate::cleanup::pending(&layout).is_empty() {
        crate::cleanup::spawn_deleter(&layout);
    }
    let listener = bind(&socket_path, mode, allowed_gid).await?;
    let (health_tx, health_rx) = tokio::sync::watch::channel(engine.config().health.clone());
    let cfg_processes = engine.config().processes.clone();
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        health: health_tx,
        allowed_gid,
        state_dir,
        layout,
        readiness: readiness.clone(),
        processes: std::sync::Mutex::new(cfg_processes),
        holder: std::sync::Mutex::new(None),
    });
    info!("listening on {}", socket_path.display());
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    {
        // Checks go on while the node is ready.
        tokio::spawn(crate::health::monitor(health_rx, shared.readiness.clone()));
        // Keep this node's serving registration fresh, so the generation it serves is never
        // taken for abandoned and flushed under it.
        {
            let engine = shared.engine.lock().await;
            let cache = engine.config().cache.clone();
            let app = engine.config().app.name.clone();
            drop(engine);
            let shared = shared.clone();
            tokio::spawn(async move {
                let every = (cache.stale_after / 4).max(Duration::from_secs(1));
                loop {
                    tokio::time::sleep(every).await;
                    let Some(cur) = shared.layout.current() else {
                        continue;
                    };
                    let Ok(doc) = crate::state::read(&shared.state_dir) else {
                        continue;
                    };
                    // a drained node serves nothing: registering it would block a flush
                    if doc.node.is_drained() {
                        continue;
                    }
                    let Some(rec) = doc.releases.get(&cur) else {
                        continue;
                    };
                    let Some(slot) = rec.cache["slot"].as_u64() else {
                        continue;
                    };
                    let app = crate::cache::app_name(app.as_deref(), Some(&doc));
                    if let Err(e) = crate::cache::mark_serving(&cache, &app, slot as usize).await {
                        warn!("could not refresh this node's cache-generation heartbeat: {e}");
                    }
                }
            });
        }
        // schema.breaking: maintenance: this node follows the fleet's maintenance window.
        {
            let engine = shared.engine.lock().await;
            let cfg = engine.config();
            let watch = (cfg.schema.breaking == crate::schema::Breaking::Maintenance)
                .then(|| crate::maintenance::Coordinator::from_config(cfg, String::new()))
                .flatten()
                .map(|co| (co, cfg.app.name.clone(), cfg.schema.php.clone()));
            drop(engine);
            if let Some((co, app, php)) = watch {
                tokio::spawn(crate::maintenance::watch(
                    co,
                    app,
                    php,
                    shared.layout.clone(),
                    shared.state_dir.clone(),
                ));
            }
        }
        // A restarted daemon on a live node comes back to ready through the health checks.
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut engine = shared.engine.lock().await;
            engine.recover_readiness().await;
            shared.readiness.set_status(engine.status(None, true));
        });
    }
    {
        // opcache.reclaim_at: window: a due reclaim runs when the window comes; and the
        // pools' opcache snapshots (status) are refreshed.
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(30));
            loop {
                t.tick().await;
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let minute = ((secs % 86400) / 60) as u32;
                shared
                    .engine
                    .lock()
                    .await
                    .opcache_reclaim_in_window(minute)
                    .await;
                // status shows each pool's opcache as of this tick: read without holding the
                // engine (a slow pool must not hold up a hook), recorded after.
                let (targets, dirs) = {
                    let e = shared.engine.lock().await;
                    (e.opcache_status_targets(), e.releases_dirs())
                };
                for (name, pool) in targets {
                    if let Ok(s) = pool.status(true).await {
                        let snap =
                            crate::opcache::Snapshot::of(&s, &dirs, crate::events::warm::now());
                        shared.engine.lock().await.opcache_record_snapshot(
                            &name,
                            pool.addr.to_string(),
                            snap,
                        );
                    }
                }
            }
        });
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval / 2);
            loop {
                t.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Io {
            action: "install SIGTERM handler for",
            path: socket_path.clone(),
            source,
        })?;
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let root_conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut accept_log = RateLimited::default();
    let mut busy_log = RateLimited::default();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(
        |source| DaemonError::Io {
            action: "install SIGHUP handler for",
            path: socket_path.clone(),
            source,
        },
    )?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tokio::spawn(reload(shared.clone()));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Root has its own pool: a socket-group member holding every connection
                    // open cannot lock the operator (or CodeDeploy's agent) out.
                    let root = stream.peer_cred().is_ok_and(|c| c.uid() == 0);
                    let pool = if root { &root_conns } else { &conns };
                    match pool.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                handle(stream, shared).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            busy_log.note(|n| warn!(
                                "refused {n} connection(s) on {}: {MAX_CONNECTIONS} already open (from {})",
                                socket_path.display(),
                                if root { "root" } else { "socket-group members" }
                            ));
                            tokio::spawn(refuse_busy(stream));
                        }
                    }
                }
                Err(e) => {
                    accept_log.note(|n| warn!("accept failed on {} ({n} time(s) in the last {} s): {e}", socket_path.display(), LOG_EVERY.as_secs()));
                    // Out of file descriptors: accept would fail again at once; give the
                    // read deadlines a moment to free some instead of spinning.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!("stopping: waiting for the running event, if any, to finish");
    // Taking the engine lock waits for a running event; its result is then on disk.
    let _engine = shared.engine.lock().await;
    let _ = std::fs::remove_file(&socket_path);
    info!("stopped");
    Ok(())
}

/// SIGHUP (`systemctl reload bgagent`): re-reads the config file and takes it between
/// events. A config with errors, or one that changes what only a restart can (the socket,
/// the listener, app_root, state_dir), is refused with its reasons and the running one kept.
async fn reload(shared: Arc<Shared>) {
    let path = shared.engine.lock().await.config().file.clone();
    info!("SIGHUP: re-reading {}", path.display());
    let loaded = match crate::config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            error!("the config is refused, bgagent keeps running with the one it had: {e}");
            return;
        }
    };
    for w in &loaded.warnings {
        warn!("{w}");
    }
    let host = loaded.config.check_host();
    if !host.is_empty() {
        let list: Vec<String> = host.iter().map(|(k, m)| format!("  `{k}`: {m}")).collect();
        error!(
            "the config {} is refused, bgagent keeps running with the one it had:\n{}",
            path.display(),
            list.join("\n")
        );
        return;
    }
    // Taking the engine waits for a running event: a config changes between events only.
    let mut engine = shared.engine.lock().await;
    let restart = engine.config().restart_only_changes(&loaded.config);
    if !restart.is_empty() {
        error!(
            "the config {} changes {}, which only a restart applies (`systemctl restart bgagent`); bgagent keeps running with the config it had",
            path.display(),
            restart.join(", ")
        );
        return;
    }
    shared.health.send_replace(loaded.config.health.clone());
    if let Ok(mut p) = shared.processes.lock() {
        *p = loaded.config.processes.clone();
    }
    engine.reconfigure(loaded.config);
    info!("config reloaded from {}", path.display());
}

async fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| DaemonError::Io {
            action: "create the socket directory",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        // A stale socket from a daemon that did not stop cleanly.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| DaemonError::Io {
        action: "bind the control socket",
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        DaemonError::Io {
            action: "set the mode of",
            path: path.to_path_buf(),
            source,
        }
    })?;
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(|e| {
            DaemonError::Io {
                action: "set the group of",
                path: path.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    Ok(listener)
}

/// Root, the daemon's own user, and members of the socket group may talk to the daemon.
fn peer_allowed(uid: u32, gid: u32, pid: Option<i32>, allowed_gid: Option<u32>) -> bool {
    if uid == 0 || uid == rustix::process::geteuid().as_raw() {
        return true;
    }
    let Some(allowed) = allowed_gid else {
        return false;
    };
    if gid == allowed {
        return true;
    }
    // Supplementary groups of the peer process.
    pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .any(|g| g.parse::<u32>() == Ok(allowed))
            })
        })
        .unwrap_or(false)
}

/// Connections served at once, per pool (root, everyone else). Each holds one fd.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request line after connecting.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per this long for a repeated connection problem.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs a repeated event at most once per [`LOG_EVERY`], with how often it happened.
#[derive(Default)]
struct RateLimited {
    last: Option<std::time::Instant>,
    count: u64,
}

impl RateLimited {
    fn note(&mut self, log: impl FnOnce(u64)) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            log(self.count);
            self.count = 0;
            self.last = Some(std::time::Instant::now());
        }
    }
}

/// Answers a connection over the cap, briefly, without reading it.
async fn refuse_busy(stream: UnixStream) {
    let (_r, mut w) = stream.into_split();
    refuse(
        &mut w,
        format!(
            "the bgagent daemon is serving {MAX_CONNECTIONS} connections already; try again shortly"
        ),
    )
    .await;
}

/// Ends a connection with a refusal the peer can read; a peer that does not read gets 1 s.
async fn refuse(w: &mut (impl AsyncWriteExt + Unpin), summary: String) {
    let reply = Reply::Done {
        outcome: protocol::Outcome::Refused,
        summary,
        data: None,
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), send(w, &reply)).await;
}

fn no_request_within() -> String {
    format!(
        "no request within {} s of connecting; connection closed",
        REQUEST_READ_TIMEOUT.as_secs()
    )
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> bool {
    let mut line = match serde_json::to_vec(reply) {
        Ok(l) => l,
        Err(_) => return false,
    };
    line.push(b'\n');
    // A client that stops reading must not hold its connection (and the log stream) open.
    matches!(
        tokio::time::timeout(Duration::from_secs(10), w.write_all(&line)).await,
        Ok(Ok(()))
    )
}

/// The first bytes a client sent, with any file descriptors passed along (SCM_RIGHTS):
/// `bgagent deploy` passes the artifact it opened as itself.
async fn recv_first(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<std::os::fd::OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        stream.readable().await?;
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            rustix::net::recvmsg(
                stream,
                &mut [std::io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)
        });
        match got {
            Ok(msg) => {
                let mut fds = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(rights) = m {
                        fds.extend(rights);
                    }
                }
                buf.truncate(msg.bytes);
                return Ok((buf, fds));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) {
    let cred = stream.peer_cred().ok();
    let allowed = cred
        .map(|c| peer_allowed(c.uid(), c.gid(), c.pid(), shared.allowed_gid))
        .unwrap_or(false);
    // The request's first bytes (and a passed artifact), under the request deadline.
    let first = if allowed {
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, recv_first(&stream)).await {
            Ok(Ok(first)) => Some(first),
            Ok(Err(_)) => return,
            Err(_) => None,
        }
    } else {
        Some((Vec::new(), Vec::new()))
    };
    let (r, mut w) = stream.into_split();
    let Some((first, mut passed)) = first else {
        refuse(&mut w, no_request_within()).await;
        return;
    };
    if !allowed {
        warn!(
            "refused a connection from uid {:?}: only root and members of the socket group may use bgagent",
            cred.map(|c| c.uid())
        );
        // Take the request off the wire first (bounded in size and time), so the peer can
        // read the reason instead of failing its write with a broken pipe.
        let mut reader = BufReader::new(r.take(protocol::MAX_REQUEST_BYTES as u64));
        let mut sink = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut sink)).await;
        refuse(
            &mut w,
            "permission denied: only root and members of the bgagent socket group may use the daemon".into(),
        )
        .await;
        return;
    }
    let mut reader = BufReader::new(
        std::io::Cursor::new(first).chain(r.take(protocol::MAX_REQUEST_BYTES as u64)),
    );
    let mut line = String::new();
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return,
        Err(_) => {
            refuse(&mut w, no_request_within()).await;
            return;
        }
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut w,
                &Reply::Done {
                    outcome: protocol::Outcome::Refused,
                    summary: format!("malformed request: {e}"),
                    data: None,
                },
            )
            .await;
            return;
        }
    };
    // `deploy` reads the artifact the client opened as itself, never a path as root.
    let mut request = request;
    let mut keep_open = None;
    if let Request::Deploy { artifact } = &mut request {
        let peer = cred
            .map(|c| crate::peer::Peer::of(c.uid(), c.gid(), c.pid()))
            .unwrap_or(crate::peer::Peer {
                uid: u32::MAX,
                gids: vec![],
            });
        let refuse = |summary: String| Reply::Done {
            outcome: protocol::Outcome::Refused,
            summary,
            data: None,
        };
        match passed.drain(..).next() {
            None if !peer.is_root() => {
                let _ = send(&mut w, &refuse(format!(
                    "uid {}: `bgagent deploy` must pass the artifact as an open file, so the daemon reads only what the caller can; use the bgagent client of this version",
                    peer.uid
                ))).await;
                return;
            }
            None => {}
            Some(fd) => {
                let shown = artifact.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    crate::peer::check_passed(&fd, &peer, &shown).map(|_| fd)
                })
                .await;
                match checked {
                    Ok(Ok(fd)) => {
                        use std::os::fd::AsRawFd;
                        // Read through the passed descriptor; it stays open for the request.
                        *artifact = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                        keep_open = Some(fd);
                    }
                    Ok(Err(msg)) => {
                        warn!("{msg}");
                        let _ = send(&mut w, &refuse(msg)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = send(&mut w, &refuse(format!("internal error: {e}"))).await;
                        return;
                    }
                }
            }
        }
    }
    // A hook ends before its result when CodeDeploy kills it at its timeout: the event must
    // then not be recorded a success (CodeDeploy records it failed). The hook closes its end
    // (or sends a line) and the engine cancels at its next safe point.
    let cancel = Arc::new(AtomicBool::new(false));
    let watcher = matches!(request, Request::Hook { .. }).then(|| {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut sink = String::new();
            let _ = reader.read_line(&mut sink).await;
            cancel.store(true, Ordering::SeqCst);
        })
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let stream_reg = Stream::register(tx.clone());
    let work = {
        let shared = shared.clone();
        let span = match &request {
            // The event's own span (events::Engine) carries DEPLOYMENT_ID and LIFECYCLE_EVENT.
            Request::Hook { .. } => info_span!("hook", stream = stream_reg.id),
            Request::Deploy { artifact } => {
                info_span!("deploy", stream = stream_reg.id, artifact = %crate::text::path(artifact))
            }
            Request::Rollback { .. } => info_span!("rollback", stream = stream_reg.id),
            Request::Status => info_span!("status", stream = stream_reg.id),
        };
        tokio::spawn(
            async move {
                let reply = serve(request, shared, cancel).await;
                drop(keep_open);
                reply
            }
            .instrument(span),
        )
    };
    // Forward log lines until the work is done; a client that goes away does not stop the
    // work (CodeDeploy may time out the hook, but a half-done event is worse).
    let mut work = work;
    let mut client_alive = true;
    let done = loop {
        tokio::select! {
            Some(reply) = rx.recv() => {
                if client_alive && !send(&mut w, &reply).await {
                    client_alive = false;
                }
            }
            res = &mut work => break res,
        }
    };
    drop(stream_reg);
    if let Some(w) = watcher {
        w.abort();
    }
    while let Ok(reply) = rx.try_recv() {
        if client_alive && !send(&mut w, &reply).await {
            client_alive = false;
        }
    }
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            error!("request handler failed: {e}");
            Reply::Done {
                outcome: protocol::Outcome::Failed,
                summary: format!("internal error in bgagent: {e}"),
                data: None,
            }
        }
    };
    if client_alive {
        let _ = send(&mut w, &done).await;
    }
}

fn reply_of(o: Outcome, data: Option<serde_json::Value>) -> Reply {
    let outcome = match &o {
        Outcome::Succeeded(_) => protocol::Outcome::Succeeded,
        Outcome::AlreadyDone(_) => protocol::Outcome::AlreadyDone,
        Outcome::Failed(_) => protocol::Outcome::Failed,
        Outcome::Refused(_) => protocol::Outcome::Refused,
    };
    Reply::Done {
        outcome,
        summary: o.summary().to_string(),
        data,
    }
}

async fn serve(request: Request, shared: Arc<Shared>, cancel: Arc<AtomicBool>) -> Reply {
    if let Request::Status = request {
        // Answered from the state file (saved after every step), so status works while an
        // event runs.
        return match crate::state::read(&shared.state_dir) {
            Ok(doc) => {
                let procs = shared
                    .processes
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default();
                let status = crate::status::build(
                    &doc,
                    &shared.layout,
                    &shared.state_dir,
                    Some(shared.readiness.snapshot()),
                    true,
                    &procs,
                );
                reply_of(Outcome::Succeeded("status".into()), Some(status))
            }
            Err(e) => reply_of(Outcome::Failed(e.to_string()), None),
        };
    }
    let mut engine = match shared.engine.try_lock() {
        Ok(g) => g,
        Err(_) => {
            let holder = shared.holder.lock().ok().and_then(|h| h.clone());
            match holder {
                Some((what, since)) => info!(
                    "another request is running ({what}, for {} s); waiting for it to finish",
                    since.elapsed().as_secs()
                ),
                None => info!("another request is running; waiting for it to finish"),
            }
            shared.engine.lock().await
        }
    };
    if let Ok(mut h) = shared.holder.lock() {
        *h = Some((holding(&request), std::time::Instant::now()));
    }
    let outcome = match request {
        Request::Hook { event, env } => match Event::parse(&event) {
            Err(e) => Outcome::Refused(e.to_string()),
            Ok(ev) => match HookEnv::from_map(&env) {
                Err(e) => {
                    error!("{e}");
                    Outcome::Refused(e)
                }
                Ok(henv) => engine.run_hook(ev, &henv, Some(cancel)).await,
            },
        },
        Request::Deploy { artifact } => engine.deploy_artifact(&artifact).await,
        Request::Rollback { from } => engine.rollback(from.as_deref()).await,
        // Answered above, without the work lock.
        Request::Status => Outcome::Failed("status is not a work request".into()),
    };
    shared.readiness.set_status(engine.status(None, true));
    if let Ok(mut h) = shared.holder.lock() {
        *h = None;
    }
    reply_of(outcome, None)
}

/// A request as the waiting message names it.
fn holding(request: &Request) -> String {
    match request {
        Request::Hook { event, env } => format!(
            "{} of deployment {}",
            crate::lifecycle::Event::parse(event).map_or("an unknown event", |e| e.name()),
            env.get("DEPLOYMENT_ID")
                .filter(|id| crate::events::check_id("DEPLOYMENT_ID", id).is_ok())
                .map_or("-", String::as_str)
        ),
        Request::Deploy { artifact } => format!("bgagent deploy {}", crate::text::path(artifact)),
        Request::Rollback { .. } => "bgagent rollback".into(),
        Request::Status => "status".into(),
    }
}

/// How long a client waits to connect before it says the daemon is unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
