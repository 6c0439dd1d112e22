//! Progress of the long steps (intake, health waits, drain) for a person at a terminal.
//!
//! Work reports progress as tracing events with the target [`TARGET`], from inside the
//! request's span like every log line. They never become log lines: the journal and plain
//! output filter them out ([`is_progress`]), the daemon's stream layer turns them into
//! `progress` replies for the client, and a client whose stdout and stderr are terminals
//! draws them with indicatif on stderr ([`Terminal`]). CodeDeploy (stdout a file) and
//! journald see plain lines only.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// The tracing target of progress events.
pub const TARGET: &str = "bgagent::progress";

/// One progress report: `done` of `total` (if known) `unit`s of `task`, and a short note.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Progress {
    pub task: String,
    pub done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `files`, `ms`, ...
    pub unit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Whether a tracing event is a progress report (not a log line).
pub fn is_progress(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == TARGET
}

/// Reports the progress of one task, at most every [`Meter::EVERY`], and always at the end.
pub struct Meter {
    task: &'static str,
    unit: &'static str,
    total: Option<u64>,
    last: Option<Instant>,
}

impl Meter {
    pub const EVERY: Duration = Duration::from_millis(150);

    pub fn new(task: &'static str, unit: &'static str, total: Option<u64>) -> Meter {
        Meter {
            task,
            unit,
            total,
            last: None,
        }
    }

    /// Reports `done` (and `note`) if the last report is old enough.
    pub fn update(&mut self, done: u64, note: &str) {
        if self.last.is_some_and(|l| l.elapsed() < Self::EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        self.emit(done, note);
    }

    /// The final report: a client's bar for this task ends here.
    pub fn finish(self, done: u64, note: &str) {
        // done == total tells the client this task is over, also when it ended early (a
        // drain before its bound) or the total was unknown.
        Meter {
            total: Some(done),
            ..self
        }
        .emit(done, note);
    }

    fn emit(&self, done: u64, note: &str) {
        tracing::info!(
            target: TARGET,
            task = self.task,
            done,
            total = self.total,
            unit = self.unit,
            note,
        );
    }
}

/// Reads a progress event's fields.
#[derive(Default)]
pub struct Fields(pub Progress);

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        match field.name() {
            "done" => self.0.done = value,
            "total" => self.0.total = Some(value),
            _ => {}
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "task" => self.0.task = value.to_string(),
            "unit" => self.0.unit = value.to_string(),
            "note" => self.0.note = value.to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

/// What a terminal shows: one bar (or spinner) for the task in progress, with log lines
/// printed above it. Does nothing unless stdout and stderr are both terminals.
pub struct Terminal {
    bar: Option<(String, ProgressBar)>,
    enabled: bool,
}

impl Terminal {
    pub fn for_this_process() -> Terminal {
        use std::io::IsTerminal;
        Terminal {
            bar: None,
            enabled: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
        }
    }

    /// Shows `p`; a report of a new task replaces the bar, a finished one clears it.
    pub fn show(&mut self, p: &Progress) {
        if !self.enabled {
            return;
        }
        if self.bar.as_ref().is_none_or(|(t, _)| *t != p.task) {
            self.clear();
            let bar = match p.total {
                Some(total) => ProgressBar::with_draw_target(
                    Some(total),
                    ProgressDrawTarget::stderr_with_hz(8),
                )
                .with_style(
                    ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                ),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(8))
                    .with_style(
                        ProgressStyle::with_template("{prefix:>8} {spinner} {pos} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    ),
            };
            bar.set_prefix(p.task.clone());
            // Drawn at least once, even when the task is over with its first report.
            bar.tick();
            self.bar = Some((p.task.clone(), bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_position(p.done);
            bar.set_message(format!("{} {}", p.unit, p.note));
            if p.total.is_some_and(|t| p.done >= t) {
                self.clear();
            }
        }
    }

    /// Runs `print` (which writes a log line) with the bar out of the way.
    pub fn above(&self, print: impl FnOnce()) {
        match &self.bar {
            Some((_, bar)) => bar.suspend(print),
            None => print(),
        }
    }

    pub fn clear(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.clear();
    }
}

/// For commands that do the work in this process (`bgagent deploy` without a daemon): the
/// progress events drawn on this terminal, and the log lines written above the bar.
#[derive(Clone)]
pub struct Local(std::sync::Arc<std::sync::Mutex<Terminal>>);

impl Local {
    pub fn for_this_process() -> Local {
        Local(std::sync::Arc::new(std::sync::Mutex::new(
            Terminal::for_this_process(),
        )))
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Local {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if is_progress(event.metadata()) {
            let mut f = Fields::default();
            event.record(&mut f);
            if let Ok(mut t) = self.0.lock() {
                t.show(&f.0);
            }
        }
    }
}

/// A log line for stdout, written above the bar when the writer is dropped.
pub struct LineAbove {
    term: Local,
    buf: Vec<u8>,
}

impl std::io::Write for LineAbove {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineAbove {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let print = || {
            let mut out = std::io::stdout().lock();
            let _ = std::io::Write::write_all(&mut out, &buf);
            let _ = std::io::Write::flush(&mut out);
        };
        match self.term.0.lock() {
            Ok(t) => t.above(print),
            Err(_) => print(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Local {
    type Writer = LineAbove;
    fn make_writer(&'a self) -> LineAbove {
        LineAbove {
            term: self.clone(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_reply_round_trips_and_omits_what_is_unknown() {
        let p = Progress {
            task: "intake".into(),
            done: 12,
            total: None,
            unit: "files".into(),
            note: String::new(),
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(s, r#"{"task":"intake","done":12,"unit":"files"}"#);
        assert_eq!(serde_json::from_str::<Progress>(&s).unwrap(), p);
    }

    #[test]
    fn a_terminal_that_is_not_one_draws_nothing() {
        let mut t = Terminal {
            bar: None,
            enabled: false,
        };
        t.show(&Progress {
            task: "drain".into(),
            done: 1,
            total: Some(10),
            ..Progress::default()
        });
        assert!(t.bar.is_none());
    }
}
