//! The example services. Each handler runs inside the caller's transaction:
//! the participant's layer has joined it before the handler is called, and
//! the handler stages its writes in the key-value store under that
//! transaction. A handler that refuses (insufficient funds, out of stock)
//! checks before it writes, so it stages nothing it would not commit.
//!
//! Keys:
//! - wallet: `balance/<account>` (integer), `debit/<order>` (amount)
//! - orders: `order/<order>` ("account,sku,quantity,amount")
//! - inventory: `stock/<sku>` (integer), `reserved/<order>` ("sku,quantity")

use tonic::{Code, Request, Response, Status};
use twopc_participant::{KvError, KvStore, KvTxn, Participant, TxnScope};
use twopc_proto::{reason, status::error};

use crate::pb;

/// Which example service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Customer balances.
    Wallet,
    /// Orders.
    Orders,
    /// Stock and reservations.
    Inventory,
}

impl Role {
    /// The participant name the role registers under.
    pub fn name(self) -> &'static str {
        match self {
            Role::Wallet => "wallet",
            Role::Orders => "orders",
            Role::Inventory => "inventory",
        }
    }
}

fn kv_status(e: KvError) -> Status {
    match e {
        KvError::LockConflict { .. } => error(Code::Aborted, reason::LOCK_CONFLICT, e.to_string()),
        KvError::Closed(_) => error(Code::FailedPrecondition, reason::JOIN_REFUSED, e.to_string()),
        KvError::NotInteger { .. } | KvError::Overflow { .. } => Status::failed_precondition(e.to_string()),
        KvError::Storage(_) | KvError::Detached => Status::unavailable(e.to_string()),
    }
}

fn scope<T>(kv: &KvStore, req: &Request<T>) -> Result<KvTxn, Status> {
    let s = TxnScope::of(req).ok_or_else(|| Status::failed_precondition("this call must run inside a transaction (twopc-txn metadata)"))?;
    Ok(kv.txn(s.txn))
}

fn positive(what: &str, v: i64) -> Result<(), Status> {
    if v <= 0 {
        return Err(Status::invalid_argument(format!("{what} must be positive, got {v}")));
    }
    Ok(())
}

fn nonempty(what: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 128 || v.contains(['/', ',', ';', '"']) {
        return Err(Status::invalid_argument(format!("{what} must be 1 to 128 characters without / , ; \"")));
    }
    Ok(())
}

/// The wallet service.
pub struct WalletService {
    /// Its store.
    pub kv: KvStore,
}

#[tonic::async_trait]
impl pb::wallet_server::Wallet for WalletService {
    async fn debit(&self, request: Request<pb::DebitRequest>) -> Result<Response<pb::DebitResponse>, Status> {
        let t = scope(&self.kv, &request)?;
        let r = request.get_ref();
        nonempty("account", &r.account)?;
        nonempty("order_id", &r.order_id)?;
        positive("amount", r.amount)?;
        let key = format!("balance/{}", r.account);
        let balance = t.get_int(key.as_bytes()).await.map_err(kv_status)?;
        if balance < r.amount {
            return Err(Status::failed_precondition(format!("insufficient funds: {} has {balance}, needs {}", r.account, r.amount)));
        }
        let left = t.incr(key.as_bytes(), -r.amount).await.map_err(kv_status)?;
        t.put(format!("debit/{}", r.order_id).as_bytes(), r.amount.to_string().as_bytes()).await.map_err(kv_status)?;
        Ok(Response::new(pb::DebitResponse { balance: left }))
    }
}

/// The orders service.
pub struct OrdersService {
    /// Its store.
    pub kv: KvStore,
}

#[tonic::async_trait]
impl pb::orders_server::Orders for OrdersService {
    async fn place(&self, request: Request<pb::PlaceRequest>) -> Result<Response<pb::PlaceResponse>, Status> {
        let t = scope(&self.kv, &request)?;
        let r = request.get_ref();
        nonempty("order_id", &r.order_id)?;
        nonempty("account", &r.account)?;
        nonempty("sku", &r.sku)?;
        positive("quantity", r.quantity)?;
        positive("amount", r.amount)?;
        let key = format!("order/{}", r.order_id);
        if t.get(key.as_bytes()).await.map_err(kv_status)?.is_some() {
            return Err(Status::already_exists(format!("order {} exists", r.order_id)));
        }
        let value = format!("{},{},{},{}", r.account, r.sku, r.quantity, r.amount);
        t.put(key.as_bytes(), value.as_bytes()).await.map_err(kv_status)?;
        Ok(Response::new(pb::PlaceResponse {}))
    }
}

/// The inventory service.
pub struct InventoryService {
    /// Its store.
    pub kv: KvStore,
}

#[tonic::async_trait]
impl pb::inventory_server::Inventory for InventoryService {
    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        let t = scope(&self.kv, &request)?;
        let r = request.get_ref();
        nonempty("order_id", &r.order_id)?;
        nonempty("sku", &r.sku)?;
        positive("quantity", r.quantity)?;
        let key = format!("stock/{}", r.sku);
        let stock = t.get_int(key.as_bytes()).await.map_err(kv_status)?;
        if stock < r.quantity {
            return Err(Status::failed_precondition(format!("out of stock: {} has {stock}, needs {}", r.sku, r.quantity)));
        }
        let left = t.incr(key.as_bytes(), -r.quantity).await.map_err(kv_status)?;
        t.put(format!("reserved/{}", r.order_id).as_bytes(), format!("{},{}", r.sku, r.quantity).as_bytes()).await.map_err(kv_status)?;
        Ok(Response::new(pb::ReserveResponse { remaining: left }))
    }
}

/// The read-only ledger every example service also serves.
pub struct LedgerService {
    /// The store it reads.
    pub kv: KvStore,
    /// The participant, for its in-doubt transactions.
    pub participant: Participant,
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerService {
    async fn snapshot(&self, _request: Request<pb::SnapshotRequest>) -> Result<Response<pb::SnapshotResponse>, Status> {
        // Locks first: a branch releases its locks only after its outcome is
        // written, so when none is held before the scan, no commit can land
        // after it and the rows are final. (Counted after the scan, a commit
        // applied in between would show old rows with no lock held.)
        let locked_keys = self.kv.locked_keys() as u64;
        let in_doubt = self.participant.in_doubt().map_err(|e| Status::unavailable(e.to_string()))?.len() as u64;
        let rows = self.kv.scan(b"").map_err(kv_status)?;
        let entries = rows
            .into_iter()
            .map(|(k, v)| pb::Entry { key: String::from_utf8_lossy(&k).into_owned(), value: String::from_utf8_lossy(&v).into_owned() })
            .collect();
        Ok(Response::new(pb::SnapshotResponse { entries, locked_keys, in_doubt }))
    }
}
