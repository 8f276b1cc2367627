//! One distributed transaction is one trace: the demo (initiator), the
//! coordinator daemon and the three shop services run as real processes and
//! export their spans over OTLP gRPC to a collector this test runs on
//! loopback. For each order placed through business calls, every span the
//! five processes exported for it must share the order's trace id, hang off
//! the initiator's `order` span (no other root), and cover each phase and
//! each participant call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use twopc_examples::procs::binary;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attrs: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service =
                rs.resource.as_ref().and_then(|r| r.attributes.iter().find(|a| a.key == "service.name")).map(text).unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace: span.trace_id,
                    id: span.span_id,
                    parent: span.parent_span_id,
                    attrs: span.attributes.iter().map(|a| (a.key.clone(), text(a))).collect(),
                });
            }
        }
        if let Ok(mut s) = self.spans.lock() {
            s.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    fn snapshot(&self) -> Vec<Got> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

const SERVICES: [&str; 5] = ["demo", "twopc-coordinator", "wallet", "orders", "inventory"];
const PARTICIPANTS: [&str; 3] = ["wallet", "orders", "inventory"];

/// What is wrong with the trace of the order `root` (an `order` span), or
/// `None` when it is complete: one root, five services, one committed
/// transaction with every phase and every participant's calls.
fn check_trace(spans: &[Got], root: &Got) -> Option<String> {
    let trace: Vec<&Got> = spans.iter().filter(|s| s.trace == root.trace).collect();
    let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.id.as_slice()).collect();
    let roots: Vec<&str> =
        trace.iter().filter(|s| s.parent.is_empty() || !ids.contains(s.parent.as_slice())).map(|s| s.name.as_str()).collect();
    if roots != ["order"] {
        return Some(format!("roots {roots:?} (spans so far: {})", trace.len()));
    }
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    if let Some(missing) = SERVICES.iter().find(|s| !services.contains(*s)) {
        return Some(format!("no span from {missing}; services {services:?}"));
    }
    let txn = trace.iter().find(|s| s.name == "txn" && s.service == "twopc-coordinator")?;
    let txn_id = txn.attrs.get("txn_id").cloned().unwrap_or_default();
    if txn.attrs.get("outcome").map(String::as_str) != Some("committed") {
        return Some(format!("{txn_id} not committed: {:?}", txn.attrs));
    }
    for phase in ["prepare", "decision_write", "phase_two"] {
        if !trace.iter().any(|s| s.name == phase && s.attrs.get("txn_id") == Some(&txn_id)) {
            return Some(format!("no {phase} span for {txn_id}"));
        }
    }
    for p in PARTICIPANTS {
        let has = |service: &str, name: &str| {
            trace.iter().any(|s| {
                s.service == service
                    && s.name == name
                    && s.attrs.get("txn_id") == Some(&txn_id)
                    && s.attrs.get("participant").map(String::as_str) == Some(p)
            })
        };
        for (service, name) in [
            ("twopc-coordinator", "prepare_call"),
            ("twopc-coordinator", "decision_call"),
            (p, "branch_prepare"),
            (p, "branch_commit"),
            (p, "enlist_call"),
            (p, "grpc_request"),
        ] {
            if !has(service, name) {
                return Some(format!("no {name} span at {service} for {p} in {txn_id}"));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_the_initiator_the_coordinator_and_three_services() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    // Orders alternate between business calls (odd) and Execute (even); a
    // fixed seed and concurrency 1 keep the first ones free of conflicts.
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary("demo").expect("demo is built"))
            .args(["--orders", "6", "--concurrency", "1", "--quiet", "--seed", "7"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes within 2 minutes")
    .expect("the demo runs");
    assert!(out.status.success(), "demo failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // Every process flushed its spans on exit; poll anyway, since export is
    // asynchronous.
    let (traced, last) = twopc_tests::poll("complete traces of the committed orders", Duration::from_secs(30), || {
        let spans = collector.snapshot();
        let orders: Vec<&Got> =
            spans.iter().filter(|s| s.name == "order" && s.attrs.get("via_execute").map(String::as_str) == Some("false")).collect();
        let problems: Vec<String> = orders
            .iter()
            .filter_map(|o| check_trace(&spans, o).map(|p| format!("{}: {p}", o.attrs.get("order_id").cloned().unwrap_or_default())))
            .collect();
        let traced = orders.len() - problems.len();
        let last = format!("{} spans, {} business-call orders, problems: {problems:?}", spans.len(), orders.len());
        // Only an order that aborted (a refused debit, say) may lack the
        // commit-side spans; at least one must have committed.
        let done = orders.len() == 3 && traced >= 1 && problems.iter().all(|p| p.contains("not committed"));
        std::future::ready(if done { Ok((traced, last)) } else { Err(last) })
    })
    .await;
    println!("{traced} of 3 orders traced end to end across {SERVICES:?}; {last}");
    server.abort();
}
