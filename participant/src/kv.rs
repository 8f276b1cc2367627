//! A transactional key-value store on the participant's RocksDB: the ready
//! [`Resource`] most services can use as it is.
//!
//! - Writes are staged per transaction, in memory, under per-key locks held
//!   from the first access until the decision. A second transaction that
//!   touches a locked key waits up to the lock-wait bound (a tenth of it when
//!   the holder is older: wait-die, so cross-service deadlocks break fast)
//!   and then gets [`KvError::LockConflict`] (or votes NO, for an Execute
//!   payload); it never overwrites.
//! - Reads inside a transaction lock the key too and see the transaction's
//!   own writes; [`KvStore::get`] outside a transaction sees committed data.
//! - Prepare writes the staged set to the `kv_staged` column family in the
//!   same synced batch as the PREPARED record. Commit applies it to `kv_data`
//!   and deletes it from `kv_staged` in the same atomic batch as the
//!   COMMITTED record, so a crash can never apply a transaction twice or
//!   half.
//! - After a restart, [`Resource::recover`] reloads the staged sets of
//!   prepared transactions and re-takes their locks before any request.
//!
//! # Payload format (Execute branches and `twopc execute`)
//!
//! UTF-8 text: operations separated by `;` or newlines, words separated by
//! spaces, words with spaces or `;` in double quotes (`\"` and `\\` escape).
//!
//! | operation | effect |
//! |---|---|
//! | `put KEY VALUE` | set KEY to VALUE |
//! | `delete KEY` | remove KEY |
//! | `incr KEY DELTA` | add the signed integer DELTA to KEY (missing = 0) |
//! | `check KEY OP N` | vote NO unless KEY OP N, with OP one of `>= > <= < == !=` (missing = 0) |
//! | `check KEY exists` / `check KEY absent` | vote NO unless KEY is present / absent |
//!
//! Operations run in order against the transaction's own view, so
//! `incr alice -30; check alice >= 0` debits 30 only if the balance stays
//! non-negative. A payload that does not parse makes the participant vote NO
//! with the parse error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use twopc_proto::{TxnId, Vote};
use twopc_storage::{Batch, Cf, LogStore, StorageError};

use crate::resource::{Resource, ResourceError};

const CF_DATA: &str = "kv_data";
const CF_STAGED: &str = "kv_staged";

/// Errors of key-value operations inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// Another transaction holds the key past the lock-wait bound.
    #[error("key {key:?} is locked by transaction {holder}")]
    LockConflict {
        /// The key, lossily as text.
        key: String,
        /// Who holds it.
        holder: TxnId,
    },
    /// An increment or numeric check on a value that is not an integer.
    #[error("value of key {key:?} is not an integer")]
    NotInteger {
        /// The key.
        key: String,
    },
    /// An increment that would overflow.
    #[error("increment of key {key:?} overflows")]
    Overflow {
        /// The key.
        key: String,
    },
    /// A write after the transaction started preparing or finished here.
    #[error("transaction {0} no longer accepts work here (it is preparing or finished)")]
    Closed(TxnId),
    /// The store failed.
    #[error("store: {0}")]
    Storage(String),
    /// The store is not attached to a participant yet.
    #[error("the key-value store is not attached to a participant yet")]
    Detached,
}

impl From<StorageError> for KvError {
    fn from(e: StorageError) -> Self {
        KvError::Storage(e.to_string())
    }
}

/// A comparison in a `check` operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `>=`
    Ge,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `<`
    Lt,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Cmp {
    fn holds(self, a: i64, b: i64) -> bool {
        match self {
            Cmp::Ge => a >= b,
            Cmp::Gt => a > b,
            Cmp::Le => a <= b,
            Cmp::Lt => a < b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Cmp::Ge => ">=",
            Cmp::Gt => ">",
            Cmp::Le => "<=",
            Cmp::Lt => "<",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
        }
    }
}

/// One operation of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Set a key.
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove a key.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// Add to an integer value.
    Incr {
        /// Key.
        key: Vec<u8>,
        /// Signed amount.
        delta: i64,
    },
    /// Require a numeric comparison to hold.
    Check {
        /// Key.
        key: Vec<u8>,
        /// Comparison.
        cmp: Cmp,
        /// Right-hand side.
        value: i64,
    },
    /// Require the key to exist (`true`) or be absent (`false`).
    Exists {
        /// Key.
        key: Vec<u8>,
        /// Expected presence.
        present: bool,
    },
}

impl KvOp {
    fn key(&self) -> &[u8] {
        match self {
            KvOp::Put { key, .. } | KvOp::Delete { key } | KvOp::Incr { key, .. } | KvOp::Check { key, .. } | KvOp::Exists { key, .. } => {
                key
            }
        }
    }
}

fn tokenize(stmt: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = stmt.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => word.push(e),
                        _ => return Err("only \\\" and \\\\ may be escaped".into()),
                    },
                    Some(ch) => word.push(ch),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn split_statements(text: &str) -> Vec<String> {
    let mut stmts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        if quoted {
            cur.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            ';' | '\n' => stmts.push(std::mem::take(&mut cur)),
            '"' => {
                quoted = true;
                cur.push(c);
            }
            _ => cur.push(c),
        }
    }
    stmts.push(cur);
    stmts.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// Parses a payload (see the module docs). Errors name the statement.
pub fn parse_ops(payload: &[u8]) -> Result<Vec<KvOp>, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_owned())?;
    let mut ops = Vec::new();
    for (i, stmt) in split_statements(text).iter().enumerate() {
        let at = |m: &str| format!("operation {} ({:?}): {m}", i + 1, stmt.trim());
        let words = tokenize(stmt).map_err(|e| at(&e))?;
        let int = |w: &str| w.parse::<i64>().map_err(|_| at(&format!("{w:?} is not an integer")));
        let op = match words.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["put", k, v] => KvOp::Put { key: k.as_bytes().to_vec(), value: v.as_bytes().to_vec() },
            ["delete" | "del", k] => KvOp::Delete { key: k.as_bytes().to_vec() },
            ["incr", k, d] => KvOp::Incr { key: k.as_bytes().to_vec(), delta: int(d)? },
            ["check", k, "exists"] => KvOp::Exists { key: k.as_bytes().to_vec(), present: true },
            ["check", k, "absent"] => KvOp::Exists { key: k.as_bytes().to_vec(), present: false },
            ["check", k, op, n] => {
                let cmp = match *op {
                    ">=" => Cmp::Ge,
                    ">" => Cmp::Gt,
                    "<=" => Cmp::Le,
                    "<" => Cmp::Lt,
                    "==" => Cmp::Eq,
                    "!=" => Cmp::Ne,
                    other => return Err(at(&format!("unknown comparison {other:?}"))),
                };
                KvOp::Check { key: k.as_bytes().to_vec(), cmp, value: int(n)? }
            }
            _ => return Err(at("expected put KEY VALUE | delete KEY | incr KEY DELTA | check KEY OP N | check KEY exists|absent")),
        };
        if op.key().is_empty() {
            return Err(at("empty key"));
        }
        ops.push(op);
    }
    if ops.is_empty() {
        return Err("payload has no operations".into());
    }
    Ok(ops)
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn staged_key(txn: TxnId, key: &[u8]) -> Vec<u8> {
    let mut k = txn.to_key().to_vec();
    k.extend_from_slice(key);
    k
}

fn parse_int(key: &[u8], v: Option<&[u8]>) -> Result<i64, KvError> {
    match v {
        None => Ok(0),
        Some(b) => std::str::from_utf8(b).ok().and_then(|s| s.trim().parse().ok()).ok_or(KvError::NotInteger { key: show(key) }),
    }
}

type WriteSet = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// How long a closed transaction is remembered: past the longest
/// transaction timeout, no handler can still be running for it.
const CLOSED_FOR: Duration = Duration::from_secs(600);

#[derive(Default)]
struct State {
    /// Key → the transaction holding its lock.
    locks: HashMap<Vec<u8>, TxnId>,
    /// Keys each transaction holds.
    held: HashMap<TxnId, Vec<Vec<u8>>>,
    /// Staged writes (None = delete).
    staged: HashMap<TxnId, WriteSet>,
    /// Transactions that no longer take new work: preparing or finished.
    closed: HashMap<TxnId, Instant>,
    /// The same, oldest first, to expire them in order.
    closed_order: std::collections::VecDeque<(Instant, TxnId)>,
}

impl State {
    /// Marks `txn` as taking no more work, and forgets transactions closed
    /// longer than [`CLOSED_FOR`] ago (oldest first, so each close costs
    /// amortised constant time).
    fn close(&mut self, txn: TxnId) {
        let now = Instant::now();
        self.closed.insert(txn, now);
        self.closed_order.push_back((now, txn));
        while let Some((at, old)) = self.closed_order.front().copied() {
            if now.duration_since(at) < CLOSED_FOR {
                break;
            }
            self.closed_order.pop_front();
            if self.closed.get(&old) == Some(&at) {
                self.closed.remove(&old);
            }
        }
    }
}

struct Inner {
    store: OnceLock<Arc<dyn LogStore>>,
    state: Mutex<State>,
    released: Notify,
    lock_wait: Duration,
}

/// The transactional key-value store. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct KvStore {
    inner: Arc<Inner>,
}

impl Default for KvStore {
    fn default() -> Self {
        Self::new(Duration::from_millis(500))
    }
}

impl KvStore {
    /// A store whose lock waits are bounded by `lock_wait`. Pass it to the
    /// participant builder as its resource; it is usable once the
    /// participant opened.
    pub fn new(lock_wait: Duration) -> Self {
        KvStore {
            inner: Arc::new(Inner { store: OnceLock::new(), state: Mutex::new(State::default()), released: Notify::new(), lock_wait }),
        }
    }

    fn store(&self) -> Result<&Arc<dyn LogStore>, KvError> {
        self.inner.store.get().ok_or(KvError::Detached)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere mid-update of plain
        // maps; the maps themselves stay consistent enough to go on.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads committed data.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.store()?.get(CF_DATA, key)?)
    }

    /// Every committed key starting with `prefix`, in order.
    pub fn scan(&self, prefix: &[u8]) -> Result<twopc_storage::Rows, KvError> {
        Ok(self.store()?.scan_prefix(CF_DATA, prefix)?)
    }

    /// Number of keys locked right now (for tests and metrics).
    pub fn locked_keys(&self) -> usize {
        self.state().locks.len()
    }

    /// A view of the store inside transaction `txn`.
    pub fn txn(&self, txn: TxnId) -> KvTxn {
        KvTxn { kv: self.clone(), txn }
    }

    /// Takes `key`'s lock for `txn`. Deadlocks are bounded by a wait-die
    /// rule on transaction age (ids order by creation): a transaction waits
    /// up to the full lock-wait bound for a younger holder, but only a tenth
    /// of it for an older one. Every wait cycle contains a younger-waits-for-
    /// older edge, so a cross-service deadlock breaks within that tenth
    /// instead of stalling every member for the full bound.
    async fn lock(&self, txn: TxnId, key: &[u8]) -> Result<(), KvError> {
        let start = tokio::time::Instant::now();
        let far = start + Duration::from_secs(86_400 * 365);
        let mut give_up = start.checked_add(self.inner.lock_wait).unwrap_or(far);
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut st = self.state();
                if st.closed.contains_key(&txn) {
                    return Err(KvError::Closed(txn));
                }
                match st.locks.get(key) {
                    Some(h) if *h == txn => return Ok(()),
                    Some(h) => {
                        let holder = *h;
                        if holder < txn {
                            give_up = give_up.min(start.checked_add(self.inner.lock_wait / 10).unwrap_or(far));
                        }
                        if tokio::time::Instant::now() >= give_up {
                            return Err(KvError::LockConflict { key: show(key), holder });
                        }
                    }
                    None => {
                        st.locks.insert(key.to_vec(), txn);
                        st.held.entry(txn).or_default().push(key.to_vec());
                        return Ok(());
                    }
                }
            }
            let _ = tokio::time::timeout_at(give_up, released).await;
        }
    }

    fn view(&self, txn: TxnId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(v) = self.state().staged.get(&txn).and_then(|w| w.get(key)) {
            return Ok(v.clone());
        }
        self.get(key)
    }

    fn stage(&self, txn: TxnId, key: &[u8], value: Option<Vec<u8>>) -> Result<(), KvError> {
        let mut st = self.state();
        if st.closed.contains_key(&txn) {
            return Err(KvError::Closed(txn));
        }
        st.staged.entry(txn).or_default().insert(key.to_vec(), value);
        Ok(())
    }

    fn release(&self, txn: TxnId, close: bool) {
        let mut st = self.state();
        if let Some(keys) = st.held.remove(&txn) {
            for k in keys {
                if st.locks.get(&k) == Some(&txn) {
                    st.locks.remove(&k);
                }
            }
        }
        st.staged.remove(&txn);
        if close {
            st.close(txn);
        }
        drop(st);
        self.inner.released.notify_waiters();
    }

    /// Runs payload operations inside `txn`. `Err` is a refusal reason.
    async fn run_ops(&self, txn: TxnId, ops: &[KvOp]) -> Result<(), String> {
        // Lock every key first, in key order, so two payloads never deadlock.
        let mut keys: Vec<&[u8]> = ops.iter().map(KvOp::key).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            self.lock(txn, k).await.map_err(|e| e.to_string())?;
        }
        let t = self.txn(txn);
        for op in ops {
            match op {
                KvOp::Put { key, value } => t.put(key, value).await.map_err(|e| e.to_string())?,
                KvOp::Delete { key } => t.delete(key).await.map_err(|e| e.to_string())?,
                KvOp::Incr { key, delta } => {
                    t.incr(key, *delta).await.map_err(|e| e.to_string())?;
                }
                KvOp::Check { key, cmp, value } => {
                    let cur = t.get_int(key).await.map_err(|e| e.to_string())?;
                    if !cmp.holds(cur, *value) {
                        return Err(format!("check {} {} {} failed: value is {cur}", show(key), cmp.symbol(), value));
                    }
                }
                KvOp::Exists { key, present } => {
                    let is = t.get(key).await.map_err(|e| e.to_string())?.is_some();
                    if is != *present {
                        return Err(format!("check {} {} failed", show(key), if *present { "exists" } else { "absent" }));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The key-value store inside one transaction. Every access locks the key
/// for the transaction until its outcome.
#[derive(Clone)]
pub struct KvTxn {
    kv: KvStore,
    txn: TxnId,
}

impl KvTxn {
    /// The transaction.
    pub fn id(&self) -> TxnId {
        self.txn
    }

    /// Reads `key` as this transaction sees it.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.kv.lock(self.txn, key).await?;
        self.kv.view(self.txn, key)
    }

    /// Reads `key` as an integer (missing = 0).
    pub async fn get_int(&self, key: &[u8]) -> Result<i64, KvError> {
        let v = self.get(key).await?;
        parse_int(key, v.as_deref())
    }

    /// Stages `key = value`.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.kv.lock(self.txn, key).await?;
        self.kv.stage(self.txn, key, Some(value.to_vec()))
    }

    /// Stages the removal of `key`.
    pub async fn delete(&self, key: &[u8]) -> Result<(), KvError> {
        self.kv.lock(self.txn, key).await?;
        self.kv.stage(self.txn, key, None)
    }

    /// Adds `delta` to the integer at `key` (missing = 0); returns the new
    /// value.
    pub async fn incr(&self, key: &[u8], delta: i64) -> Result<i64, KvError> {
        let cur = self.get_int(key).await?;
        let new = cur.checked_add(delta).ok_or(KvError::Overflow { key: show(key) })?;
        self.kv.stage(self.txn, key, Some(new.to_string().into_bytes()))?;
        Ok(new)
    }
}

#[tonic::async_trait]
impl Resource for KvStore {
    fn column_families(&self) -> Vec<Cf> {
        vec![CF_DATA, CF_STAGED]
    }

    fn attach(&self, store: Arc<dyn LogStore>) -> Result<(), ResourceError> {
        self.inner.store.set(store).map_err(|_| ResourceError("the key-value store is already attached to a participant".into()))
    }

    async fn recover(&self, prepared: &[TxnId]) -> Result<(), ResourceError> {
        let store = self.store().map_err(|e| ResourceError(e.to_string()))?;
        let rows = store.scan_prefix(CF_STAGED, b"").map_err(|e| ResourceError(e.to_string()))?;
        let mut garbage = Batch::new();
        {
            let mut st = self.state();
            for (k, v) in rows {
                let Some(txn) = k.get(..16).and_then(TxnId::from_key) else { continue };
                let key = k[16..].to_vec();
                if !prepared.contains(&txn) {
                    // Staged by a branch that aborted (its lazy cleanup was lost).
                    garbage.delete(CF_STAGED, k);
                    continue;
                }
                let value = match v.split_first() {
                    Some((1, rest)) => Some(rest.to_vec()),
                    _ => None,
                };
                st.locks.insert(key.clone(), txn);
                st.held.entry(txn).or_default().push(key.clone());
                st.staged.entry(txn).or_default().insert(key, value);
            }
            for t in prepared {
                st.close(*t);
            }
        }
        if !garbage.is_empty() {
            twopc_storage::wait(store.submit(garbage, twopc_storage::Durability::Lazy)).await.map_err(|e| ResourceError(e.to_string()))?;
        }
        Ok(())
    }

    async fn prepare(&self, txn: TxnId, payload: Option<&[u8]>, batch: &mut Batch) -> Result<Vote, ResourceError> {
        if let Some(p) = payload {
            let ops = match parse_ops(p) {
                Ok(ops) => ops,
                Err(e) => return Ok(Vote::No(format!("bad payload: {e}"))),
            };
            if let Err(why) = self.run_ops(txn, &ops).await {
                return Ok(Vote::No(why));
            }
        }
        let mut st = self.state();
        st.close(txn);
        let Some(writes) = st.staged.get(&txn).filter(|w| !w.is_empty()) else {
            return Ok(Vote::ReadOnly);
        };
        for (k, v) in writes {
            let enc = match v {
                Some(v) => [&[1u8][..], v].concat(),
                None => vec![0u8],
            };
            batch.put(CF_STAGED, staged_key(txn, k), enc);
        }
        Ok(Vote::Yes)
    }

    async fn commit(&self, txn: TxnId, batch: &mut Batch) -> Result<(), ResourceError> {
        let st = self.state();
        if let Some(writes) = st.staged.get(&txn) {
            for (k, v) in writes {
                match v {
                    Some(v) => batch.put(CF_DATA, k.clone(), v.clone()),
                    None => batch.delete(CF_DATA, k.clone()),
                };
                batch.delete(CF_STAGED, staged_key(txn, k));
            }
        }
        Ok(())
    }

    async fn abort(&self, txn: TxnId, batch: &mut Batch) -> Result<(), ResourceError> {
        let mut st = self.state();
        st.close(txn);
        if let Some(writes) = st.staged.get(&txn) {
            for k in writes.keys() {
                batch.delete(CF_STAGED, staged_key(txn, k));
            }
        }
        Ok(())
    }

    fn finished(&self, txn: TxnId, _committed: bool) {
        self.release(txn, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operation() {
        let ops = parse_ops(b"put a 1; delete b\nincr c -30 ; check c >= 0; check d exists; check e absent; put \"k 1\" \"v;\\\"x\"")
            .expect("parses");
        assert_eq!(
            ops,
            vec![
                KvOp::Put { key: b"a".to_vec(), value: b"1".to_vec() },
                KvOp::Delete { key: b"b".to_vec() },
                KvOp::Incr { key: b"c".to_vec(), delta: -30 },
                KvOp::Check { key: b"c".to_vec(), cmp: Cmp::Ge, value: 0 },
                KvOp::Exists { key: b"d".to_vec(), present: true },
                KvOp::Exists { key: b"e".to_vec(), present: false },
                KvOp::Put { key: b"k 1".to_vec(), value: b"v;\"x".to_vec() },
            ]
        );
    }

    #[test]
    fn rejects_bad_payloads_with_the_statement() {
        for (bad, needle) in [
            (&b""[..], "no operations"),
            (b"frob x", "operation 1"),
            (b"put a 1; incr b ten", "\"ten\" is not an integer"),
            (b"check a => 3", "unknown comparison"),
            (b"put \"a 1", "unterminated quote"),
            (b"\xff", "not UTF-8"),
            (b"put \"\" 1", "empty key"),
        ] {
            let e = parse_ops(bad).expect_err("must be refused");
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }
}
