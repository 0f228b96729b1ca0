//! Who may connect ([`Auth`]: token hashes and revocations), the credential checks of each call,
//! and the audit of refusals: one rate-limited `refused` record in `metrics.jsonl` per refused call.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hetfed_net::{Caller, ServiceError};
use tokio::time::Instant;

use super::{lock, unix_ms, Reply, Server};
use hetfed_events::{Event, Refused, RefusedSuppressed};

/// Who may connect: client id → SHA-256 of its token (the server never stores tokens), and the
/// revoked ids.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    token_hashes: BTreeMap<String, String>,
    revoked: BTreeSet<String>,
}

impl Auth {
    pub fn add_token(&mut self, client_id: &str, token: &str) {
        self.token_hashes.insert(client_id.to_string(), hetfed_core::sha256_hex(token.as_bytes()));
    }

    pub fn add_token_hash(&mut self, client_id: &str, sha256_hex: &str) {
        self.token_hashes.insert(client_id.to_string(), sha256_hex.to_ascii_lowercase());
    }

    pub fn revoke(&mut self, client_id: &str) {
        self.revoked.insert(client_id.to_string());
    }

    pub fn len(&self) -> usize {
        self.token_hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_hashes.is_empty()
    }

    /// The ids that hold a token (revoked or not), in order.
    pub(super) fn client_ids(&self) -> impl Iterator<Item = &str> {
        self.token_hashes.keys().map(String::as_str)
    }

    /// Refuses unknown ids, wrong tokens (compared in constant time) and revoked clients.
    pub fn check(&self, caller: &Caller) -> std::result::Result<(), ServiceError> {
        let Some(expected) = self.token_hashes.get(&caller.client_id) else {
            return Err(ServiceError::Unauthenticated(format!("unknown client id {:?}", caller.client_id)));
        };
        let got = hetfed_core::sha256_hex(caller.token.expose().as_bytes());
        let diff =
            expected.bytes().zip(got.bytes()).fold(expected.len() ^ got.len(), |acc, (a, b)| acc | (a ^ b) as usize);
        if diff != 0 {
            return Err(ServiceError::Unauthenticated(format!("wrong token for client {:?}", caller.client_id)));
        }
        if self.revoked.contains(&caller.client_id) {
            return Err(ServiceError::PermissionDenied(format!("client {:?} is revoked", caller.client_id)));
        }
        Ok(())
    }
}

/// Audit records of refusals written in full per minute; beyond, they are counted, and the count
/// is written as one `refused_suppressed` line (a flood of bad calls cannot fill the disk).
const AUDIT_PER_MINUTE: u32 = 120;
/// Longest claimed client id and reason an audit record keeps (both may come from the caller).
const AUDIT_MAX_CHARS: usize = 256;
/// The length of an audit window, in seconds.
const AUDIT_WINDOW_S: u64 = 60;

/// The current minute of the audit: records written, records suppressed.
pub(super) struct AuditWindow {
    start: Instant,
    written: u32,
    suppressed: u64,
}

impl AuditWindow {
    pub(super) fn new() -> Self {
        Self { start: Instant::now(), written: 0, suppressed: 0 }
    }

    /// Admits one record: `Err(())` when it is suppressed (counted), else `Ok` with the count of
    /// records suppressed in the window that has just ended, if any, to be written first.
    fn admit(&mut self) -> std::result::Result<Option<u64>, ()> {
        let mut flushed = None;
        if self.start.elapsed() >= Duration::from_secs(AUDIT_WINDOW_S) {
            flushed = Some(std::mem::take(&mut self.suppressed)).filter(|n| *n > 0);
            self.start = Instant::now();
            self.written = 0;
        }
        if self.written >= AUDIT_PER_MINUTE {
            self.suppressed += 1;
            if let Some(n) = flushed {
                // Not expected (a fresh window writes first), but never lose a count.
                self.suppressed += n;
            }
            return Err(());
        }
        self.written += 1;
        Ok(flushed)
    }
}

impl Server {
    /// Records a refused call (audit): one `metrics.jsonl` line
    /// `{"event": "refused", "call", "client" (the id claimed), "reason", "peer" (remote address or
    /// null), "upload_round" (the round an upload named, else null), "server_round", "time_unix_ms"}`
    /// and a warning in the log. The token is never written: it is not part of the record, and a
    /// reason or id that happens to contain it has it replaced by `***`. At most
    /// [`AUDIT_PER_MINUTE`] records a minute; the rest are counted into one `refused_suppressed`
    /// line `{"count", "window_s", "time_unix_ms"}` written before the next record (or at the end
    /// of the run).
    pub fn audit(&self, call: &str, caller: &Caller, upload_round: Option<u64>, reason: &str) {
        let token = caller.token.expose();
        let clean = |s: &str| -> String {
            let s = if token.is_empty() { s.to_owned() } else { s.replace(token, "***") };
            let mut out: String = s.chars().take(AUDIT_MAX_CHARS).collect();
            if out.len() < s.len() {
                out.push('…');
            }
            out
        };
        let (client, reason) = (clean(&caller.client_id), clean(reason));
        let peer = hetfed_net::peer_addr().map(|a| a.to_string());
        let Ok(suppressed) = lock(&self.audit).admit() else { return };
        if let Some(n) = suppressed {
            self.suppressed(n);
        }
        tracing::warn!(call, client = %client, peer = ?peer, "refused: {reason}");
        let server_round = lock(&self.state).round;
        self.event(&Event::Refused(Refused {
            call: Some(call.to_string()),
            client: Some(client),
            reason: Some(reason),
            peer,
            upload_round,
            server_round: Some(server_round),
            time_unix_ms: Some(unix_ms()),
        }));
    }

    /// Writes the count of audit records suppressed in the current window, if any.
    pub(super) fn flush_audit(&self) {
        let n = std::mem::take(&mut lock(&self.audit).suppressed);
        if n > 0 {
            self.suppressed(n);
        }
    }

    fn suppressed(&self, count: u64) {
        self.event(&Event::RefusedSuppressed(RefusedSuppressed {
            count: Some(count),
            window_s: Some(AUDIT_WINDOW_S),
            time_unix_ms: Some(unix_ms()),
        }));
    }

    /// The caller's credentials; refusals of calls other than register and upload (which audit
    /// every refusal themselves) are audited here under `call`.
    pub(super) fn authed(&self, call: Option<&str>, caller: &Caller) -> Reply<()> {
        let r = self.opts.auth.check(caller);
        if let (Some(call), Err(e)) = (call, &r) {
            self.audit(call, caller, None, &e.to_string());
        }
        r
    }

    /// [`Server::authed`], and the caller must be registered.
    pub(super) fn registered(&self, call: Option<&str>, caller: &Caller) -> Reply<()> {
        self.authed(call, caller)?;
        if !lock(&self.state).clients.contains_key(&caller.client_id) {
            return Err(ServiceError::NotFound(format!(
                "client {:?} is not registered (register again)",
                caller.client_id
            )));
        }
        Ok(())
    }
}
