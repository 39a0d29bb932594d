//! The log line format: time (RFC 3339, UTC, microseconds), level, target, message and
//! fields (the event's, then those of the spans it is in, outermost first), as
//! `key=value` text or as one flat JSON object per line.
//!
//! The same layout tracing-subscriber's `fmt` and `fmt().json().flatten_event(true)`
//! write, produced with less work: their visitors format every field through `Debug`
//! and a chain of writers, about 13k instructions per request line (callgrind), ~9% of a
//! cache miss. Here plain strings and numbers are copied straight into the line and only
//! what needs escaping is escaped.

use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Renders span fields as the line format writes event fields, so an event's line can
/// carry the fields of its spans; install it with `fmt_fields` beside [`LineFormat`].
#[derive(Debug, Clone, Copy)]
pub struct LineFields {
    json: bool,
}

impl LineFields {
    /// ` key="value"` text.
    pub fn text() -> LineFields {
        LineFields { json: false }
    }

    /// `,"key":"value"` members of a JSON object.
    pub fn json() -> LineFields {
        LineFields { json: true }
    }
}

impl<'writer> FormatFields<'writer> for LineFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = Fields {
            out: &mut writer,
            json: self.json,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    /// Appends fields recorded later: each starts with its own separator.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        self.format_fields(current.as_writer(), fields)
    }
}

/// Formats events as text or JSON lines, with the fields of their spans.
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    json: bool,
}

impl LineFormat {
    /// `2026-01-02T03:04:05.123456Z  INFO target: message key="value" n=1`
    pub fn text() -> LineFormat {
        LineFormat { json: false }
    }

    /// `{"timestamp":"...","level":"INFO","message":"...","key":"value","target":"..."}`
    pub fn json() -> LineFormat {
        LineFormat { json: true }
    }
}

impl<S> FormatEvent<S, LineFields> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, LineFields>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let timestamp = timestamp(SystemTime::now());
        let timestamp = std::str::from_utf8(&timestamp).unwrap_or("-");
        if self.json {
            out.write_str("{\"timestamp\":\"")?;
            out.write_str(timestamp)?;
            out.write_str("\",\"level\":\"")?;
            out.write_str(meta.level().as_str())?;
            out.write_char('"')?;
            record_fields(&mut out, event, true)?;
            span_fields(&mut out, ctx)?;
            if let Some(id) = super::scope::current_trace_id() {
                write!(out, ",\"trace_id\":\"{id}\"")?;
            }
            out.write_str(",\"target\":")?;
            write_json_str(&mut out, meta.target())?;
            out.write_str("}\n")
        } else {
            out.write_str(timestamp)?;
            out.write_str(match *meta.level() {
                Level::ERROR => " ERROR ",
                Level::WARN => "  WARN ",
                Level::INFO => "  INFO ",
                Level::DEBUG => " DEBUG ",
                Level::TRACE => " TRACE ",
            })?;
            out.write_str(meta.target())?;
            out.write_char(':')?;
            record_fields(&mut out, event, false)?;
            span_fields(&mut out, ctx)?;
            if let Some(id) = super::scope::current_trace_id() {
                write!(out, " trace_id={id}")?;
            }
            out.write_char('\n')
        }
    }
}

/// Writes the fields of the spans the event is in, outermost first, as [`LineFields`]
/// rendered them when each span was made.
fn span_fields<S>(out: &mut Writer<'_>, ctx: &FmtContext<'_, S, LineFields>) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let Some(scope) = ctx.event_scope() else {
        return Ok(());
    };
    for span in scope.from_root() {
        if let Some(fields) = span.extensions().get::<FormattedFields<LineFields>>() {
            out.write_str(fields)?;
        }
    }
    Ok(())
}

/// Writes the fields of `event` in the text or JSON form.
fn record_fields(out: &mut Writer<'_>, event: &Event<'_>, json: bool) -> fmt::Result {
    let mut fields = Fields {
        out,
        json,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result
}

/// An event's fields: ` key=value` text (strings quoted and escaped as `Debug` does, the
/// message bare) or `,"key":value` members of a flat JSON object.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    json: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>, bool) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let (out, json) = (&mut *self.out, self.json);
        self.result = (|| {
            if json {
                out.write_char(',')?;
                write_json_str(out, field.name())?;
                out.write_char(':')?;
            } else {
                out.write_char(' ')?;
                if field.name() != "message" {
                    out.write_str(field.name())?;
                    out.write_char('=')?;
                }
            }
            value(out, json)
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out, json| {
            if json {
                write_json_str(out, value)
            } else if value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
            {
                out.write_char('"')?;
                out.write_str(value)?;
                out.write_char('"')
            } else {
                write!(out, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out, _| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out, _| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out, json| {
            if json && !value.is_finite() {
                out.write_str("null")
            } else {
                write!(out, "{value:?}")
            }
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out, _| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out, json| {
            if json {
                out.write_char('"')?;
                write!(JsonEscaped(out), "{value:?}")?;
                out.write_char('"')
            } else {
                write!(out, "{value:?}")
            }
        });
    }
}

/// Writes `text` as a JSON string.
fn write_json_str(out: &mut impl Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(out).write_str(text)?;
    out.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string.
struct JsonEscaped<'a, W: Write>(&'a mut W);

impl<W: Write> Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in text.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

/// `time` in RFC 3339, UTC, to the microsecond (as log lines write it).
pub fn rfc3339(time: SystemTime) -> String {
    String::from_utf8_lossy(&timestamp(time)).into_owned()
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` for `now`, in UTC. By hand because no crate in the
/// tree writes RFC 3339 (tracing-subscriber's writer is private; `httpdate` writes HTTP
/// dates, in seconds): ~60 lines instead of a date-time crate for one format.
fn timestamp(now: SystemTime) -> [u8; 27] {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            String::from_utf8(timestamp(t).to_vec()).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_798_761_599, 999_999), "2026-12-31T23:59:59.999999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    /// Captures what one event formats to.
    fn capture(format: LineFormat, emit: impl FnOnce()) -> String {
        let fields = LineFields { json: format.json };
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .event_format(format)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn emit() {
        let error = std::io::Error::other("disk \"full\"\n");
        tracing::info!(
            request_id = "abc-1",
            status = 200u64,
            delta = -3i64,
            latency_ms = 1.5f64,
            cached = true,
            route = "a\"b\\c\u{1}é",
            %error,
            "request done"
        );
    }

    #[test]
    fn json_lines_are_one_flat_object_with_every_field() {
        let line = capture(LineFormat::json(), emit);
        assert!(line.ends_with("}\n") && line.lines().count() == 1, "{line}");
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["level"], "INFO");
        assert_eq!(record["message"], "request done");
        assert_eq!(record["request_id"], "abc-1");
        assert_eq!(record["status"], 200);
        assert_eq!(record["delta"], -3);
        assert_eq!(record["latency_ms"], 1.5);
        assert_eq!(record["cached"], true);
        assert_eq!(record["route"], "a\"b\\c\u{1}é");
        assert_eq!(record["error"], "disk \"full\"\n");
        assert_eq!(record["target"], module_path!());
        let timestamp = record["timestamp"].as_str().unwrap();
        assert_eq!(timestamp.len(), 27, "{timestamp}");
        assert!(line.starts_with("{\"timestamp\":"), "{line}");
    }

    fn emit_in_spans() {
        let outer = tracing::info_span!("request", request_id = "abc-1", attempt = 2u64);
        let _outer = outer.enter();
        let inner = tracing::info_span!("limiter", backend = "redis");
        let _inner = inner.enter();
        inner.record("backend", "redis\"2");
        tracing::info!(status = 200u64, "decided");
    }

    #[test]
    fn span_fields_are_on_the_lines_of_their_events() {
        let line = capture(LineFormat::json(), emit_in_spans);
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["status"], 200);
        assert_eq!(record["request_id"], "abc-1");
        assert_eq!(record["attempt"], 2);
        assert_eq!(record["message"], "decided");
        assert!(
            line.contains(r#""backend":"redis","backend":"redis\"2""#),
            "{line}"
        );
        let text = capture(LineFormat::text(), emit_in_spans);
        assert!(
            text.ends_with(
                ": decided status=200 request_id=\"abc-1\" attempt=2 backend=\"redis\" backend=\"redis\\\"2\"\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn text_lines_put_the_message_first_and_quote_strings() {
        let line = capture(LineFormat::text(), emit);
        let after_time = &line[27..];
        assert_eq!(
            after_time,
            format!(
                "  INFO {}: request done request_id=\"abc-1\" status=200 delta=-3 \
                 latency_ms=1.5 cached=true route=\"a\\\"b\\\\c\\u{{1}}é\" error=disk \"full\"\n\n",
                module_path!()
            )
        );
    }
}
