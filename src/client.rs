//! The client side of the control socket, used by `hook`, `deploy`, `rollback` and
//! `status`: send one request, print the daemon's log lines as they arrive, return the final
//! reply. Blocking std I/O: a hook with nothing to do should cost milliseconds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{Outcome, Reply, Request};
use crate::text::truncate;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the bgagent daemon is not reachable at {path}: {source}. Is it running? Check `systemctl status bgagent` and `journalctl -u bgagent`"
    )]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "permission denied on the bgagent socket {path}: is this user in group {group}? (add it with `usermod -aG {group} USER`, then log in again; root may always connect)"
    )]
    PermissionDenied { path: PathBuf, group: String },
    #[error(
        "lost the connection to the bgagent daemon before it reported a result ({0}); the event may still be running or may have been interrupted: see `bgagent status`"
    )]
    ConnectionLost(String),
}

impl ClientError {
    /// Whether nothing listens on the socket (as opposed to a denied or broken connection).
    pub fn is_absent(&self) -> bool {
        matches!(self, ClientError::Unreachable { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// The final reply, with the error and warning lines seen on the way (for the summary).
pub struct Finished {
    pub outcome: Outcome,
    pub summary: String,
    pub data: Option<serde_json::Value>,
    pub problems: Vec<String>,
}

pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            // The socket's group (or, if its directory is what denied, the directory's).
            let gid = std::fs::metadata(path)
                .or_else(|_| std::fs::metadata(path.parent().unwrap_or(Path::new("/"))))
                .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
                .ok();
            return ClientError::PermissionDenied {
                path: path.to_path_buf(),
                group: gid
                    .map(crate::perms::group_name)
                    .unwrap_or_else(|| "of the socket".into()),
            };
        }
        ClientError::Unreachable {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Sends `req` and calls `on_log(level, line)` for each log line until the final reply.
pub fn request(
    path: &Path,
    req: &Request,
    on_log: impl FnMut(&str, &str),
) -> Result<Finished, ClientError> {
    request_with_fd(path, req, None, on_log)
}

/// As [`request`], passing `fd` (the artifact this user opened) along with the request.
pub fn request_with_fd(
    path: &Path,
    req: &Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    mut on_log: impl FnMut(&str, &str),
) -> Result<Finished, ClientError> {
    let mut stream = connect(path)?;
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut line =
        serde_json::to_vec(req).map_err(|e| ClientError::ConnectionLost(e.to_string()))?;
    line.push(b'\n');
    // A daemon that refuses this peer answers without reading the request: a failed write
    // (broken pipe) is then not the story, the reply already sent is.
    let write_err = send_with_fd(&mut stream, &line, fd).err();
    let _ = stream.set_read_timeout(write_err.as_ref().map(|_| Duration::from_secs(5)));
    let mut problems = Vec::new();
    // A line that may close the event (an ERROR, or "X succeeded in ...") is held until the
    // next line: when the summary says the same, it is printed once, there (the
    // 2048-character tail).
    let mut held: Option<(String, String, String)> = None;
    // Progress bars on a terminal only; lines are printed above them.
    let mut term = crate::progress::Terminal::for_this_process();
    let reader = BufReader::new(stream);
    for l in reader.lines() {
        let l = match (l, &write_err) {
            (Ok(l), _) => l,
            (Err(_), Some(w)) => return Err(ClientError::ConnectionLost(w.to_string())),
            (Err(e), None) => return Err(ClientError::ConnectionLost(e.to_string())),
        };
        match serde_json::from_str::<Reply>(&l) {
            Ok(Reply::Log { ts, level, message }) => {
                if let Some((level, _, shown)) = held.take() {
                    term.above(|| on_log(&level, &shown));
                }
                let time = ts.get(11..23).unwrap_or(&ts);
                let shown = format!("{time} {level:<5} {message}");
                if level == "ERROR" || level == "WARN" {
                    problems.push(format!("{level}: {message}"));
                }
                if closes_event(&level, &message) {
                    held = Some((level, message, shown));
                } else {
                    term.above(|| on_log(&level, &shown));
                }
            }
            Ok(Reply::Progress(p)) => term.show(&p),
            Ok(Reply::Done {
                outcome,
                summary,
                data,
            }) => {
                term.clear();
                if let Some((level, message, shown)) = held.take()
                    && message != summary
                {
                    term.above(|| on_log(&level, &shown));
                }
                return Ok(Finished {
                    outcome,
                    summary,
                    data,
                    problems,
                });
            }
            Err(e) => {
                return Err(ClientError::ConnectionLost(format!(
                    "unreadable reply: {e}"
                )));
            }
        }
    }
    Err(ClientError::ConnectionLost(match write_err {
        Some(w) => w.to_string(),
        None => "the daemon closed the connection".into(),
    }))
}

/// Whether a log line may be the event's closing line, which the summary repeats.
fn closes_event(level: &str, message: &str) -> bool {
    level == "ERROR" || (level == "INFO" && message.contains(" succeeded in "))
}

/// Writes `line`, the first bytes with `fd` attached (SCM_RIGHTS).
fn send_with_fd(
    stream: &mut UnixStream,
    line: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return stream.write_all(line);
    };
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let n = rustix::net::sendmsg(
        &*stream,
        &[std::io::IoSlice::new(line)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    stream.write_all(&line[n..])
}

/// The hook's closing block. CodeDeploy shows only the last 2048 characters of a hook's
/// output, so this must say what failed and why within them.
pub fn summary_block(event: &str, deployment: &str, f: &Finished, exit_code: i32) -> String {
    const BUDGET: usize = 1900;
    let verdict = match f.outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::AlreadyDone => "succeeded (already done)",
        Outcome::Failed => "FAILED",
        Outcome::Refused => "REFUSED",
    };
    let mut out =
        format!("bgagent: {event} {verdict} for deployment {deployment} (exit {exit_code})\n");
    out.push_str(&truncate(&f.summary, 900));
    out.push('\n');
    if !matches!(f.outcome, Outcome::Succeeded | Outcome::AlreadyDone) {
        // The problems the summary does not already tell, each once, the last first (they
        // are usually the cause). A problem is told when the summary holds its text or its
        // detail (the part after `what: `), as a health check's evidence does.
        let told = |p: &str| {
            let msg = p.split_once(": ").map_or(p, |(_, m)| m);
            f.summary.contains(msg)
                || msg
                    .split_once(": ")
                    .is_some_and(|(_, detail)| f.summary.contains(detail))
        };
        let mut seen = std::collections::HashSet::new();
        let mut tail = String::new();
        for p in f
            .problems
            .iter()
            .rev()
            .filter(|p| !told(p))
            .filter(|p| seen.insert(p.as_str()))
            .take(4)
        {
            let p = truncate(p, 300);
            if out.len() + tail.len() + p.len() + 4 > BUDGET {
                break;
            }
            tail = format!("  {p}\n{tail}");
        }
        out.push_str(&tail);
    }
    truncate(&out, BUDGET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_fits_codedeploys_window_and_names_the_failure() {
        let f = Finished {
            outcome: Outcome::Failed,
            summary: format!("AfterInstall FAILED after 1.00s: {}", "x".repeat(5000)),
            data: None,
            problems: vec![
                "WARN: disk is small".into(),
                "ERROR: php -l reported a syntax error".into(),
            ],
        };
        let s = summary_block("AfterInstall", "d-ABC", &f, 1);
        assert!(s.len() <= 2048);
        assert!(s.starts_with("bgagent: AfterInstall FAILED for deployment d-ABC (exit 1)"));
        assert!(s.contains("php -l reported a syntax error"));
    }

    /// Regression: a failed ValidateService's tail held the health evidence (in the summary)
    /// followed by four identical WARN lines that repeated it, pushing the event header out
    /// of the 2048 characters CodeDeploy shows.
    #[test]
    fn the_tail_tells_each_problem_once_and_not_what_the_summary_says() {
        let detail = "http://127.0.0.1/health_check.php answered 500 (expected [200]): db down";
        let f = Finished {
            outcome: Outcome::Failed,
            summary: format!(
                "ValidateService FAILED after 3.10s: health checks did not pass:\n  app:\n    +2900ms FAIL (3 ms) {detail}\n"
            ),
            data: None,
            problems: [
                vec!["WARN: disk is small".to_string()],
                vec![format!("WARN: health check app failed: {detail}"); 4],
                vec!["WARN: something else".to_string(); 2],
            ]
            .concat(),
        };
        let s = summary_block("ValidateService", "d-ABC", &f, 1);
        assert_eq!(s.matches(detail).count(), 1, "{s}");
        assert_eq!(s.matches("something else").count(), 1, "{s}");
        assert!(s.contains("disk is small"), "{s}");
        assert!(s.starts_with("bgagent: ValidateService FAILED for deployment d-ABC"));
    }
}
