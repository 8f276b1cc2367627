//! The demo: starts the coordinator and three example services (wallet,
//! orders, inventory) as separate processes, each with its own RocksDB, then
//! places a few hundred concurrent orders. Each order debits a customer,
//! records the order and reserves stock — atomically across the three
//! services. Half go through the code path (begin → call the services with
//! the transaction in metadata → commit), half through one Execute call.
//! Some are refused on purpose (customers run out of money, stock runs
//! out), some conflict on the same keys (a few hot customers).
//!
//! At the end it waits for phase two to settle and checks all-or-nothing:
//! money and stock are conserved, no balance or stock is negative, every
//! order the client was told committed exists in all three services with
//! matching amounts, every order told aborted exists in none, and no key is
//! left locked. The exit status is non-zero if any check fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tracing::Instrument;
use twopc_examples::pb;
use twopc_examples::procs::{Proc, binary};
use twopc_participant::{Outcome, TxnClient};

/// Runs the twopc demo end to end.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 400)]
    orders: usize,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seed of the order generator (printed; rerun with it to replay the
    /// same orders).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the four processes keep their data; a temporary directory,
    /// removed at the end, by default.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

const CUSTOMERS: usize = 40;
const START_BALANCE: i64 = 1000;
const SKUS: [(&str, i64); 20] = [
    ("lamp", 25),
    ("chair", 40),
    ("desk", 60),
    ("mug", 10),
    ("rug", 35),
    ("shelf", 45),
    ("sofa", 90),
    ("table", 70),
    ("clock", 20),
    ("vase", 15),
    ("mirror", 30),
    ("stool", 18),
    ("bench", 55),
    ("pillow", 12),
    ("blanket", 28),
    ("frame", 9),
    ("candle", 6),
    ("basket", 14),
    ("plant", 22),
    ("curtain", 33),
];
const START_STOCK: i64 = 30;

#[derive(Debug, Clone)]
struct Order {
    id: String,
    account: String,
    sku: &'static str,
    quantity: i64,
    amount: i64,
    via_execute: bool,
}

#[derive(Debug, Clone)]
enum Result_ {
    Committed,
    Aborted(String),
    Unknown(String),
}

#[tokio::main]
async fn main() {
    match run(Args::parse()).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("demo: {e:#}");
            std::process::exit(2);
        }
    }
}

struct Cluster {
    coordinator: Proc,
    services: Vec<Proc>,
}

async fn start(dir: &std::path::Path) -> anyhow::Result<Cluster> {
    let within = Duration::from_secs(60);
    let coordinator = Proc::coordinator(&dir.join("coordinator"), &dir.join("coordinator.log"), within).await?;
    let shop = binary("shop-service")?;
    let mut services = Vec::new();
    for role in ["wallet", "orders", "inventory"] {
        let args = vec![
            "--role".into(),
            role.into(),
            "--data-dir".into(),
            dir.join(role).display().to_string(),
            "--coordinator".into(),
            coordinator.url(),
        ];
        services.push(Proc::start(role, &shop, &args, &dir.join(format!("{role}.log")), within).await?);
    }
    Ok(Cluster { coordinator, services })
}

fn make_orders(n: usize, seed: u64) -> Vec<Order> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            // A quarter of the orders come from three hot customers, so
            // concurrent orders contend for the same balance keys.
            let c = if rng.random_bool(0.25) { rng.random_range(0..3) } else { rng.random_range(0..CUSTOMERS) };
            let (sku, price) = SKUS[rng.random_range(0..SKUS.len())];
            let quantity = rng.random_range(1..=3);
            Order {
                id: format!("o{:05}", i + 1),
                account: format!("c{c:02}"),
                sku,
                quantity,
                amount: quantity * price,
                via_execute: i % 2 == 1,
            }
        })
        .collect()
}

fn classify(detail: &str) -> String {
    let d = detail.to_lowercase();
    if d.contains("locked by") {
        "lock conflict on a hot key".into()
    } else if d.contains("insufficient funds") || d.contains("check balance/") {
        "insufficient funds (wallet refused)".into()
    } else if d.contains("out of stock") || d.contains("check stock/") {
        "out of stock (inventory refused)".into()
    } else if d.contains("deadline") {
        "deadline passed".into()
    } else {
        detail.chars().take(80).collect()
    }
}

async fn place_via_code(client: &TxnClient, ch: &[Channel; 3], o: &Order) -> Result_ {
    let txn = match client.begin(Duration::from_secs(10)).await {
        Ok(t) => t,
        Err(e) => return Result_::Unknown(e.to_string()),
    };
    let mut wallet = pb::wallet_client::WalletClient::with_interceptor(ch[0].clone(), txn.interceptor());
    let mut orders = pb::orders_client::OrdersClient::with_interceptor(ch[1].clone(), txn.interceptor());
    let mut inventory = pb::inventory_client::InventoryClient::with_interceptor(ch[2].clone(), txn.interceptor());
    let (w, p, r) = tokio::join!(
        wallet.debit(pb::DebitRequest { account: o.account.clone(), amount: o.amount, order_id: o.id.clone() }),
        orders.place(pb::PlaceRequest {
            order_id: o.id.clone(),
            account: o.account.clone(),
            sku: o.sku.into(),
            quantity: o.quantity,
            amount: o.amount
        }),
        inventory.reserve(pb::ReserveRequest { order_id: o.id.clone(), sku: o.sku.into(), quantity: o.quantity }),
    );
    let refused = [w.err(), p.err(), r.err()].into_iter().flatten().next();
    if let Some(s) = refused {
        // A service refused: abort, so nothing anyone staged is applied.
        let reason = s.message().to_owned();
        return match txn.abort(&reason).await {
            Ok(()) => Result_::Aborted(classify(&reason)),
            Err(e) => Result_::Unknown(format!("abort failed: {e}")),
        };
    }
    match txn.commit().await {
        Ok(Outcome::Committed) => Result_::Committed,
        Ok(Outcome::Aborted(r)) => Result_::Aborted(classify(&r.to_string())),
        Err(e) => Result_::Unknown(e.to_string()),
    }
}

async fn place_via_execute(client: &TxnClient, o: &Order) -> Result_ {
    let branches = [
        ("wallet", format!("incr balance/{a} -{m}; check balance/{a} >= 0; put debit/{id} {m}", a = o.account, m = o.amount, id = o.id)),
        (
            "orders",
            format!(
                "check order/{id} absent; put order/{id} {a},{s},{q},{m}",
                id = o.id,
                a = o.account,
                s = o.sku,
                q = o.quantity,
                m = o.amount
            ),
        ),
        (
            "inventory",
            format!("incr stock/{s} -{q}; check stock/{s} >= 0; put reserved/{id} {s},{q}", s = o.sku, q = o.quantity, id = o.id),
        ),
    ];
    match client.execute(branches.iter().map(|(n, p)| (*n, p.as_bytes().to_vec())), Duration::from_secs(10)).await {
        Ok(f) => match f.outcome {
            Outcome::Committed => Result_::Committed,
            Outcome::Aborted(r) => Result_::Aborted(classify(&r.detail)),
        },
        Err(e) => Result_::Unknown(e.to_string()),
    }
}

async fn snapshot(ch: &Channel) -> anyhow::Result<(BTreeMap<String, String>, u64)> {
    let r = pb::ledger_client::LedgerClient::new(ch.clone()).snapshot(pb::SnapshotRequest {}).await?.into_inner();
    Ok((r.entries.into_iter().map(|e| (e.key, e.value)).collect(), r.locked_keys))
}

fn int(m: &BTreeMap<String, String>, k: &str) -> i64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    // Warnings on stderr; with OTEL_EXPORTER_OTLP_ENDPOINT set (the
    // services inherit it), each order is one trace from here through the
    // coordinator to every service.
    let _telemetry = twopc_telemetry::init(&twopc_telemetry::Config { log_filter: "warn".into(), ..twopc_telemetry::Config::new("demo") })?;
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let tmp;
    let dir = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!("twopc demo: coordinator + wallet + orders + inventory, each its own process with its own RocksDB");
    println!("data and logs in {}; order seed {seed} (replay with --seed {seed})", dir.display());
    let cluster = start(&dir).await?;
    println!(
        "coordinator {}  wallet {}  orders {}  inventory {}",
        cluster.coordinator.addr, cluster.services[0].addr, cluster.services[1].addr, cluster.services[2].addr
    );
    let client = TxnClient::connect_lazy(&cluster.coordinator.url()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let channels: [Channel; 3] = [0, 1, 2].map(|i| {
        tonic::transport::Endpoint::from_shared(cluster.services[i].url())
            .map(|e| e.connect_lazy())
            .expect("a listening address is a valid endpoint")
    });

    // Seed balances and stock in one atomic transaction.
    let balances: Vec<String> = (0..CUSTOMERS).map(|c| format!("put balance/c{c:02} {START_BALANCE}")).collect();
    let stock: Vec<String> = SKUS.iter().map(|(s, _)| format!("put stock/{s} {START_STOCK}")).collect();
    let seeded = client
        .execute(
            [("wallet", balances.join("; ")), ("inventory", stock.join("; "))].map(|(n, p)| (n, p.into_bytes())),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| anyhow::anyhow!("seeding failed: {e}"))?;
    if seeded.outcome != Outcome::Committed {
        bail!("seeding aborted: {:?}", seeded.outcome);
    }
    println!(
        "seeded {CUSTOMERS} customers with {START_BALANCE} credits and {} products with {START_STOCK} units ({})",
        SKUS.len(),
        seeded.txn
    );

    let orders = make_orders(args.orders, seed);
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(orders.len() as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} orders  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let results: Arc<Mutex<Vec<(Order, Result_, Duration)>>> = Arc::default();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let counts = Arc::new(Mutex::new((0usize, 0usize, 0usize)));
    for o in orders {
        let permit = sem.clone().acquire_owned().await?;
        let (client, channels, results, bar, counts) = (client.clone(), channels.clone(), results.clone(), bar.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let span = tracing::info_span!("order", order_id = %o.id, via_execute = o.via_execute);
            let r = if o.via_execute {
                place_via_execute(&client, &o).instrument(span).await
            } else {
                place_via_code(&client, &channels, &o).instrument(span).await
            };
            let took = t0.elapsed();
            {
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Result_::Committed => c.0 += 1,
                    Result_::Aborted(_) => c.1 += 1,
                    Result_::Unknown(_) => c.2 += 1,
                }
                bar.set_message(format!("committed {}  aborted {}  unknown {}", c.0, c.1, c.2));
            }
            bar.inc(1);
            results.lock().unwrap_or_else(|p| p.into_inner()).push((o, r, took));
            drop(permit);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    bar.finish();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));

    // Summary.
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut committed = 0;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut unknown = Vec::new();
    let (mut by_code, mut by_exec) = ((0, 0), (0, 0));
    for (o, r, took) in &results {
        hist.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
        let slot = if o.via_execute { &mut by_exec } else { &mut by_code };
        match r {
            Result_::Committed => {
                committed += 1;
                slot.0 += 1;
            }
            Result_::Aborted(why) => {
                *reasons.entry(why.clone()).or_default() += 1;
                slot.1 += 1;
            }
            Result_::Unknown(e) => unknown.push(format!("{}: {e}", o.id)),
        }
    }
    let aborted: usize = reasons.values().sum();
    println!("\n== summary ==");
    println!(
        "orders: {} in {:.2}s ({:.0}/s) at concurrency {}",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64(),
        args.concurrency
    );
    println!("  from code (begin, 3 calls, commit): {} committed, {} aborted", by_code.0, by_code.1);
    println!("  via one Execute call:               {} committed, {} aborted", by_exec.0, by_exec.1);
    println!("committed: {committed}");
    println!("aborted:   {aborted}");
    for (why, n) in &reasons {
        println!("  {n:>5}  {why}");
    }
    println!("unknown:   {}", unknown.len());
    for u in &unknown {
        println!("  {u}");
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!("latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}", q(0.50), q(0.90), q(0.99), hist.max() as f64 / 1000.0);

    // Invariants, once phase two has settled (poll with a deadline).
    println!("\n== all-or-nothing check ==");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (wallet, orders_kv, inventory) = loop {
        let w = snapshot(&channels[0]).await.context("wallet snapshot")?;
        let o = snapshot(&channels[1]).await.context("orders snapshot")?;
        let i = snapshot(&channels[2]).await.context("inventory snapshot")?;
        if w.1 + o.1 + i.1 == 0 || Instant::now() > deadline {
            if w.1 + o.1 + i.1 != 0 {
                println!("  keys still locked after 30s: wallet {} orders {} inventory {}", w.1, o.1, i.1);
            }
            break (w, o, i);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut ok = true;
    let mut check = |name: &str, pass: bool, detail: String| {
        println!("  [{}] {name}: {detail}", if pass { "ok" } else { "FAIL" });
        ok &= pass;
    };
    let (w, o, i) = (&wallet.0, &orders_kv.0, &inventory.0);
    let balances: i64 = w.iter().filter(|(k, _)| k.starts_with("balance/")).map(|(k, _)| int(w, k)).sum();
    // Revenue: the amounts of the orders the order book holds.
    let revenue: i64 = o
        .iter()
        .filter(|(k, _)| k.starts_with("order/"))
        .map(|(_, v)| v.rsplit(',').next().and_then(|a| a.parse::<i64>().ok()).unwrap_or(0))
        .sum();
    let money = CUSTOMERS as i64 * START_BALANCE;
    check(
        "money conserved",
        balances + revenue == money,
        format!("{balances} in balances + {revenue} in orders = {} (started with {money})", balances + revenue),
    );
    let negative: Vec<&String> = w
        .iter()
        .chain(i.iter())
        .filter(|(k, v)| (k.starts_with("balance/") || k.starts_with("stock/")) && v.starts_with('-'))
        .map(|(k, _)| k)
        .collect();
    check("no negative balance or stock", negative.is_empty(), format!("{} negative", negative.len()));
    let mut stock_ok = true;
    let mut stock_detail = Vec::new();
    for (sku, _) in SKUS {
        let left = int(i, &format!("stock/{sku}"));
        let reserved: i64 = i
            .iter()
            .filter(|(k, v)| k.starts_with("reserved/") && v.split(',').next() == Some(sku))
            .map(|(_, v)| v.split(',').nth(1).and_then(|q| q.parse::<i64>().ok()).unwrap_or(0))
            .sum();
        stock_ok &= left + reserved == START_STOCK;
        stock_detail.push(format!("{sku} {left}+{reserved}"));
    }
    check("stock conserved (left + reserved = start)", stock_ok, stock_detail.join(", "));
    let told: HashMap<&str, &Result_> = results.iter().map(|(o, r, _)| (o.id.as_str(), r)).collect();
    let mut mismatched = Vec::new();
    let mut matched = 0;
    for (ord, r, _) in &results {
        let in_orders = o.get(&format!("order/{}", ord.id));
        let in_wallet = w.get(&format!("debit/{}", ord.id));
        let in_inventory = i.get(&format!("reserved/{}", ord.id));
        let present = [in_orders.is_some(), in_wallet.is_some(), in_inventory.is_some()];
        let all = present.iter().all(|p| *p);
        let none = present.iter().all(|p| !*p);
        let consistent = match r {
            Result_::Committed => {
                all && in_wallet == Some(&ord.amount.to_string())
                    && in_inventory == Some(&format!("{},{}", ord.sku, ord.quantity))
                    && in_orders == Some(&format!("{},{},{},{}", ord.account, ord.sku, ord.quantity, ord.amount))
            }
            Result_::Aborted(_) => none,
            Result_::Unknown(_) => all || none,
        };
        if consistent && all {
            matched += 1;
        }
        if !consistent {
            mismatched.push(format!(
                "{} told {:?} but present in orders/wallet/inventory = {present:?}",
                ord.id,
                told.get(ord.id.as_str())
            ));
        }
    }
    check(
        "every order is in all three services or in none, as the client was told",
        mismatched.is_empty(),
        format!(
            "{matched} orders applied everywhere, {} applied nowhere, {} inconsistent",
            results.len() - matched - mismatched.len(),
            mismatched.len()
        ),
    );
    for m in mismatched.iter().take(10) {
        println!("      {m}");
    }
    let locked = wallet.1 + orders_kv.1 + inventory.1;
    check("no key left locked", locked == 0, format!("{locked} locked"));
    println!("\n{}", if ok { "ALL-OR-NOTHING HOLDS" } else { "VIOLATION FOUND" });

    let Cluster { mut coordinator, mut services } = cluster;
    for s in services.iter_mut() {
        let _ = s.terminate(Duration::from_secs(10)).await;
    }
    let _ = coordinator.terminate(Duration::from_secs(10)).await;
    Ok(ok)
}
