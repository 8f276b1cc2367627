//! The coordinator's decision log on the shared group-commit store.
//!
//! Column families:
//! - `decisions`: transaction id (16 bytes, big-endian) → [`DecisionRecord`].
//!   Only COMMIT decisions are ever written (presumed abort), synced before
//!   anyone hears of them; the END rewrite is lazy.
//! - `meta`: `epoch` → the last coordinator run's epoch (u64 big-endian),
//!   raised and synced at every start so transaction ids never repeat.
//! - `participants`: name → endpoint, the registry Execute resolves names in.
//! - `meta`, keys `one_phase/` + run epoch (u64 big-endian) + participant
//!   name → empty: the one-phase markers. Written, synced, before a run
//!   first sends that participant a one-phase Prepare; deleted once a later
//!   run has collected that participant's one-phase outcomes.

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use twopc_proto::logpb::DecisionRecord;
use twopc_proto::{ParticipantName, TxnId};
use twopc_storage::{Batch, Durability, LogStore, RocksStore, StorageError, WriteTicket, wait};

const CF_DECISIONS: &str = "decisions";
const CF_META: &str = "meta";
const CF_PARTICIPANTS: &str = "participants";
const EPOCH_KEY: &[u8] = b"epoch";
const HORIZON_KEY: &[u8] = b"gc_horizon";
const MARKER_PREFIX: &[u8] = b"one_phase/";

/// Every column family the coordinator's store holds.
pub const COLUMN_FAMILIES: &[&str] = &[CF_DECISIONS, CF_META, CF_PARTICIPANTS];

/// Errors reading the log. Corrupt records are reported, never skipped
/// silently: a decision that cannot be read must stop recovery.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A record that does not decode.
    #[error("corrupt record in {cf}: {detail}")]
    Corrupt {
        /// Column family.
        cf: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// The decision log. Cheap to clone.
#[derive(Clone)]
pub struct DecisionLog {
    store: Arc<dyn LogStore>,
}

impl DecisionLog {
    /// Opens (creating) the log in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LogError> {
        Ok(DecisionLog { store: Arc::new(RocksStore::open(dir, COLUMN_FAMILIES)?) })
    }

    /// Opens an existing log for inspection only (it may belong to a running
    /// coordinator); writes fail.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Self, LogError> {
        Ok(DecisionLog { store: Arc::new(RocksStore::open_read_only(dir, COLUMN_FAMILIES)?) })
    }

    /// The epoch of the last coordinator run (0 for a new log).
    pub fn epoch(&self) -> Result<u64, LogError> {
        match self.store.get(CF_META, EPOCH_KEY)? {
            None => Ok(0),
            Some(v) => Ok(u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| LogError::Corrupt { cf: CF_META, detail: format!("epoch has {} bytes, expected 8", v.len()) })?,
            )),
        }
    }

    /// A log over any store with [`COLUMN_FAMILIES`] (tests use [`twopc_storage::MemStore`]).
    pub fn with_store(store: Arc<dyn LogStore>) -> Self {
        DecisionLog { store }
    }

    /// The underlying store, for its counters.
    pub fn store(&self) -> &Arc<dyn LogStore> {
        &self.store
    }

    /// Raises the persisted epoch by one, durably, and returns it.
    pub async fn next_epoch(&self) -> Result<u64, LogError> {
        let last = match self.store.get(CF_META, EPOCH_KEY)? {
            None => 0,
            Some(v) => u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| LogError::Corrupt { cf: CF_META, detail: format!("epoch has {} bytes, expected 8", v.len()) })?,
            ),
        };
        let epoch =
            last.checked_add(1).ok_or(LogError::Corrupt { cf: CF_META, detail: "the epoch cannot be raised past u64::MAX".into() })?;
        let mut b = Batch::new();
        b.put(CF_META, EPOCH_KEY.to_vec(), epoch.to_be_bytes().to_vec());
        wait(self.store.submit(b, Durability::Synced)).await?;
        Ok(epoch)
    }

    /// Every decision record, in transaction order.
    pub fn load(&self) -> Result<Vec<(TxnId, DecisionRecord)>, LogError> {
        self.store
            .scan_prefix(CF_DECISIONS, b"")?
            .into_iter()
            .map(|(k, v)| {
                let txn = TxnId::from_key(&k)
                    .ok_or_else(|| LogError::Corrupt { cf: CF_DECISIONS, detail: format!("key of {} bytes", k.len()) })?;
                let rec = DecisionRecord::decode(v.as_slice())
                    .map_err(|e| LogError::Corrupt { cf: CF_DECISIONS, detail: format!("{txn}: {e}") })?;
                Ok((txn, rec))
            })
            .collect()
    }

    /// One transaction's record, if the log holds it.
    pub fn get(&self, txn: TxnId) -> Result<Option<DecisionRecord>, LogError> {
        match self.store.get(CF_DECISIONS, &txn.to_key())? {
            None => Ok(None),
            Some(v) => DecisionRecord::decode(v.as_slice())
                .map(Some)
                .map_err(|e| LogError::Corrupt { cf: CF_DECISIONS, detail: format!("{txn}: {e}") }),
        }
    }

    /// Submits a decision record.
    pub fn persist(&self, txn: TxnId, record: &DecisionRecord, synced: bool) -> WriteTicket {
        self.store.submit(Self::record_batch(txn, record), if synced { Durability::Synced } else { Durability::Lazy })
    }

    /// Like [`DecisionLog::persist`], with `done` called on the writer's
    /// thread once the outcome is known.
    pub fn persist_then(&self, txn: TxnId, record: &DecisionRecord, synced: bool, done: twopc_storage::Completion) {
        self.store.submit_then(Self::record_batch(txn, record), if synced { Durability::Synced } else { Durability::Lazy }, done)
    }

    fn record_batch(txn: TxnId, record: &DecisionRecord) -> Batch {
        let mut b = Batch::new();
        b.put(CF_DECISIONS, txn.to_key().to_vec(), record.encode_to_vec());
        b
    }

    /// The garbage-collection horizon: the highest id whose record was
    /// deleted.
    pub fn horizon(&self) -> Result<Option<TxnId>, LogError> {
        match self.store.get(CF_META, HORIZON_KEY)? {
            None => Ok(None),
            Some(v) => TxnId::from_key(&v)
                .map(Some)
                .ok_or_else(|| LogError::Corrupt { cf: CF_META, detail: format!("gc_horizon has {} bytes, expected 16", v.len()) }),
        }
    }

    /// Deletes a finished transaction's record and raises the horizon, in
    /// one lazy batch.
    pub fn forget(&self, txn: TxnId, horizon: TxnId) -> WriteTicket {
        self.store.submit(Self::forget_batch(txn, horizon), Durability::Lazy)
    }

    /// Like [`DecisionLog::forget`], with `done` called on the writer's
    /// thread once the outcome is known.
    pub fn forget_then(&self, txn: TxnId, horizon: TxnId, done: twopc_storage::Completion) {
        self.store.submit_then(Self::forget_batch(txn, horizon), Durability::Lazy, done)
    }

    fn forget_batch(txn: TxnId, horizon: TxnId) -> Batch {
        let mut b = Batch::new();
        b.delete(CF_DECISIONS, txn.to_key().to_vec());
        b.put(CF_META, HORIZON_KEY.to_vec(), horizon.to_key().to_vec());
        b
    }

    fn marker_key(epoch: u64, participant: &ParticipantName) -> Vec<u8> {
        let mut k = MARKER_PREFIX.to_vec();
        k.extend_from_slice(&epoch.to_be_bytes());
        k.extend_from_slice(participant.as_str().as_bytes());
        k
    }

    /// Writes the one-phase marker of run `epoch` for `participant`, synced;
    /// `done` is called on the writer's thread.
    pub fn persist_marker_then(&self, epoch: u64, participant: &ParticipantName, done: twopc_storage::Completion) {
        let mut b = Batch::new();
        b.put(CF_META, Self::marker_key(epoch, participant), Vec::new());
        self.store.submit_then(b, Durability::Synced, done);
    }

    /// Deletes the one-phase markers of `participant` for runs `epochs`,
    /// synced; `done` is called on the writer's thread.
    pub fn clear_markers_then(&self, participant: &ParticipantName, epochs: &[u64], done: twopc_storage::Completion) {
        let mut b = Batch::new();
        for e in epochs {
            b.delete(CF_META, Self::marker_key(*e, participant));
        }
        self.store.submit_then(b, Durability::Synced, done);
    }

    /// Every one-phase marker: (run epoch, participant).
    pub fn markers(&self) -> Result<Vec<(u64, ParticipantName)>, LogError> {
        self.store
            .scan_prefix(CF_META, MARKER_PREFIX)?
            .into_iter()
            .map(|(k, _)| {
                let rest = &k[MARKER_PREFIX.len()..];
                let corrupt = || LogError::Corrupt { cf: CF_META, detail: format!("one-phase marker key of {} bytes", k.len()) };
                let (epoch, name) = rest.split_at_checked(8).ok_or_else(corrupt)?;
                let epoch = u64::from_be_bytes(epoch.try_into().map_err(|_| corrupt())?);
                let name = String::from_utf8(name.to_vec()).ok().and_then(|n| ParticipantName::new(n).ok()).ok_or_else(corrupt)?;
                Ok((epoch, name))
            })
            .collect()
    }

    /// The participant registry.
    pub fn registry(&self) -> Result<Vec<(ParticipantName, String)>, LogError> {
        self.store
            .scan_prefix(CF_PARTICIPANTS, b"")?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8(k).ok().and_then(|n| ParticipantName::new(n).ok());
                let endpoint = String::from_utf8(v).ok();
                match (name, endpoint) {
                    (Some(n), Some(e)) => Ok((n, e)),
                    _ => Err(LogError::Corrupt { cf: CF_PARTICIPANTS, detail: "entry is not a valid name and endpoint".into() }),
                }
            })
            .collect()
    }

    /// Records a participant's endpoint, durably.
    pub async fn register(&self, name: &ParticipantName, endpoint: &str) -> Result<(), LogError> {
        let mut b = Batch::new();
        b.put(CF_PARTICIPANTS, name.as_str().as_bytes().to_vec(), endpoint.as_bytes().to_vec());
        Ok(wait(self.store.submit(b, Durability::Synced)).await?)
    }
}
