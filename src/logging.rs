//! Logs: one JSON object per line for Cloud Logging (`severity`, `message`, `time`,
//! then the event's and its spans' fields), or human-readable text; written off the
//! data path, and repeated warnings rate-limited.
//!
//! Invariant: logs go to stderr, so command output on stdout (`runnel check`) stays
//! clean; and no thread that moves bytes ever waits on stderr: lines go through a
//! bounded queue to a writer thread, and a full queue drops the line and counts it.

use std::{
    fmt, io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Map, Value};
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
        format::{JsonFields, Writer},
    },
    registry::LookupSpan,
};

use crate::{
    config::{self, LogFormat},
    material, metrics,
};

/// The tracing target of access-log lines (`RUNNEL_ACCESS_LOG=on` enables it).
pub const ACCESS_LOG_TARGET: &str = "runnel::access";
/// Lines waiting for stderr, at most. A JSON line is ~300 bytes, so the queue holds
/// ~1.2 MB at worst (inside the memory base the connection limit leaves free), and
/// several seconds of the rate-limited warnings of an outage.
pub const QUEUED_LINES: usize = 4096;
/// A repeated warning is written at most once per this interval and kind.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps the log writer thread; dropping it flushes the lines still queued.
#[must_use = "dropping it stops the log writer"]
pub struct Logs {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing,
/// and their `Logs` hold nothing).
pub fn init(filter: &str, format: LogFormat, access_log: bool) -> Logs {
    let mut filter = config::parse_filter(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    if access_log {
        // The access log is on whatever RUNNEL_LOG says about the rest.
        if let Ok(directive) = format!("{ACCESS_LOG_TARGET}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    // tracing-appender: the tokio project's own non-blocking writer, a bounded
    // crossbeam channel to one thread, with a lossy mode and a dropped-line counter;
    // what this needs and nothing more.
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("runnel-log")
        .finish(io::stderr());
    let writer = Counted::new(writer);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(CloudJson)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    Logs {
        _worker: installed.is_ok().then_some(worker),
    }
}

/// One line per interval for each kind of a repeated warning; the lines in between
/// are counted, and the next line written says how many were suppressed.
pub struct RateLimit {
    interval: Duration,
    /// (kind, when the next line may be written, lines suppressed since the last one).
    /// Kinds are bounded labels, a handful: a list scans faster than a map hashes.
    kinds: Mutex<Vec<(&'static str, Instant, u64)>>,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            kinds: Mutex::new(Vec::new()),
        }
    }

    /// `Some(suppressed)` when a line of this kind may be written now (with the number
    /// suppressed since the last one); `None` when this one is to be suppressed.
    pub fn check(&self, kind: &'static str) -> Option<u64> {
        self.check_at(kind, Instant::now())
    }

    fn check_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = kinds.iter_mut().find(|(k, _, _)| *k == kind) else {
            kinds.push((kind, now + self.interval, 0));
            return Some(0);
        };
        if now < entry.1 {
            entry.2 += 1;
            return None;
        }
        entry.1 = now + self.interval;
        Some(std::mem::take(&mut entry.2))
    }
}

/// The non-blocking writer, counting the lines its full queue dropped in
/// `runnel_log_lines_dropped_total`.
#[derive(Clone)]
struct Counted {
    inner: NonBlocking,
    /// The queue's own count of dropped lines.
    dropped: ErrorCounter,
    /// Dropped lines already counted in the metric.
    counted: Arc<AtomicUsize>,
}

impl Counted {
    fn new(inner: NonBlocking) -> Counted {
        Counted {
            dropped: inner.error_counter(),
            inner,
            counted: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl io::Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        // The counter only grows; fetch_max hands each increase to one writer.
        let dropped = self.dropped.dropped_lines();
        let before = self.counted.fetch_max(dropped, Ordering::Relaxed);
        if dropped > before {
            ::metrics::counter!(metrics::LOG_LINES_DROPPED).increment((dropped - before) as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<'a> MakeWriter<'a> for Counted {
    type Writer = Counted;

    fn make_writer(&'a self) -> Counted {
        self.clone()
    }
}

/// The Cloud Logging JSON line format.
struct CloudJson;

impl<S, N> FormatEvent<S, N> for CloudJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        fields.insert(
            "severity".into(),
            severity(*event.metadata().level()).into(),
        );
        fields.insert("time".into(), now_rfc3339().into());
        fields.insert("message".into(), Value::String(String::new()));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(formatted) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(span_fields)) =
                    serde_json::from_str::<Value>(formatted.as_str())
                {
                    fields.extend(span_fields);
                }
            }
        }
        event.record(&mut Visitor(&mut fields));
        if fields.get("message").is_some_and(|m| m == "") {
            fields.insert("message".into(), event.metadata().target().into());
        }
        let line = serde_json::to_string(&fields).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

fn severity(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = material::rfc3339(i64::try_from(now.as_secs()).unwrap_or(0));
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), now.subsec_millis())
}

struct Visitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_written_once_per_interval_with_the_count_suppressed() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.check_at("connect", t0), Some(0));
        for i in 1..=99 {
            assert_eq!(
                limit.check_at("connect", t0 + Duration::from_millis(i)),
                None
            );
        }
        // Another kind has its own interval.
        assert_eq!(limit.check_at("timeout", t0), Some(0));
        assert_eq!(
            limit.check_at("connect", t0 + Duration::from_secs(10)),
            Some(99)
        );
        assert_eq!(
            limit.check_at("connect", t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            limit.check_at("connect", t0 + Duration::from_secs(20)),
            Some(1)
        );
    }
}
