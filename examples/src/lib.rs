//! The demo's example services and the helpers the demo and the tests share.
//!
//! - [`shop`]: the wallet, orders and inventory services (each a business
//!   gRPC service over the participant crate's [`KvStore`]) and the read-only
//!   ledger used for invariant checks.
//! - [`procs`]: starting the real binaries as child processes and waiting,
//!   with a deadline, for them to report their address.
//!
//! [`KvStore`]: twopc_participant::KvStore

pub mod procs;
pub mod shop;

/// Generated code of `proto/shop.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("shop.v1");
}
