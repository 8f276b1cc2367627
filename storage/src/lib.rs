//! The durable log both roles write, written once.
//!
//! The coordinator's decision log, the participant's prepared log and the
//! key-value resource's data all live in one RocksDB per process, in column
//! families. Every write goes through one group-commit writer thread: it takes
//! every request that is ready, merges them into one RocksDB write batch, and
//! issues one write, synced if any request asked for durability. So fsyncs per
//! record fall as load rises, while each caller still waits only for its own
//! record.
//!
//! # Durability contract
//!
//! - A [`Batch`] is atomic: after a crash either all of its operations are
//!   visible or none is.
//! - A batch written with [`Durability::Synced`] is on stable storage (the
//!   RocksDB WAL fsync'd) when its [`WriteTicket`] resolves `Ok`. Nothing may
//!   depend on it before that.
//! - A batch written with [`Durability::Lazy`] is visible to reads when its
//!   ticket resolves, and becomes durable no later than the next synced write
//!   (the WAL is sequential); a crash may lose it.
//! - Writes are applied in submission order.
//!
//! [`MemStore`] keeps the same contract in memory (everything "durable" at
//! once) for tests and simulations; [`conformance`] checks both.
//!
//! The writer records [`METRIC_SYNC_SECONDS`] and [`METRIC_BATCH_REQUESTS`]
//! for every synced write through the `metrics` facade (a no-op unless the
//! process installs a recorder).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

pub mod conformance;
pub mod crash;
pub mod timers;

/// A column family name. Each user of the store declares its own.
pub type Cf = &'static str;

/// Key-value rows read back from a column family, in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Errors of the store. All of them mean the store cannot be trusted to
/// persist anything further: callers treat them as fatal for the write and
/// answer `Unavailable`, never as a successful write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A column family that was not declared at open.
    #[error("unknown column family {0:?}")]
    UnknownColumnFamily(String),
    /// The writer thread is gone (the store is shutting down).
    #[error("the log writer has stopped")]
    Closed,
    /// The store was opened read-only (for inspection).
    #[error("the store is open read-only")]
    ReadOnly,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value` in `cf`.
    Put {
        /// Column family.
        cf: Cf,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove `key` from `cf` (no error if absent).
    Delete {
        /// Column family.
        cf: Cf,
        /// Key bytes.
        key: Vec<u8>,
    },
}

/// Operations applied atomically, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Put { cf, key: key.into(), value: value.into() });
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete { cf, key: key.into() });
        self
    }

    /// Appends every operation of `other`.
    pub fn append(&mut self, other: Batch) -> &mut Self {
        self.ops.extend(other.ops);
        self
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

/// How durable a write must be before its ticket resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync'd: survives a crash.
    Synced,
    /// Written to the WAL without waiting for fsync: may be lost by a crash.
    Lazy,
}

/// Resolves when a submitted batch is written with the asked durability.
pub type WriteTicket = tokio::sync::oneshot::Receiver<Result<(), StorageError>>;

/// What [`LogStore::submit_then`] calls with a write's outcome.
pub type Completion = Box<dyn FnOnce(Result<(), StorageError>) + Send + 'static>;

/// Hands `msg` to a driver's queue from a thread outside the runtime (a
/// [`Completion`] on the writer's thread): at once when the queue has room,
/// else from a task on `runtime`, so the caller never blocks.
pub fn hand_over<T: Send + 'static>(tx: &tokio::sync::mpsc::Sender<T>, runtime: &tokio::runtime::Handle, msg: T) {
    if let Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
        let tx = tx.clone();
        runtime.spawn(async move {
            let _ = tx.send(msg).await;
        });
    }
}

/// Who hears a write's outcome (each held in an `Option` so that it is
/// told at most once).
enum Done {
    /// A dropped, untold sender reads as [`StorageError::Closed`] from
    /// [`wait`].
    Ticket(Option<tokio::sync::oneshot::Sender<Result<(), StorageError>>>),
    /// A request dropped unfinished (the writer thread gone) calls it with
    /// [`StorageError::Closed`].
    Call(Option<Completion>),
}

impl Done {
    fn finish(mut self, result: Result<(), StorageError>) {
        match &mut self {
            Done::Ticket(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(result);
                }
            }
            Done::Call(f) => {
                if let Some(f) = f.take() {
                    f(result);
                }
            }
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Done::Call(f) = self
            && let Some(f) = f.take()
        {
            f(Err(StorageError::Closed));
        }
    }
}

/// Waits for a ticket, mapping a dropped writer to [`StorageError::Closed`].
pub async fn wait(ticket: WriteTicket) -> Result<(), StorageError> {
    ticket.await.unwrap_or(Err(StorageError::Closed))
}

/// Counters of the group-commit writer, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches submitted by callers.
    pub requests: u64,
    /// RocksDB writes issued (each carries one or more requests).
    pub writes: u64,
    /// Of those, writes that were synced.
    pub synced_writes: u64,
}

/// What a durable log offers its users. See the crate docs for the
/// durability contract every implementation keeps.
pub trait LogStore: Send + Sync + 'static {
    /// Submits a batch. Never blocks; the ticket resolves when written.
    fn submit(&self, batch: Batch, durability: Durability) -> WriteTicket;
    /// Submits a batch and calls `done` with the outcome as soon as it is
    /// known — on the writer's own thread, with no task in between, so it
    /// must be quick and must not block (send a message, say). The outcome
    /// means what a [`WriteTicket`]'s does.
    fn submit_then(&self, batch: Batch, durability: Durability, done: Completion);
    /// Reads one key.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Reads every key of a column family whose key starts with `prefix`, in
    /// key order.
    fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Rows, StorageError>;
    /// Writer counters so far.
    fn stats(&self) -> WriterStats;
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    writes: AtomicU64,
    synced_writes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WriterStats {
        WriterStats {
            requests: self.requests.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            synced_writes: self.synced_writes.load(Ordering::Relaxed),
        }
    }
}

struct WriteRequest {
    batch: Batch,
    durability: Durability,
    done: Done,
}

/// Histogram of the latency of each synced (fsync'd) group write, in seconds.
pub const METRIC_SYNC_SECONDS: &str = "twopc_log_sync_seconds";
/// Histogram of the number of requests merged into each synced group write:
/// how well group commit amortises fsyncs.
pub const METRIC_BATCH_REQUESTS: &str = "twopc_log_batch_requests";

/// Most requests merged into one RocksDB write, so one huge burst cannot
/// delay the first caller unboundedly.
const MAX_GROUP: usize = 1024;

/// The RocksDB-backed store with its group-commit writer thread.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<RocksInner>,
}

struct RocksInner {
    db: Arc<rocksdb::DB>,
    tx: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    read_only: bool,
}

impl Drop for RocksInner {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and exit;
        // joining it releases its handle on the DB before ours is dropped.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(h) = w.take()
        {
            let _ = h.join();
        }
    }
}

impl RocksStore {
    /// Opens (creating if needed) the RocksDB at `path` with the given
    /// column families, and starts its writer thread.
    pub fn open(path: impl AsRef<Path>, cfs: &[Cf]) -> Result<Self, StorageError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|e| StorageError::Rocks(format!("create {}: {e}", path.display())))?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Small records, read back mostly at recovery: modest memtables keep
        // many test and demo processes light.
        opts.set_write_buffer_size(16 << 20);
        let db = rocksdb::DB::open_cf(&opts, path, cfs.iter().copied()).map_err(|e| StorageError::Rocks(e.to_string()))?;
        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel::<WriteRequest>();
        let writer = {
            let db = db.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("twopc-log-writer".into())
                .spawn(move || writer_loop(&db, &rx, &counters))
                .map_err(|e| StorageError::Rocks(format!("spawn writer: {e}")))?
        };
        Ok(RocksStore {
            inner: Arc::new(RocksInner { db, tx: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)), counters, read_only: false }),
        })
    }

    /// Opens an existing store for reading only, without a writer and
    /// without taking RocksDB's lock, so that a running process's data can
    /// be inspected. Every write fails with [`StorageError::ReadOnly`].
    pub fn open_read_only(path: impl AsRef<Path>, cfs: &[Cf]) -> Result<Self, StorageError> {
        let path = path.as_ref();
        if !path.join("CURRENT").exists() {
            return Err(StorageError::Rocks(format!("{} holds no store", path.display())));
        }
        let opts = rocksdb::Options::default();
        let db =
            rocksdb::DB::open_cf_for_read_only(&opts, path, cfs.iter().copied(), false).map_err(|e| StorageError::Rocks(e.to_string()))?;
        Ok(RocksStore {
            inner: Arc::new(RocksInner {
                db: Arc::new(db),
                tx: Mutex::new(None),
                writer: Mutex::new(None),
                counters: Arc::default(),
                read_only: true,
            }),
        })
    }
}

fn writer_loop(db: &rocksdb::DB, rx: &mpsc::Receiver<WriteRequest>, counters: &Counters) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let sync = group.iter().any(|r| r.durability == Durability::Synced);
        let started = std::time::Instant::now();
        let result = write_group(db, &group, sync);
        if sync {
            // Through the `metrics` facade: a no-op unless the process
            // installed a recorder (the coordinator daemon does).
            metrics::histogram!(METRIC_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::histogram!(METRIC_BATCH_REQUESTS).record(group.len() as f64);
        }
        counters.requests.fetch_add(group.len() as u64, Ordering::Relaxed);
        counters.writes.fetch_add(1, Ordering::Relaxed);
        if sync {
            counters.synced_writes.fetch_add(1, Ordering::Relaxed);
        }
        for r in group {
            // A completion that panics must not take the writer (and every
            // later write) down with it.
            let result = result.clone();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || r.done.finish(result))).is_err() {
                tracing::error!("a write completion panicked");
            }
        }
    }
}

fn write_group(db: &rocksdb::DB, group: &[WriteRequest], sync: bool) -> Result<(), StorageError> {
    let mut wb = rocksdb::WriteBatch::default();
    for req in group {
        for op in req.batch.ops() {
            match op {
                Op::Put { cf, key, value } => {
                    wb.put_cf(handle(db, cf)?, key, value);
                }
                Op::Delete { cf, key } => {
                    wb.delete_cf(handle(db, cf)?, key);
                }
            }
        }
    }
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(sync);
    db.write_opt(wb, &wo).map_err(|e| StorageError::Rocks(e.to_string()))
}

fn handle<'a>(db: &'a rocksdb::DB, cf: &str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(cf).ok_or_else(|| StorageError::UnknownColumnFamily(cf.to_owned()))
}

impl RocksStore {
    /// Hands a batch to the writer thread; `done` hears the outcome.
    fn enqueue(&self, batch: Batch, durability: Durability, done: Done) {
        if self.inner.read_only {
            return done.finish(Err(StorageError::ReadOnly));
        }
        // A batch naming an unknown column family fails alone, before it can
        // join (and fail) a group with other callers' records.
        if let Some(bad) = batch.ops().iter().map(op_cf).find(|cf| self.inner.db.cf_handle(cf).is_none()) {
            return done.finish(Err(StorageError::UnknownColumnFamily(bad.to_owned())));
        }
        let req = WriteRequest { batch, durability, done };
        let sent = match self.inner.tx.lock() {
            Ok(tx) => match tx.as_ref() {
                Some(tx) => tx.send(req).map_err(|e| e.0),
                None => Err(req),
            },
            Err(_) => Err(req),
        };
        if let Err(req) = sent {
            req.done.finish(Err(StorageError::Closed));
        }
    }
}

impl LogStore for RocksStore {
    fn submit(&self, batch: Batch, durability: Durability) -> WriteTicket {
        let (done, ticket) = tokio::sync::oneshot::channel();
        self.enqueue(batch, durability, Done::Ticket(Some(done)));
        ticket
    }

    fn submit_then(&self, batch: Batch, durability: Durability, done: Completion) {
        self.enqueue(batch, durability, Done::Call(Some(done)));
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let h = handle(&self.inner.db, cf)?;
        self.inner.db.get_cf(h, key).map_err(|e| StorageError::Rocks(e.to_string()))
    }

    fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Rows, StorageError> {
        let h = handle(&self.inner.db, cf)?;
        let mode = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(h, mode) {
            let (k, v) = item.map_err(|e| StorageError::Rocks(e.to_string()))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    fn stats(&self) -> WriterStats {
        self.inner.counters.snapshot()
    }
}

fn op_cf(op: &Op) -> Cf {
    match op {
        Op::Put { cf, .. } | Op::Delete { cf, .. } => cf,
    }
}

type MemData = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

/// An in-memory store with the same contract, for tests and simulations.
/// Every write is "durable" as soon as it is applied.
#[derive(Clone)]
pub struct MemStore {
    cfs: Arc<Vec<Cf>>,
    data: Arc<Mutex<MemData>>,
    counters: Arc<Counters>,
}

impl MemStore {
    /// An empty store with the given column families.
    pub fn new(cfs: &[Cf]) -> Self {
        MemStore { cfs: Arc::new(cfs.to_vec()), data: Arc::default(), counters: Arc::default() }
    }

    fn check(&self, cf: Cf) -> Result<Cf, StorageError> {
        self.cfs.iter().copied().find(|c| *c == cf).ok_or_else(|| StorageError::UnknownColumnFamily(cf.to_owned()))
    }

    /// Applies a batch at once, all or nothing.
    fn apply(&self, batch: Batch, durability: Durability) -> Result<(), StorageError> {
        let result = (|| {
            for op in batch.ops() {
                self.check(op_cf(op))?;
            }
            let mut data = self.data.lock().map_err(|_| StorageError::Closed)?;
            for op in batch.ops {
                match op {
                    Op::Put { cf, key, value } => {
                        data.insert((cf, key), value);
                    }
                    Op::Delete { cf, key } => {
                        data.remove(&(cf, key));
                    }
                }
            }
            Ok(())
        })();
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if durability == Durability::Synced {
            self.counters.synced_writes.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl LogStore for MemStore {
    fn submit(&self, batch: Batch, durability: Durability) -> WriteTicket {
        let (done, ticket) = tokio::sync::oneshot::channel();
        let _ = done.send(self.apply(batch, durability));
        ticket
    }

    fn submit_then(&self, batch: Batch, durability: Durability, done: Completion) {
        done(self.apply(batch, durability));
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let cf = self.check(cf)?;
        let data = self.data.lock().map_err(|_| StorageError::Closed)?;
        Ok(data.get(&(cf, key.to_vec())).cloned())
    }

    fn scan_prefix(&self, cf: Cf, prefix: &[u8]) -> Result<Rows, StorageError> {
        let cf = self.check(cf)?;
        let data = self.data.lock().map_err(|_| StorageError::Closed)?;
        Ok(data
            .range((cf, prefix.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn stats(&self) -> WriterStats {
        self.counters.snapshot()
    }
}
