//! The upload path: admit an upload to the open round, stream it into the round's spool (checked
//! against its declared size and checksum), validate it off the async threads, and record its
//! outcome; an upload that fails or is dropped half-way is undone ([`InFlight`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use hetfed_core::TensorMap;
use hetfed_model::ModelIdentity;
use hetfed_net::{ByteStream, Caller, ServiceError, UploadHeader, UploadReply};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::{internal, lock, Outcome, Phase, Reply, Server};
use crate::validate::validate_update;

/// An update's norm when it passes validation, or why it is rejected.
type Verdict = std::result::Result<f64, String>;

/// Uploads streamed into the spool at once; later ones wait, unread. Each costs the server about
/// two chunks (the transport's decoder, the spool file's buffer), so this bounds the memory of
/// uploads independently of the number of clients; it is large enough that a few clients on slow
/// links do not hold up everyone's uploads.
pub(super) const RECEPTIONS: usize = 16;

/// An upload admitted to the open round: what it is validated against, and the client's outcome
/// before it (none, or a rejection), restored if it is undone.
struct Admitted {
    identity: ModelIdentity,
    global: Arc<TensorMap>,
    previous: Option<Outcome>,
}

fn late(round: u64, when: &str) -> ServiceError {
    ServiceError::FailedPrecondition(format!("update for round {round} refused (late: the round closed {when})"))
}

impl Server {
    /// [`FedService::upload`](hetfed_net::FedService::upload) before its audit.
    pub(super) async fn upload_checked(
        &self,
        caller: &Caller,
        header: UploadHeader,
        body: ByteStream,
    ) -> Reply<UploadReply> {
        self.registered(None, caller)?;
        if header.client_id != caller.client_id {
            return Err(ServiceError::PermissionDenied(format!(
                "client {:?} cannot upload for {:?}",
                caller.client_id, header.client_id
            )));
        }
        if header.size_bytes > self.opts.max_update_bytes {
            return Err(ServiceError::ResourceExhausted(format!(
                "expected an update of at most {} bytes, found {}",
                self.opts.max_update_bytes, header.size_bytes
            )));
        }
        let admitted = match self.admit(&caller.client_id, &header)? {
            Ok(a) => a,
            Err(duplicate) => return Ok(duplicate),
        };
        let t0 = Instant::now();
        let path = self.spool_dir(header.round).join(format!("{}.safetensors", caller.client_id));
        // From here until a final outcome is recorded, a failure or a dropped call (the client
        // disconnected) undoes the upload: the spool file goes, the previous outcome comes back.
        let mut in_flight = InFlight {
            server: self,
            caller: caller.clone(),
            round: header.round,
            path: path.clone(),
            previous: admitted.previous,
            armed: true,
        };
        let bytes = match self.spool(&header, body, &path).await {
            Ok(n) => n,
            // A broken transfer leaves no trace: the client may retry; unless the round closed
            // under the transfer (and its spool went with it).
            Err(e) => return Err(if in_flight.undo() { e } else { late(header.round, "during the upload") }),
        };
        let upload_s = t0.elapsed().as_secs_f64();
        let verdict = match self.validate(&path, admitted.identity, admitted.global).await {
            Ok(v) => v,
            Err(e) => {
                in_flight.undo();
                return Err(e);
            }
        };
        in_flight.finish(header, bytes, upload_s, verdict)
    }

    /// Admits `id`'s upload to the open round: marks it in progress and returns what it is
    /// validated against, or (`Err`) the reply to a duplicate of an accepted update.
    fn admit(&self, id: &str, header: &UploadHeader) -> Reply<std::result::Result<Admitted, UploadReply>> {
        let mut st = lock(&self.state);
        if header.round != st.round || st.phase != Phase::Fit {
            let why = if header.round < st.round || (header.round == st.round && st.phase != Phase::Fit) {
                "late: the round is closed"
            } else {
                "not open yet"
            };
            return Err(ServiceError::FailedPrecondition(format!(
                "update for round {} refused ({why}; current round {})",
                header.round, st.round
            )));
        }
        if !st.selected.contains_key(id) {
            return Err(ServiceError::PermissionDenied(format!("client {id:?} is not selected in round {}", st.round)));
        }
        // Only an accepted update uses up the client's turn; a rejected one may be replaced.
        let previous = match st.outcomes.get(id) {
            Some(Outcome::Accepted { .. }) => {
                let reason = "already received for this round".into();
                return Ok(Err(UploadReply { accepted: true, duplicate: true, reason }));
            }
            Some(Outcome::InProgress) => {
                return Err(ServiceError::FailedPrecondition("an upload for this round is already in progress".into()))
            }
            Some(rejected @ Outcome::Rejected { .. }) => Some(rejected.clone()),
            None => None,
        };
        st.outcomes.insert(id.to_string(), Outcome::InProgress);
        let (identity, global) = match st.client_bases.get(id) {
            Some((i, w)) => (i.clone(), w.clone()),
            None => (st.identity.clone(), st.global.clone()),
        };
        Ok(Ok(Admitted { identity, global, previous }))
    }

    /// Streams the upload into the spool once a reception slot is free, unless its round closed
    /// while it waited; the bytes received.
    async fn spool(&self, header: &UploadHeader, body: ByteStream, path: &Path) -> Reply<u64> {
        let _slot = self.receptions.acquire().await.map_err(internal)?;
        {
            let st = lock(&self.state);
            if st.round != header.round || st.phase != Phase::Fit {
                // Closed while this upload waited: do not read it, nor re-create the spool.
                return Err(late(header.round, "before the upload could be read"));
            }
        }
        if let Some(dir) = path.parent() {
            // Synchronous, like every file-system step of an upload that creates or names a
            // path: an async one runs on the blocking pool and outlives a dropped call, so it
            // could re-create what [`InFlight`]'s undo just removed.
            std::fs::create_dir_all(dir).map_err(internal)?;
        }
        self.receive(header, body, path).await
    }

    /// Validates the spooled update at `path` against the base it was made from (off the async
    /// threads, a bounded number at once: each reads a whole update): its norm, or why it is
    /// rejected.
    async fn validate(&self, path: &Path, identity: ModelIdentity, global: Arc<TensorMap>) -> Reply<Verdict> {
        let (max_norm, path) = (self.opts.max_update_norm, path.to_path_buf());
        let _permit = self.validations.acquire().await.map_err(internal)?;
        tokio::task::spawn_blocking(move || -> Verdict {
            let data = std::fs::read(&path).map_err(|e| e.to_string())?;
            validate_update(&data, &identity, &global, max_norm).map(|(_, norm)| norm)
        })
        .await
        .map_err(internal)
    }

    /// Streams `body` to `path` through `path.part` (renamed once complete and checked); on any
    /// failure the partial file is removed.
    async fn receive(&self, header: &UploadHeader, body: ByteStream, path: &Path) -> Reply<u64> {
        let tmp = path.with_extension("part");
        let r = Self::receive_to(header, body, &tmp, path).await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        r
    }

    async fn receive_to(header: &UploadHeader, mut body: ByteStream, tmp: &Path, path: &Path) -> Reply<u64> {
        // Created synchronously (see `spool`): once this returns, the file exists, and a drop
        // of this future at any later await finds it to remove.
        let mut f = tokio::fs::File::from_std(std::fs::File::create(tmp).map_err(internal)?);
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            if n > header.size_bytes {
                return Err(ServiceError::InvalidArgument(format!(
                    "expected {} bytes as declared, received more",
                    header.size_bytes
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(internal)?;
        }
        f.flush().await.map_err(internal)?;
        drop(f);
        if n != header.size_bytes {
            return Err(ServiceError::InvalidArgument(format!(
                "expected {} bytes as declared, received {n}",
                header.size_bytes
            )));
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != header.sha256.to_ascii_lowercase() {
            return Err(ServiceError::InvalidArgument(format!(
                "checksum mismatch: declared sha256 {}, received {got}",
                header.sha256
            )));
        }
        std::fs::rename(tmp, path).map_err(internal)?;
        Ok(n)
    }
}

/// An upload between its admission (outcome `InProgress`) and its final outcome. Undone when it
/// fails or when its future is dropped (the client disconnected mid-transfer, the call was
/// cancelled): the spool file and its partial file are removed, the client's previous outcome
/// (none, or a rejection) is restored if the round is still open, and a dropped upload is audited.
struct InFlight<'a> {
    server: &'a Server,
    caller: Caller,
    round: u64,
    path: PathBuf,
    previous: Option<Outcome>,
    armed: bool,
}

impl InFlight<'_> {
    /// Undoes the upload; whether its round is still open.
    fn undo(&mut self) -> bool {
        self.armed = false;
        self.remove_files();
        let mut st = lock(&self.server.state);
        let open = st.round == self.round && st.phase == Phase::Fit;
        if open && matches!(st.outcomes.get(&self.caller.client_id), Some(Outcome::InProgress)) {
            match self.previous.take() {
                Some(o) => st.outcomes.insert(self.caller.client_id.clone(), o),
                None => st.outcomes.remove(&self.caller.client_id),
            };
        }
        drop(st);
        self.server.notify();
        open
    }

    /// Records the upload's final outcome (`verdict`: its norm, or why it is rejected) if its
    /// round is still open; otherwise removes its files and refuses it as late.
    fn finish(mut self, header: UploadHeader, bytes: u64, upload_s: f64, verdict: Verdict) -> Reply<UploadReply> {
        let server = self.server;
        let mut st = lock(&server.state);
        self.armed = false;
        if st.round != header.round || st.phase != Phase::Fit {
            drop(st);
            self.remove_files();
            return Err(late(header.round, "during the upload"));
        }
        let id = self.caller.client_id.clone();
        let reply = match verdict {
            Ok(norm) => {
                let (n_examples, metrics) = (header.n_examples, header.metrics);
                st.outcomes.insert(id, Outcome::Accepted { n_examples, metrics, bytes, norm, upload_s });
                UploadReply { accepted: true, duplicate: false, reason: String::new() }
            }
            Err(reason) => {
                tracing::warn!("round {}: update of {id} rejected: {reason}", header.round);
                let _ = std::fs::remove_file(&self.path);
                st.outcomes.insert(id, Outcome::Rejected { reason: reason.clone(), bytes });
                UploadReply { accepted: false, duplicate: false, reason }
            }
        };
        drop(st);
        server.notify();
        Ok(reply)
    }

    fn remove_files(&self) {
        let _ = std::fs::remove_file(self.path.with_extension("part"));
        let _ = std::fs::remove_file(&self.path);
        // A transfer that outlived its round may have re-created the round's spool directory.
        let st = lock(&self.server.state);
        if st.round != self.round || st.phase != Phase::Fit {
            drop(st);
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.undo();
            self.server.audit(
                "upload",
                &self.caller,
                Some(self.round),
                "the upload was abandoned mid-transfer (the client disconnected or cancelled the call)",
            );
        }
    }
}
