//! Routes log lines to the client that asked for the work.
//!
//! The daemon runs each request inside a tracing span carrying a `stream` id. This layer
//! forwards every event recorded inside such a span (from any module, any task the span was
//! passed to) to the channel registered under that id, so `bgagent hook` prints the daemon's
//! log lines for its event as they happen, while the same lines also go to the journal.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc::UnboundedSender;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::protocol::Reply;

type Sinks = Mutex<HashMap<u64, UnboundedSender<Reply>>>;

fn sinks() -> &'static Sinks {
    static SINKS: OnceLock<Sinks> = OnceLock::new();
    SINKS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registration of one client's channel; unregistered on drop.
pub struct Stream {
    pub id: u64,
}

impl Stream {
    pub fn register(tx: UnboundedSender<Reply>) -> Stream {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = sinks().lock() {
            m.insert(id, tx);
        }
        Stream { id }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(mut m) = sinks().lock() {
            m.remove(&self.id);
        }
    }
}

struct StreamId(u64);

#[derive(Default)]
struct Fields {
    stream: Option<u64>,
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "stream" {
            self.stream = Some(value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
}

/// The tracing layer; add it to the daemon's subscriber.
pub struct StreamLayer;

impl<S> Layer<S> for StreamLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let (Some(sid), Some(span)) = (f.stream, ctx.span(id)) {
            span.extensions_mut().insert(StreamId(sid));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let ext = span.extensions();
            let Some(StreamId(sid)) = ext.get::<StreamId>() else {
                continue;
            };
            let reply = if crate::progress::is_progress(event.metadata()) {
                let mut f = crate::progress::Fields::default();
                event.record(&mut f);
                Reply::Progress(f.0)
            } else {
                log_reply(event)
            };
            if let Ok(m) = sinks().lock()
                && let Some(tx) = m.get(sid)
            {
                let _ = tx.send(reply);
            }
            return;
        }
    }
}

fn log_reply(event: &Event<'_>) -> Reply {
    let mut f = Fields::default();
    event.record(&mut f);
    let message = format!("{}{}", f.message, f.rest);
    Reply::Log {
        ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        level: event.metadata().level().to_string(),
        message,
    }
}
