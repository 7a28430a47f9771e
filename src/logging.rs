//! Logs: one JSON object per line for Cloud Logging (`severity`, `message`, `time`,
//! then the event's and its spans' fields), or human-readable text.
//!
//! Invariant: logs go to stderr, so command output on stdout (`runnel check`) stays clean.

use std::{fmt, time::SystemTime};

use serde_json::{Map, Value};
use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{JsonFields, Writer},
    },
    registry::LookupSpan,
};

use crate::{config::LogFormat, tls};

/// Parses a `RUNNEL_LOG` filter. Field values match literally, not as regular
/// expressions: a pattern like `[{a=.*a.........}]` would otherwise compile to an
/// automaton that takes seconds and gigabytes at start-up.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    EnvFilter::builder().with_regex(false).parse(filter)
}

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(filter: &str, format: LogFormat, access_log: bool) {
    let mut filter = parse_filter(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    if access_log {
        // The access log is on whatever RUNNEL_LOG says about the rest.
        if let Ok(directive) = format!("{}=info", crate::tunnel::ACCESS_LOG_TARGET).parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(CloudJson)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
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
    let secs = tls::rfc3339(i64::try_from(now.as_secs()).unwrap_or(0));
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
    fn filter_field_values_are_literal_not_regular_expressions() {
        // As a regular expression this takes minutes and gigabytes to compile.
        let bomb = format!("[{{a=.*a{}}}]", ".".repeat(24));
        assert!(parse_filter(&bomb).is_ok());
        assert!(parse_filter("runnel=debug,warn").is_ok());
        assert!(parse_filter("runnel=loud").is_err());
    }
}
