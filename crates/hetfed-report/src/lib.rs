//! A self-contained HTML report of a federated run, made from its `metrics.jsonl`.
//!
//! The page opens from disk with no network: CSS is inline, charts are inline SVG drawn here,
//! there is no JavaScript, no external font or image, and a Content-Security-Policy forbids
//! loading anything. Every string from the log (client ids, failure reasons, metric names, the
//! config) is HTML-escaped: the log is untrusted input.
//!
//! # Input
//!
//! One JSON object per line; its `event` field says which:
//!
//! - `run_start`: `run_id`, `strategy`, `rounds` (planned), `clients`, `config` (any JSON),
//!   `time_unix_ms`;
//! - `client_round`: `round`, `client`, `status` (`ok` / `failed` / `rejected`), `reason`,
//!   `examples`, `bytes_up`, `bytes_down`, `train_s`, `upload_s`, `update_norm`, `train_loss`,
//!   `eval` (metric → number), `cpu_s`, `peak_rss_bytes`;
//! - `round`: `round`, `selected`, `ok`, `failed`, `rejected`, `aggregate_s`, `server_eval_s`,
//!   `wall_s`, `bytes_up`, `bytes_down`, `server_eval` (metric → number), `alphas`
//!   (client → weight), `server_cpu_s`, `server_rss_bytes`. Round 0 may carry only
//!   `server_eval`: the initial model;
//! - `run_end`: `rounds_completed`, `wall_s`, `time_unix_ms`.
//!
//! Reading is tolerant: unknown events, unknown fields, fields of the wrong type, `null` and
//! non-finite numbers are ignored (a value that is missing is skipped in charts and shown as `—`
//! in tables). When a round or a (round, client) pair repeats (a resumed run), the last one wins.
//! A round's bytes come from its `round` event, else from the sum over its `client_round` rows.
//!
//! # Output
//!
//! A header (run id, strategy, rounds, clients, config), a summary (final server metrics vs the
//! initial ones, total bytes, total wall time), then charts and tables: server metrics per round,
//! bytes per round, time per phase per round, per-client metrics, failures and rejections, every
//! client update, CPU and memory, and the rounds. A run with no training round says so.

mod fmt;
mod html;
mod model;
mod svg;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What can go wrong making a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading the log or writing the report failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of the log is not JSON (and is not a truncated last line).
    #[error("{}: line {line}: malformed JSON: {source}", path.display())]
    Parse {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io { path: path.to_path_buf(), source }
}

/// Reads a `metrics.jsonl`: one JSON value per line; blank lines are skipped.
///
/// A malformed line is an error naming the file and its 1-based line number, except the last
/// line when it looks cut short by a crash mid-write: it is skipped when it does not end in a
/// newline, or when the JSON simply ends too early.
pub fn read_events(path: &Path) -> Result<Vec<serde_json::Value>, ReportError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&data);
    let terminated = data.ends_with(b"\n");
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let last = lines.iter().rposition(|l| !l.trim_ascii().is_empty());
    let mut events = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) => events.push(v),
            Err(e) => {
                let is_last = Some(i) == last;
                let truncated = is_last && (!terminated || e.classify() == serde_json::error::Category::Eof);
                if !truncated {
                    return Err(ReportError::Parse { path: path.to_path_buf(), line: i + 1, source: e });
                }
            }
        }
    }
    Ok(events)
}

/// The report page for a run's events (as [`read_events`] returns them). Pure: no I/O.
pub fn render_html(events: &[serde_json::Value]) -> String {
    html::page(&model::Run::from_events(events))
}

/// Reads `run_dir/metrics.jsonl` and writes `run_dir/report.html`, returning its path.
///
/// The page is written to a temporary file in `run_dir` and renamed over `report.html`, so a
/// reader never sees half a report.
pub fn render_report(run_dir: &Path) -> Result<PathBuf, ReportError> {
    let events = read_events(&run_dir.join("metrics.jsonl"))?;
    let page = render_html(&events);
    let out = run_dir.join("report.html");
    let tmp = run_dir.join(format!(".report.html.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(page.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &out) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&out)(e));
    }
    Ok(out)
}
