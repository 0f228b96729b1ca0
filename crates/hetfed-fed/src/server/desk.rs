//! The desk: what a transport talks to. [`Server`] implements [`FedService`]: registration, the
//! long poll for instructions, the model download (serialised lazily, once per version), uploads
//! (received and validated in `upload.rs`, each with the client's metrics and own evaluation).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use candle_core::DType;
use hetfed_core::TensorMap;
use hetfed_net::{
    body_from_bytes, ByteStream, Caller, ClientInfo, FedService, Instruction, ModelHeader, RegisterReply, ServiceError,
    UploadHeader, UploadReply,
};
use tokio::time::Instant;

use super::{internal, lock, Phase, Reply, Server};

/// The download of `weights`: its safetensors bytes and their SHA-256.
fn download(weights: &TensorMap) -> hetfed_core::Result<(Bytes, String)> {
    let bytes = Bytes::from(hetfed_core::tensors_to_bytes(weights, DType::F32, &BTreeMap::new())?);
    let sha256 = hetfed_core::sha256_hex(&bytes);
    Ok((bytes, sha256))
}

#[async_trait::async_trait]
impl FedService for Server {
    /// Registers (or re-registers) a client. Every refusal is audited (see [`Server::audit`]).
    async fn register(&self, caller: &Caller, info: ClientInfo) -> Reply<RegisterReply> {
        let r = self.register_checked(caller, info).await;
        if let Err(e) = &r {
            self.audit("register", caller, None, &e.to_string());
        }
        r
    }

    async fn instructions(&self, caller: &Caller, after_round: u64, wait: Duration) -> Reply<Instruction> {
        self.registered(Some("instructions"), caller)?;
        let deadline = Instant::now() + wait.min(self.opts.max_poll);
        loop {
            let mut rx = self.changed.subscribe();
            {
                let mut st = lock(&self.state);
                if st.phase == Phase::Done {
                    st.finished.insert(caller.client_id.clone());
                    drop(st);
                    self.notify();
                    return Ok(Instruction::Done);
                }
                if st.phase == Phase::Fit && st.round > after_round && !st.outcomes.contains_key(&caller.client_id) {
                    if let Some(ins) = st.selected.get(&caller.client_id) {
                        return Ok(Instruction::Fit(ins.clone()));
                    }
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Ok(Instruction::Wait);
            }
        }
    }

    /// Sends the current global model. It is serialised when first asked for (off the async
    /// threads) and kept until the model changes; the bytes are counted for the caller once
    /// they are ready, under the same lock that checks the version.
    async fn fetch_model(&self, caller: &Caller, version: &str) -> Reply<(ModelHeader, ByteStream)> {
        self.registered(Some("fetch_model"), caller)?;
        loop {
            let (global, cell) = {
                let mut st = lock(&self.state);
                if st.identity.weights_hash != version {
                    return Err(ServiceError::NotFound(format!(
                        "model version {version} is not the current one ({})",
                        st.identity.weights_hash
                    )));
                }
                if let Some((bytes, sha256)) = st.download.get().cloned() {
                    *st.bytes_down.entry(caller.client_id.clone()).or_default() += bytes.len() as u64;
                    let header = ModelHeader { version: version.to_string(), size_bytes: bytes.len() as u64, sha256 };
                    return Ok((header, body_from_bytes(bytes, 1 << 20)));
                }
                (st.global.clone(), st.download.clone())
            };
            // Serialise once (concurrent callers wait for it), then check the version again.
            cell.get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || download(&global)).await.map_err(internal)?.map_err(internal)
            })
            .await?;
        }
    }

    /// Receives a client's update for the open round into the spool, validates it, and records
    /// its outcome.
    ///
    /// One accepted update per client and round: only an *accepted* update uses up the client's
    /// turn. A later upload in the same round is answered `accepted, duplicate` and not counted
    /// again. A *refused* upload does not use up the turn: a broken transfer (checksum, size, a
    /// disconnect) leaves no trace, and an update rejected by validation (wrong base, norm, shape)
    /// is replaced by a corrected upload made while the round is still open, which is then
    /// accepted as the client's one update (the round's metrics show the last outcome; every
    /// refusal is audited when it happens). The round does not wait for such a retry: it closes
    /// at its deadline or as soon as every selected client has an accepted or rejected update.
    async fn upload(&self, caller: &Caller, header: UploadHeader, body: ByteStream) -> Reply<UploadReply> {
        let round = header.round;
        let r = self.upload_checked(caller, header, body).await;
        match &r {
            Err(e) => self.audit("upload", caller, Some(round), &e.to_string()),
            Ok(reply) if !reply.accepted => {
                self.audit("upload", caller, Some(round), &format!("rejected: {}", reply.reason))
            }
            Ok(_) => {}
        }
        r
    }
}

impl Server {
    /// Registers the caller: its claimed id must be its own and its model of the server's
    /// architecture; the strategy may give it its own base.
    async fn register_checked(&self, caller: &Caller, info: ClientInfo) -> Reply<RegisterReply> {
        self.authed(None, caller)?;
        if info.client_id != caller.client_id {
            return Err(ServiceError::PermissionDenied(format!(
                "client {:?} cannot register as {:?}",
                caller.client_id, info.client_id
            )));
        }
        let expected = self.base.identity().map_err(internal)?;
        if info.arch != expected.arch {
            return Err(ServiceError::FailedPrecondition(format!(
                "expected a client model of architecture {}, found {}",
                expected.arch, info.arch
            )));
        }
        // The bases table, not the strategy: registration never waits on an aggregation.
        let own_base = self.client_bases.lookup(&info).map_err(ServiceError::FailedPrecondition)?;
        tracing::info!("client {} registered ({} examples)", info.client_id, info.stats.n_examples);
        let mut st = lock(&self.state);
        match own_base {
            Some(b) => st.client_bases.insert(info.client_id.clone(), b),
            None => st.client_bases.remove(&info.client_id),
        };
        st.clients.insert(info.client_id.clone(), info);
        drop(st);
        self.notify();
        Ok(RegisterReply { run_id: self.run_id.clone(), message: "registered".into() })
    }
}
