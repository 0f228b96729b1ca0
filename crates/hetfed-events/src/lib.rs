//! The records of `metrics.jsonl`, one typed [`Event`] per line, tagged by its `"event"` field:
//! `run_start`, `round`, `client_round`, `refused`, `refused_suppressed`, `resume`, `run_end`.
//!
//! The server writes them and the report reads them through these same types. A log outlives
//! the code that wrote it and may be cut short or edited, so every field is optional and read
//! leniently: a field of the wrong type is missing, never an error (a number written as a
//! string id becomes that string, an integral float a count); numbers that are not finite are
//! missing too (serde_json writes NaN as `null`). Writing omits missing fields. A line that is
//! not an object, has no known `"event"`, or is not JSON is no event ([`Event::parse`]).
//!
//! Lines are written through a [`serde_json::Value`] ([`Event::to_line`]), whose objects keep
//! their keys sorted: the lines' key order does not depend on the order of the fields here.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Metric name → value (`"<task>/<metric>"` for evaluations).
pub type Metrics = BTreeMap<String, f64>;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run's first line (not written again on resume).
    RunStart(RunStart),
    /// A round (after its clients' lines), or the evaluation of the initial model (round 0:
    /// only `round`, `server_eval` and `server_eval_s`).
    Round(Box<Round>),
    /// A selected client in a round.
    ClientRound(ClientRound),
    /// A refused call.
    Refused(Refused),
    /// Refusals counted but not written in an audit window.
    RefusedSuppressed(RefusedSuppressed),
    /// A server restarted from the checkpoint of `round`.
    Resume(Resume),
    RunEnd(RunEnd),
}

impl Event {
    /// The record of one parsed line; `None` when it is not an event (not an object, no known
    /// `"event"` tag).
    pub fn parse(line: &Value) -> Option<Event> {
        line.as_object()?;
        Event::deserialize(line).ok()
    }

    /// The line's text (no newline).
    pub fn to_line(&self) -> serde_json::Result<String> {
        Ok(serde_json::to_value(self)?.to_string())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub rounds: Option<u64>,
    /// Every id that holds a token.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub clients: Option<Vec<String>>,
    /// The run's configuration as the server read it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub config: Option<Value>,
    /// The strategy's own description of the run.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub strategy_info: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub time_unix_ms: Option<u64>,
}

/// A round: outcomes, aggregation, timings, traffic, evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Round {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub selected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub ok: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub rejected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub failed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub aggregated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub n_aggregated: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub quorum: Option<u64>,
    /// Client → aggregation weight.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub alphas: Option<Metrics>,
    /// Written as `null` when not finite, so always written in a full round.
    #[serde(default, deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
    pub applied_norm: Option<f64>,
    /// The strategy's own record of the aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub aggregation: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub aggregate_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_eval_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub wall_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub bytes_up: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub bytes_down: Option<u64>,
    /// The server's evaluation of the round's model.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_eval: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_cpu_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_peak_rss_bytes: Option<u64>,
    /// The global model's weights hash after the round.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub model_version: Option<String>,
}

/// A client's outcome in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Accepted.
    Ok,
    /// Refused by validation.
    Rejected,
    /// No final upload by the deadline.
    Failed,
    /// A status this version does not know, as written.
    Other(String),
}

impl Status {
    pub fn as_str(&self) -> &str {
        match self {
            Status::Ok => "ok",
            Status::Rejected => "rejected",
            Status::Failed => "failed",
            Status::Other(s) => s,
        }
    }
}

impl Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Lenient for Status {
    /// Case-insensitive: `"OK"` is [`Status::Ok`].
    fn from_value(v: &Value) -> Option<Self> {
        let s = v.as_str()?;
        Some(match s.to_ascii_lowercase().as_str() {
            "ok" => Status::Ok,
            "rejected" => Status::Rejected,
            "failed" => Status::Failed,
            _ => Status::Other(s.to_string()),
        })
    }
}

/// A selected client in a round: what it downloaded, and its upload's outcome. Accepted
/// uploads carry the client's training metrics (`null` when it did not report one), its own
/// evaluation and its aggregation weight when the round aggregated; refused ones the reason and
/// the bytes; failed ones the reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRound {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub bytes_down: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub examples: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub bytes_up: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub update_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub upload_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub train_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub train_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub val_loss_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub val_loss_after: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub cpu_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub peak_rss_bytes: Option<u64>,
    /// The client's own evaluation, `"<task>/<metric>"` → value.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub eval: Option<Metrics>,
    /// Its aggregation weight, when the round aggregated.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub weight: Option<f64>,
}

/// A refused call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub call: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub reason: Option<String>,
    /// The peer's address, when the transport knows it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub peer: Option<String>,
    /// The round an upload claimed.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub upload_round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub server_round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub time_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusedSuppressed {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub window_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub time_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub round: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub time_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub rounds_completed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub wall_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub time_unix_ms: Option<u64>,
}

/// A field's value read leniently: `None` when the JSON is not what the field holds.
pub trait Lenient: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl Lenient for f64 {
    /// A finite number.
    fn from_value(v: &Value) -> Option<Self> {
        v.as_f64().filter(|x| x.is_finite())
    }
}

impl Lenient for u64 {
    /// A non-negative integer, also when written as an integral float (`3.0`).
    fn from_value(v: &Value) -> Option<Self> {
        v.as_u64().or_else(|| {
            v.as_f64().filter(|x| x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15).map(|x| x as u64)
        })
    }
}

impl Lenient for bool {
    fn from_value(v: &Value) -> Option<Self> {
        v.as_bool()
    }
}

impl Lenient for String {
    /// A string, or a number written where an id was expected (`7` is `"7"`).
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

impl Lenient for Value {
    /// Anything but `null`.
    fn from_value(v: &Value) -> Option<Self> {
        (!v.is_null()).then(|| v.clone())
    }
}

impl Lenient for Vec<String> {
    /// An array; its entries that are not strings are dropped.
    fn from_value(v: &Value) -> Option<Self> {
        Some(v.as_array()?.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
    }
}

impl Lenient for Metrics {
    /// An object; its entries that are not finite numbers are dropped.
    fn from_value(v: &Value) -> Option<Self> {
        Some(v.as_object()?.iter().filter_map(|(k, x)| f64::from_value(x).map(|x| (k.clone(), x))).collect())
    }
}

fn lenient<'de, D: Deserializer<'de>, T: Lenient>(d: D) -> Result<Option<T>, D::Error> {
    Ok(T::from_value(&Value::deserialize(d)?))
}

#[cfg(test)]
mod tests;
