//! OpenTelemetry: spans exported with OTLP/HTTP to a receiver run by the
//! test, their parents and messaging attributes, and the W3C trace context
//! carried from an outbox row through Kafka headers into the inbox row and
//! the handler's environment.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent: String,
    status: i32,
    attrs: HashMap<String, String>,
    service: String,
}

impl Got {
    fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map(String::as_str).unwrap_or("")
    }
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on 127.0.0.1.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Got>>>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (spans.clone(), paths.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, p) = (s.clone(), p.clone());
                std::thread::spawn(move || serve(conn, &s, &p));
            }
        });
        Receiver { url, spans, paths }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// Serves requests on one (keep-alive) connection.
fn serve(conn: std::net::TcpStream, spans: &Mutex<Vec<Got>>, paths: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        paths.lock().unwrap().push(path);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.lock().unwrap().push(Got {
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        status: span.status.map(|s| s.code).unwrap_or(0),
                        attrs: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
        let _ = conn.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        );
    }
}

fn text(v: Option<&Any>) -> String {
    match v {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn omnibox(dir: &Path, url: &str, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_omnibox"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("OMNIBOX_DATABASE_URL", url)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "omnibox {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const KIND_CONSUMER: i32 = 5;
const KIND_PRODUCER: i32 = 4;
const STATUS_OK: i32 = 1;

/// Outbox row → publish spans → Kafka headers → inbox row → handler span →
/// `TRACEPARENT` of an `--exec` handler, all in one trace per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_an_event_from_the_outbox_to_the_handler() {
    let receiver = Receiver::start();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let db = common::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (t2, p2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let line = |n: u32, headers: serde_json::Value| {
        serde_json::json!({
            "aggregate_type": "order",
            "aggregate_id": uuid::Uuid::new_v4(),
            "event_type": "order.created",
            "topic": "orders",
            "partition_key": format!("order-{n}"),
            "payload": {"n": n},
            "headers": headers,
        })
        .to_string()
    };
    let input = [
        line(1, serde_json::json!({"traceparent": format!("00-{t1}-{p1}-01"), "tracestate": "vendor=one"})),
        line(2, serde_json::json!({"traceparent": format!("00-{t2}-{p2}-01")})),
        line(3, serde_json::json!({"traceparent": "not-a-trace-context"})),
    ]
    .join("\n");
    omnibox(d, &db.url, &["enqueue", "--jsonl", "-"], &[], &input);
    let otlp = receiver.url.clone();
    // The flag on publish, the environment variable on the consumer.
    omnibox(
        d,
        &db.url,
        &[
            "publish",
            "--once",
            "--broker",
            &format!("kafka://{brokers}"),
            "--otlp-endpoint",
            &otlp,
        ],
        &[],
        "",
    );
    let tp = d.join("traceparent.txt");
    omnibox(
        d,
        &db.url,
        &[
            "inbox",
            "consume",
            "--from",
            &format!("kafka://{brokers}"),
            "--topic",
            "orders",
            "--group",
            "billing",
            "--once",
            "--exec",
            &format!(
                "echo \"$OMNIBOX_MESSAGE_ID $TRACEPARENT $TRACESTATE\" >> {}",
                tp.display()
            ),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
            ("OTEL_SERVICE_NAME", "billing-consumer"),
        ],
        "",
    );
    let spans = receiver.spans();
    assert!(
        receiver
            .paths
            .lock()
            .unwrap()
            .iter()
            .all(|p| p == "/v1/traces"),
        "{:?}",
        receiver.paths.lock().unwrap()
    );

    // The relay: one batch span, one span per event.
    let batch: Vec<&Got> = spans.iter().filter(|s| s.name == "publish").collect();
    assert_eq!(batch.len(), 1, "{spans:#?}");
    let batch = batch[0];
    assert_eq!(batch.kind, KIND_PRODUCER);
    assert_eq!(batch.service, "omnibox");
    assert_eq!(batch.attr("messaging.system"), "kafka");
    assert_eq!(batch.attr("messaging.batch.message_count"), "3");
    assert_eq!(batch.attr("messaging.destination.name"), "orders");
    assert_eq!(batch.parent, "");
    let publish: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "publish orders")
        .collect();
    assert_eq!(publish.len(), 3, "{spans:#?}");
    for s in &publish {
        assert_eq!(s.kind, KIND_PRODUCER);
        assert_eq!(s.status, STATUS_OK);
        assert_eq!(s.attr("messaging.system"), "kafka");
        assert_eq!(s.attr("messaging.destination.name"), "orders");
        assert_eq!(s.attr("messaging.operation.type"), "send");
        assert!(uuid::Uuid::parse_str(s.attr("messaging.message.id")).is_ok());
    }
    let by_key = |key: &str| -> &Got {
        publish
            .iter()
            .find(|s| s.attr("messaging.kafka.message.key") == key)
            .unwrap_or_else(|| panic!("no span for {key}: {publish:#?}"))
    };
    let (s1, s2, s3) = (by_key("order-1"), by_key("order-2"), by_key("order-3"));
    assert_eq!(
        (s1.trace_id.as_str(), s1.parent.as_str()),
        (t1, p1),
        "the row's context is the parent"
    );
    assert_eq!((s2.trace_id.as_str(), s2.parent.as_str()), (t2, p2));
    // An invalid traceparent is not continued: the batch span is the parent.
    assert_eq!(
        (s3.trace_id.as_str(), s3.parent.as_str()),
        (batch.trace_id.as_str(), batch.span_id.as_str())
    );

    // On the topic: each message carries its publish span's context.
    let got = common::kafka::consume(&brokers, "orders", 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3);
    for m in &got {
        let s = by_key(&m.key);
        assert_eq!(
            m.headers["traceparent"],
            format!("00-{}-{}-01", s.trace_id, s.span_id)
        );
        assert_eq!(m.headers["event_id"], s.attr("messaging.message.id"));
    }
    let m1 = got.iter().find(|m| m.key == "order-1").unwrap();
    assert_eq!(m1.headers["tracestate"], "vendor=one");

    // The consumer: a receive span for the batch, a process span per
    // message, child of the message's context.
    let receive: Vec<&Got> = spans.iter().filter(|s| s.name == "receive").collect();
    assert_eq!(receive.len(), 1, "{spans:#?}");
    assert_eq!(receive[0].kind, KIND_CONSUMER);
    assert_eq!(receive[0].service, "billing-consumer");
    assert_eq!(receive[0].attr("messaging.system"), "kafka");
    assert_eq!(receive[0].attr("messaging.batch.message_count"), "3");
    assert_eq!(receive[0].attr("messaging.consumer.group.name"), "billing");
    let process: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "process orders")
        .collect();
    assert_eq!(process.len(), 3, "{spans:#?}");
    let handled = std::fs::read_to_string(&tp).unwrap();
    assert_eq!(handled.lines().count(), 3, "{handled}");
    for p in &process {
        assert_eq!(p.kind, KIND_CONSUMER);
        assert_eq!(p.status, STATUS_OK);
        assert_eq!(p.attr("messaging.system"), "kafka");
        assert_eq!(p.attr("messaging.consumer.group.name"), "billing");
        assert_eq!(p.attr("messaging.destination.name"), "orders");
        assert_eq!(p.attr("omnibox.event_type"), "order.created");
        let parent = publish
            .iter()
            .find(|s| s.span_id == p.parent)
            .unwrap_or_else(|| panic!("process span's parent is not a publish span: {p:#?}"));
        assert_eq!(p.trace_id, parent.trace_id);
        // The handler saw the process span as its parent context.
        let message_id = p.attr("messaging.message.id");
        let line = handled
            .lines()
            .find(|l| l.starts_with(&format!("{message_id} ")))
            .unwrap_or_else(|| panic!("no handler run for {message_id}: {handled}"));
        assert!(
            line.contains(&format!("00-{}-{}-01", p.trace_id, p.span_id)),
            "{line} vs {p:#?}"
        );
    }
    assert!(
        handled.lines().any(|l| l.ends_with(" vendor=one")),
        "{handled}"
    );

    // The inbox row keeps the message's trace context.
    let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
    let rows: Vec<(Option<String>, String)> =
        sqlx::query_as("SELECT trace_id, headers FROM inbox_events ORDER BY message_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3);
    let traces: Vec<&str> = rows.iter().filter_map(|r| r.0.as_deref()).collect();
    assert!(traces.contains(&t1) && traces.contains(&t2), "{rows:?}");
    for (_, headers) in &rows {
        let h: serde_json::Value = serde_json::from_str(headers).unwrap();
        assert!(
            h["traceparent"]
                .as_str()
                .is_some_and(|t| t.starts_with("00-")),
            "{h}"
        );
    }
}

/// Without an exporter nothing is made, and the context passes through:
/// the `--exec` handler gets the message's own `traceparent`, and an invalid
/// one is not handed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_context_passes_through() {
    let db = common::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    omnibox(d, &db.url, &["migrate", "-q"], &[], "");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let input = [
        serde_json::json!({"topic": "orders", "key": "a", "headers": {"event_id": "m1", "traceparent": tp}, "value": {"n": 1}}),
        serde_json::json!({"topic": "orders", "key": "b", "headers": {"event_id": "m2", "traceparent": "00-zz"}, "value": {"n": 2}}),
    ]
    .map(|v| v.to_string())
    .join("\n");
    let out_file = d.join("seen.txt");
    omnibox(
        d,
        &db.url,
        &[
            "inbox",
            "consume",
            "--from",
            "-",
            "--group",
            "g",
            "--exec",
            &format!(
                "echo \"$OMNIBOX_MESSAGE_ID ${{TRACEPARENT:-none}}\" >> {}",
                out_file.display()
            ),
        ],
        &[],
        &input,
    );
    let seen = std::fs::read_to_string(&out_file).unwrap();
    assert!(seen.lines().any(|l| l == format!("m1 {tp}")), "{seen}");
    assert!(seen.lines().any(|l| l == "m2 none"), "{seen}");
}

/// A gRPC protocol or a non-HTTP endpoint is refused at start (exit 2).
#[test]
fn bad_exporter_settings_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("o.db").display());
    for (args, env, expect) in [
        (
            vec!["--otlp-endpoint", "collector:4317"],
            vec![],
            "not an http:// or https:// URL",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            "gRPC is not supported",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_omnibox"))
            .args(["status"])
            .args(&args)
            .current_dir(dir.path())
            .env_clear()
            .env("OMNIBOX_DATABASE_URL", &url)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// An unreachable collector is one warning for the run, not a pair of SDK
/// lines per batch, and the spans are dropped without failing the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_is_told_once() {
    let db = common::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut input = String::new();
    for n in 0..50 {
        input.push_str(
            &serde_json::json!({
                "aggregate_type": "order",
                "aggregate_id": uuid::Uuid::new_v4(),
                "event_type": "order.created",
                "topic": "orders",
                "partition_key": format!("order-{n}"),
                "payload": {"n": n},
            })
            .to_string(),
        );
        input.push('\n');
    }
    omnibox(d, &db.url, &["enqueue", "--jsonl", "-"], &[], &input);
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = omnibox(
        d,
        &db.url,
        &[
            "publish",
            "--once",
            "--batch",
            "5",
            "--broker",
            "null",
            "--otlp-endpoint",
            &url,
        ],
        &[],
        "",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() <= 1,
        "one warning at most for the whole run: {stderr}"
    );
    assert!(
        !stderr.contains("BatchSpanProcessor") && !stderr.contains("Export"),
        "{stderr}"
    );
}
