//! A `tracing` subscriber that keeps every event, for the tests that check
//! which events a layer emits. Install it for one thread only
//! (`with_default` / `set_default`), in a test binary of its own: `tracing`
//! caches per callsite whether anyone listens.

use std::sync::Arc;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Level, Metadata};

/// One event: where it came from, its level, and its fields in order, as
/// strings.
#[derive(Debug, Clone)]
pub struct Event {
    pub target: String,
    pub level: Level,
    pub fields: Vec<(String, String)>,
}

impl Event {
    /// The value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The fields as one `name=value name=value` line.
    pub fn line(&self) -> String {
        let pairs: Vec<String> = self
            .fields
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        pairs.join(" ")
    }
}

/// Keeps every event; clones share them.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<Event>>>);

impl Capture {
    /// The events so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().clone()
    }

    /// The events so far whose message starts with `start`, oldest first.
    pub fn saying(&self, start: &str) -> Vec<Event> {
        self.0
            .lock()
            .iter()
            .filter(|e| e.get("message").is_some_and(|m| m.starts_with(start)))
            .cloned()
            .collect()
    }
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().push(Event {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            fields,
        });
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}
