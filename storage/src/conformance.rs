//! One behavioural suite that every [`LogStore`] implementation must pass.
//! Run it from each implementation's tests with a fresh, empty store that has
//! the column families [`CF_A`] and [`CF_B`].

use crate::{Batch, Durability, LogStore, StorageError, wait};

/// First column family the suite uses.
pub const CF_A: &str = "conformance_a";
/// Second column family the suite uses.
pub const CF_B: &str = "conformance_b";

/// Runs every check; panics with a message naming the broken rule.
pub async fn run(store: &dyn LogStore) {
    // Writes become visible once their ticket resolves, in order.
    let mut b = Batch::new();
    b.put(CF_A, b"k1".to_vec(), b"v1".to_vec()).put(CF_B, b"k1".to_vec(), b"other".to_vec());
    wait(store.submit(b, Durability::Synced)).await.expect("synced write succeeds");
    assert_eq!(store.get(CF_A, b"k1").expect("get"), Some(b"v1".to_vec()), "a resolved write is readable");
    assert_eq!(store.get(CF_B, b"k1").expect("get"), Some(b"other".to_vec()), "column families are separate");

    // Later operations win, also within one batch.
    let mut b = Batch::new();
    b.put(CF_A, b"k1".to_vec(), b"v2".to_vec()).delete(CF_A, b"k1".to_vec()).put(CF_A, b"k1".to_vec(), b"v3".to_vec());
    wait(store.submit(b, Durability::Lazy)).await.expect("lazy write succeeds");
    assert_eq!(store.get(CF_A, b"k1").expect("get"), Some(b"v3".to_vec()), "operations apply in order");

    // Many concurrent submissions all land, in submission order per key.
    let tickets: Vec<_> = (0..200u32)
        .map(|i| {
            let mut b = Batch::new();
            b.put(CF_A, format!("p/{:03}", i % 50).into_bytes(), i.to_be_bytes().to_vec());
            store.submit(b, if i % 3 == 0 { Durability::Synced } else { Durability::Lazy })
        })
        .collect();
    for t in tickets {
        wait(t).await.expect("grouped write succeeds");
    }
    let rows = store.scan_prefix(CF_A, b"p/").expect("scan");
    assert_eq!(rows.len(), 50, "scan returns exactly the prefixed keys");
    assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "scan is in key order");
    for (i, (k, v)) in rows.iter().enumerate() {
        assert_eq!(k, &format!("p/{i:03}").into_bytes());
        let last = (150 + i as u32).to_be_bytes().to_vec();
        assert_eq!(v, &last, "the last submitted write of a key wins");
    }
    assert!(store.scan_prefix(CF_A, b"q").expect("scan").is_empty(), "an unused prefix scans empty");

    // A batch with an unknown column family fails alone and writes nothing.
    let mut bad = Batch::new();
    bad.put(CF_A, b"half".to_vec(), b"x".to_vec()).put("no_such_cf", b"k".to_vec(), b"v".to_vec());
    let err = wait(store.submit(bad, Durability::Synced)).await;
    assert!(matches!(err, Err(StorageError::UnknownColumnFamily(_))), "unknown column family is refused: {err:?}");
    assert_eq!(store.get(CF_A, b"half").expect("get"), None, "a refused batch writes nothing");

    // submit_then: the completion hears the same outcome a ticket would,
    // once the write is readable; an unknown column family fails alone.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut b = Batch::new();
    b.put(CF_B, b"then".to_vec(), b"v".to_vec());
    store.submit_then(b, Durability::Synced, Box::new(move |r| drop(tx.send(r))));
    rx.await.expect("the completion runs").expect("the write succeeds");
    assert_eq!(store.get(CF_B, b"then").expect("get"), Some(b"v".to_vec()), "written when the completion hears Ok");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut bad = Batch::new();
    bad.put("no_such_cf", b"k".to_vec(), b"v".to_vec());
    store.submit_then(bad, Durability::Lazy, Box::new(move |r| drop(tx.send(r))));
    let err = rx.await.expect("the completion runs");
    assert!(matches!(err, Err(StorageError::UnknownColumnFamily(_))), "{err:?}");

    let stats = store.stats();
    assert!(stats.requests >= 202 && stats.writes >= 1 && stats.writes <= stats.requests, "counters add up: {stats:?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStore, RocksStore};

    #[tokio::test]
    async fn mem_store_conforms() {
        run(&MemStore::new(&[CF_A, CF_B])).await;
    }

    #[tokio::test]
    async fn rocks_store_conforms_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path(), &[CF_A, CF_B]).expect("open");
            run(&store).await;
            let stats = store.stats();
            assert!(stats.synced_writes >= 1, "synced requests produce synced writes: {stats:?}");
        }
        let store = RocksStore::open(dir.path(), &[CF_A, CF_B]).expect("reopen after close");
        assert_eq!(store.get(CF_A, b"k1").expect("get"), Some(b"v3".to_vec()), "data survives a reopen");
    }

    #[tokio::test]
    async fn group_commit_merges_concurrent_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RocksStore::open(dir.path(), &[CF_A, CF_B]).expect("open");
        let tickets: Vec<_> = (0..500u32)
            .map(|i| {
                let mut b = Batch::new();
                b.put(CF_A, i.to_be_bytes().to_vec(), b"v".to_vec());
                store.submit(b, Durability::Synced)
            })
            .collect();
        for t in tickets {
            wait(t).await.expect("write");
        }
        let s = store.stats();
        assert_eq!(s.requests, 500);
        assert!(s.synced_writes < 500, "500 ready synced requests must share fsyncs: {s:?}");
    }
}
