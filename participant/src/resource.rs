//! The `Resource` trait: what a participant commits.
//!
//! A resource does the business work of a transaction branch and finishes it
//! either way. The participant calls it from its driver; the protocol core
//! decides when.
//!
//! Contract:
//! - `prepare` makes the branch ready to commit: it validates and stages the
//!   work and adds to `batch` whatever must survive a crash to finish either
//!   way. The batch is written atomically with the PREPARED record, synced,
//!   before YES is sent. Returning NO or READ_ONLY writes nothing.
//! - `commit` and `abort` add their local effects to `batch`, which is written
//!   atomically with the outcome record (commit: synced before the
//!   acknowledgement). Effects outside the participant's store must be
//!   idempotent: after a crash before the outcome record is durable, the same
//!   call is made again.
//! - `finished` runs after that batch is written: release locks and memory.
//! - `recover` runs once at start, before any request, with every branch the
//!   log holds as prepared: re-acquire their locks from the staged state.
//! - Every method may be called for a transaction the resource never saw
//!   (for example an Abort after a restart) and must then do nothing.

use std::sync::Arc;

use twopc_proto::{TxnId, Vote};
use twopc_storage::{Batch, Cf, LogStore};

/// A resource failed; the branch cannot prepare (votes NO) or the outcome
/// must be retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ResourceError(pub String);

/// See the module docs for the contract.
#[tonic::async_trait]
pub trait Resource: Send + Sync + 'static {
    /// Column families this resource keeps in the participant's store.
    fn column_families(&self) -> Vec<Cf> {
        Vec::new()
    }

    /// Gives the resource the participant's store, once, before `recover`.
    fn attach(&self, _store: Arc<dyn LogStore>) -> Result<(), ResourceError> {
        Ok(())
    }

    /// Re-acquires the state of branches prepared before a restart.
    async fn recover(&self, prepared: &[TxnId]) -> Result<(), ResourceError>;

    /// Phase one. `payload` is the Execute branch's payload, if any.
    ///
    /// Its first poll runs on the participant's driver task (most prepares
    /// finish without waiting, and save a task that way); if it waits, it
    /// carries on in a task of its own. So it must not block the thread
    /// (await instead), and must not wait on the participant itself. A
    /// panic votes NO.
    async fn prepare(&self, txn: TxnId, payload: Option<&[u8]>, batch: &mut Batch) -> Result<Vote, ResourceError>;

    /// Phase two, commit.
    async fn commit(&self, txn: TxnId, batch: &mut Batch) -> Result<(), ResourceError>;

    /// Phase two, abort (also of unprepared work).
    async fn abort(&self, txn: TxnId, batch: &mut Batch) -> Result<(), ResourceError>;

    /// The outcome's batch is written; release what the branch held.
    fn finished(&self, txn: TxnId, committed: bool);
}
