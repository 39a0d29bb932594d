//! Telemetry: the tracing subscriber (our line format, written by a thread of its own)
//! and the Prometheus metrics. Request logs and metrics are recorded at each boundary by
//! the layer that owns it; this module only provides the means.

pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod scope;
pub mod traces;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, Settings};
use log_format::{LineFields, LineFormat};
use log_writer::FlushGuard;

/// Installs the global subscriber, writing to stdout in batches from a dedicated thread
/// (see `log_writer`): a synchronous write per request line cost about 30% of
/// throughput in the benchmark. Keep the returned guard until exit; dropping it writes
/// what is still pending.
pub fn init(settings: &Settings) -> FlushGuard {
    let filter = EnvFilter::try_new(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = log_writer::batched(std::io::stdout());
    let colours = settings.log_format == LogFormat::Text && std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // Our own line format (see `log_format`), except for colours on a terminal, where
    // tracing-subscriber's coloured text is kept.
    let _ = match (settings.log_format, colours) {
        (LogFormat::Json, _) => builder
            .fmt_fields(LineFields::json())
            .event_format(LineFormat::json())
            .try_init(),
        (LogFormat::Text, false) => builder
            .fmt_fields(LineFields::text())
            .event_format(LineFormat::text())
            .try_init(),
        (LogFormat::Text, true) => builder.with_ansi(true).try_init(),
    };
    guard
}
