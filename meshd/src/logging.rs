//! meshd's logs, and the limiter for warnings that repeat.
//!
//! In: the log format (`--log-format text|json`), the node's name, and tracing events from
//! every part of meshd and weft-core. Out: one line per event on stderr. A JSON line is one
//! object with `timestamp`, `level`, `target`, `node` (this node), `event` (a short
//! snake_case name of what happened: the event's own `event` field, else made from the first
//! words of its message), `peer` when the line is about one peer (the event's field or the
//! `peer` span it happened in), `message`, and the event's other fields and its spans' fields
//! flattened beside them (the event's own win).
//!
//! [`Repeats`] (from weft-core) keeps a warning that fires again and again for the same thing (a peer that never
//! answers, a refused record) to one line per interval: the first occurrence logs at once, the
//! next ones are counted, and the next line that gets through carries that count as `repeated`.
//! At 1000 nodes one broken peer then costs each node one line a minute, not one per check.

use std::fmt;
use std::sync::OnceLock;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
pub use weft_core::repeats::Repeats;

/// The node name every line carries (set once, before the daemon starts).
static NODE: OnceLock<String> = OnceLock::new();

/// Sets up the global subscriber: text (human) or JSON lines on stderr. `RUST_LOG` overrides
/// the default filter.
pub fn init(json: bool, node: &str) {
    let _ = NODE.set(node.to_string());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // netlink-packet-route warns about every attribute newer than itself; that is noise.
        // boringtun logs every handshake retry at WARN (one line per unreachable peer every 5 s);
        // meshd reports peer health in `status` and rate-limits its own warning instead.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error,boringtun=error")
        });
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.fmt_fields(JsonFields::new())
            .event_format(JsonLine::default())
            .init();
    } else {
        b.init();
    }
}

/// The JSON line format described in the module doc.
#[derive(Debug, Default)]
pub struct JsonLine {
    /// The node name when [`init`] did not set the global one (tests).
    pub node: Option<String>,
}

impl<S, N> FormatEvent<S, N> for JsonLine
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
        let mut obj = serde_json::Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        obj.insert("timestamp".into(), ts.into());
        let meta = event.metadata();
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        if let Some(node) = self.node.as_ref().or_else(|| NODE.get()) {
            obj.insert("node".into(), node.clone().into());
        }
        // Span fields, outermost first, so an inner span's field wins.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(m)) =
                    serde_json::from_str::<serde_json::Value>(fields)
                {
                    obj.extend(m);
                }
            }
        }
        let mut v = JsonVisitor::default();
        event.record(&mut v);
        obj.extend(v.fields);
        let message = v.message.unwrap_or_default();
        if !obj.contains_key("event") {
            obj.insert("event".into(), event_name(&message).into());
        }
        obj.insert("message".into(), message.into());
        let line = serde_json::to_string(&obj).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

/// An event name from a message: its first words (up to the first `;`, `:` or `,`, at most
/// five) in snake_case, e.g. "registry watch stopped; restarting" → `registry_watch_stopped`.
pub fn event_name(message: &str) -> String {
    let head = message.split([';', ':', ',', '(']).next().unwrap_or("");
    let words: Vec<String> = head
        .split_whitespace()
        .take(5)
        .map(|w| {
            w.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .map(|c| {
                    if c == '-' {
                        '_'
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        "log".into()
    } else {
        words.join("_")
    }
}

#[derive(Default)]
struct JsonVisitor {
    fields: serde_json::Map<String, serde_json::Value>,
    message: Option<String>,
}

impl Visit for JsonVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let s = format!("{value:?}");
        if field.name() == "message" {
            self.message = Some(s);
        } else {
            self.fields.insert(field.name().into(), s.into());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.into());
        } else {
            self.fields.insert(field.name().into(), value.into());
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine {
                node: Some("node-a".into()),
            })
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("every line is one JSON object"))
            .collect()
    }

    #[test]
    fn json_lines_carry_node_peer_and_event() {
        let out = lines(|| {
            let _s = tracing::info_span!("peer", peer = "node-b").entered();
            tracing::warn!(
                endpoint = "10.0.0.2:51820",
                "peer does not answer; handshakes go on"
            );
            tracing::info!(event = "peer_added", peer = "node-c", n = 3u64, "added");
        });
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0]["node"], "node-a");
        assert_eq!(out[0]["peer"], "node-b", "the span's peer");
        assert_eq!(out[0]["event"], "peer_does_not_answer");
        assert_eq!(out[0]["level"], "WARN");
        assert_eq!(out[0]["endpoint"], "10.0.0.2:51820");
        assert_eq!(out[0]["message"], "peer does not answer; handshakes go on");
        assert!(out[0]["timestamp"]
            .as_str()
            .is_some_and(|t| t.contains('T')));
        assert_eq!(
            out[1]["peer"], "node-c",
            "the event's own field wins over the span's"
        );
        assert_eq!(out[1]["event"], "peer_added");
        assert_eq!(out[1]["n"], 3);
    }

    #[test]
    fn a_line_without_span_or_message_words_still_has_node_and_event() {
        let out = lines(|| tracing::error!("{}", "…"));
        assert_eq!(out[0]["node"], "node-a");
        assert_eq!(out[0]["event"], "log");
        assert!(out[0].get("peer").is_none());
    }

    #[test]
    fn event_names() {
        assert_eq!(
            event_name("registry watch stopped; restarting"),
            "registry_watch_stopped"
        );
        assert_eq!(
            event_name("Could not publish this node's record, will retry"),
            "could_not_publish_this_nodes"
        );
        assert_eq!(event_name("key-rotation done"), "key_rotation_done");
        assert_eq!(event_name(""), "log");
    }
}
