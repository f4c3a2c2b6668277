//! REST-to-gRPC transcoding end to end (issue 10): plain HTTP/JSON clients call the demo
//! `demo.orders.v1.Orders` service through the gateway, once as a tonic server behind an agent
//! (a mesh service) and once as an independently written grpcio server reached as a non-mesh
//! h2c URL. The same checks run against both: every mapping (path templates, `**`, custom
//! verbs, body field and `body: "*"`, query parameters, `response_body`,
//! `additional_bindings`, 64-bit integers, enums, well-known types, oneofs, bytes), the whole
//! status table with `{code, message, details}`, input errors as 400 before the service is
//! called, strict mode, 405 with `Allow`, and server streams (arrival times, an error before
//! the first message, a mid-stream error that never ends as a clean success). Also gRPC-Web.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use meshgate_agent::http::path::Spelling;
use meshgate_proto::demo::orders::v1::{
    self as pb,
    orders_server::{Orders, OrdersServer},
};
use prost::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use crate::{
    clients::PyServer,
    gw_harness::{Got, plain},
    mesh::{
        AgentSpec, GatewaySpec, Intention, Mesh, RouteSpec, ServiceSpec, TestMesh, venv_python,
    },
};

/// The message every failing call carries (non-ASCII on purpose).
pub(crate) const FAIL_MESSAGE: &str = "asked to fail: café ✓";

/// The order both servers answer GetOrder with.
fn canonical(id: &str, shop: &str) -> pb::Order {
    pb::Order {
        id: id.into(),
        shop: shop.into(),
        status: pb::Status::Paid as i32,
        total_cents: 9_007_199_254_740_993,
        sequence: u64::MAX,
        items: vec![pb::Item {
            sku: "A1".into(),
            quantity: 2,
            price_cents: 150,
        }],
        created_at: Some(prost_types::Timestamp {
            seconds: 1_767_323_045,
            nanos: 0,
        }),
        hold_for: Some(prost_types::Duration {
            seconds: 90,
            nanos: 0,
        }),
        coupon: Some("SAVE10".into()),
        signature: b"sig".to_vec(),
        labels: [("gift-wrap".to_owned(), "yes".to_owned())].into(),
        payment: Some(pb::order::Payment::Card(pb::Card {
            last4: "4242".into(),
            brand: "visa".into(),
        })),
        customer_email: "buyer@example.com".into(),
        ..Default::default()
    }
}

/// The tonic implementation, steered by metadata like the grpcio one: `x-fail-code` (and
/// `x-fail-details: 1` for a google.rpc.BadRequest detail) fails a call; for WatchOrders,
/// `x-fail-after: N` fails after N messages.
#[derive(Clone, Default)]
struct TonicOrders {
    calls: Arc<AtomicUsize>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn num(md: &MetadataMap, k: &str) -> Option<i32> {
    md.get(k)?.to_str().ok()?.parse().ok()
}

fn failure(md: &MetadataMap) -> Option<Status> {
    let code = num(md, "x-fail-code")?;
    if md.get("x-fail-details").is_some() {
        let bad = meshgate_proto::google::rpc::BadRequest {
            field_violations: vec![meshgate_proto::google::rpc::bad_request::FieldViolation {
                field: "id".into(),
                description: "must be numeric".into(),
            }],
        };
        let st = RpcStatus {
            code,
            message: FAIL_MESSAGE.into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
                value: bad.encode_to_vec(),
            }],
        };
        return Some(Status::with_details(
            Code::from_i32(code),
            FAIL_MESSAGE,
            st.encode_to_vec().into(),
        ));
    }
    Some(Status::new(Code::from_i32(code), FAIL_MESSAGE))
}

impl TonicOrders {
    fn start<T>(&self, r: &Request<T>) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match failure(r.metadata()) {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::OrderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Orders for TonicOrders {
    async fn get_order(
        &self,
        r: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        self.start(&r)?;
        let r = r.into_inner();
        Ok(Response::new(canonical(&r.id, &r.shop)))
    }
    async fn list_orders(
        &self,
        r: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        self.start(&r)?;
        Ok(Response::new(pb::ListOrdersResponse {
            applied: Some(r.into_inner()),
            ..Default::default()
        }))
    }
    async fn create_order(
        &self,
        r: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        self.start(&r)?;
        let r = r.into_inner();
        let mut o = r.order.unwrap_or_default();
        o.shop = r.shop;
        Ok(Response::new(o))
    }
    async fn update_order(
        &self,
        r: Request<pb::UpdateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        self.start(&r)?;
        let r = r.into_inner();
        let mut o = r.order.unwrap_or_default();
        o.updated_fields = r.update_mask;
        Ok(Response::new(o))
    }
    async fn set_note(
        &self,
        r: Request<pb::SetNoteRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        self.start(&r)?;
        let r = r.into_inner();
        Ok(Response::new(pb::Order {
            id: r.id,
            note: r.note,
            ..Default::default()
        }))
    }
    async fn delete_order(
        &self,
        r: Request<pb::DeleteOrderRequest>,
    ) -> Result<Response<()>, Status> {
        self.start(&r)?;
        Ok(Response::new(()))
    }
    async fn cancel_order(
        &self,
        r: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        self.start(&r)?;
        let r = r.into_inner();
        Ok(Response::new(pb::Order {
            id: r.id,
            status: pb::Status::Cancelled as i32,
            note: r.reason,
            ..Default::default()
        }))
    }
    async fn list_items(
        &self,
        r: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::ItemList>, Status> {
        self.start(&r)?;
        Ok(Response::new(pb::ItemList {
            items: vec![
                pb::Item {
                    sku: "A1".into(),
                    quantity: 2,
                    price_cents: 150,
                },
                pb::Item {
                    sku: "B2".into(),
                    quantity: 1,
                    price_cents: 9_007_199_254_740_993,
                },
            ],
        }))
    }
    async fn get_attachment(
        &self,
        r: Request<pb::GetAttachmentRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        self.start(&r)?;
        Ok(Response::new(pb::Attachment {
            name: r.into_inner().name,
            content: b"%PDF".to_vec(),
        }))
    }
    type WatchOrdersStream = Events;
    async fn watch_orders(
        &self,
        r: Request<pb::WatchOrdersRequest>,
    ) -> Result<Response<Events>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let md = r.metadata().clone();
        let after = num(&md, "x-fail-after").unwrap_or(0);
        let fail = failure(&md);
        let r = r.into_inner();
        if after == 0
            && let Some(f) = fail.clone()
        {
            return Err(f);
        }
        let interval = r
            .interval
            .map(|d| Duration::new(d.seconds as u64, d.nanos as u32))
            .unwrap_or_default();
        let count = r.count;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 1..=count {
                if fail.is_some() && i > after {
                    break;
                }
                tokio::time::sleep(interval).await;
                let ev = pb::OrderEvent {
                    order_id: format!("o{i}"),
                    status: pb::Status::Paid as i32,
                    sequence: i64::from(i),
                    at: None,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if let Some(f) = fail {
                let _ = tx.send(Err(f)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    async fn reindex(&self, r: Request<()>) -> Result<Response<()>, Status> {
        self.start(&r)?;
        Ok(Response::new(()))
    }
}

/// A tonic Orders server on 127.0.0.1:0.
async fn tonic_orders() -> (u16, TonicOrders, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let svc = TonicOrders::default();
    let s = svc.clone();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(OrdersServer::new(s))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (port, svc, task)
}

fn proto_dir() -> String {
    format!("{}/../proto/proto", env!("CARGO_MANIFEST_DIR"))
}

/// The `transcode` block of the test routes.
fn transcode(strict: bool) -> Value {
    json!({"transcode": {"protos": ["demo/orders/v1/orders.proto"], "include": [proto_dir()], "strict": strict}})
}

/// Hosts under which a backend is reachable: lax, strict, and gRPC (gRPC-Web) on the same one.
#[derive(Clone, Copy)]
struct Hosts {
    lax: &'static str,
    strict: &'static str,
}

/// Routes for one backend (`to` sets the backend on a spec).
fn routes(g: GatewaySpec, hosts: Hosts, to: &dyn Fn(RouteSpec) -> RouteSpec) -> GatewaySpec {
    g.route(
        to(
            RouteSpec::new(&format!("{}-json", hosts.lax.replace('.', "-")))
                .hosts(&[hosts.lax])
                .prefix("/v1"),
        )
        .extra(transcode(false)),
    )
    .route(
        to(
            RouteSpec::new(&format!("{}-strict", hosts.lax.replace('.', "-")))
                .hosts(&[hosts.strict])
                .prefix("/v1"),
        )
        .extra(transcode(true)),
    )
    .route(
        to(
            RouteSpec::new(&format!("{}-grpc", hosts.lax.replace('.', "-")))
                .hosts(&[hosts.lax])
                .prefix("/demo.orders.v1.Orders"),
        )
        .extra(json!({"grpc_web": true})),
    )
}

async fn call(
    gw: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Got {
    tokio::time::timeout(
        Duration::from_secs(15),
        plain(gw, method, host, path, headers, body.as_bytes()),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path}: no answer in 15s"))
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

/// Every mapping, both ways.
async fn check_mappings(gw: SocketAddr, h: Hosts, how: &str) {
    // path variable, 64-bit integers as strings, enum by name, WKTs, json_name, defaults omitted
    let r = call(gw, "GET", h.lax, "/v1/orders/7", &[], "").await;
    assert_eq!(r.status, 200, "{how}: {r:?}");
    assert_eq!(r.headers["content-type"], "application/json", "{how}");
    assert_eq!(
        r.json(),
        json!({"id": "7", "status": "PAID", "totalCents": "9007199254740993", "sequence": "18446744073709551615",
               "items": [{"sku": "A1", "quantity": 2, "priceCents": "150"}], "createdAt": "2026-01-02T03:04:05Z",
               "holdFor": "90s", "coupon": "SAVE10", "signature": "c2ln", "labels": {"gift-wrap": "yes"},
               "card": {"last4": "4242", "brand": "visa"}, "email": "buyer@example.com"}),
        "{how}: GET /v1/orders/7"
    );
    // additional_bindings, and single-segment variables decode every escape
    let r = call(gw, "GET", h.lax, "/v1/shops/s%201/orders/a%2Fb", &[], "").await;
    assert_eq!(
        (r.status, r.json()["shop"].clone(), r.json()["id"].clone()),
        (200, json!("s 1"), json!("a/b")),
        "{how}: {r:?}"
    );
    // `**` keeps %2F encoded and binds the rest of the path
    let r = call(
        gw,
        "GET",
        h.lax,
        "/v1/attachments/invoices/2026/a%2Fb%20c.pdf",
        &[],
        "",
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"name": "invoices/2026/a%2Fb c.pdf", "content": "JVBERg=="}),
        "{how}: {r:?}"
    );
    // custom verb with body "*"; the path variable wins over the body's id
    let r = call(
        gw,
        "POST",
        h.lax,
        "/v1/orders/7:cancel",
        JSON,
        r#"{"id": "other", "reason": "late"}"#,
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": "7", "status": "CANCELLED", "note": "late"}),
        "{how}: {r:?}"
    );
    // body field, nested path variable, a FieldMask from the query
    let r = call(
        gw,
        "PATCH",
        h.lax,
        "/v1/orders/9?updateMask=note,status",
        JSON,
        r#"{"id": "ignored", "note": "n", "status": 3}"#,
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": "9", "status": "SHIPPED", "note": "n", "updatedFields": "note,status"}),
        "{how}: {r:?}"
    );
    // body bound to a string field
    let r = call(gw, "PUT", h.lax, "/v1/orders/5/note", JSON, r#""hello""#).await;
    assert_eq!(
        r.json(),
        json!({"id": "5", "note": "hello"}),
        "{how}: {r:?}"
    );
    // Empty answer
    let r = call(gw, "DELETE", h.lax, "/v1/orders/5", &[], "").await;
    assert_eq!((r.status, r.json()), (200, json!({})), "{how}: {r:?}");
    // response_body: the list itself
    let r = call(gw, "GET", h.lax, "/v1/orders/5/items", &[], "").await;
    assert_eq!(
        r.json(),
        json!([{"sku": "A1", "quantity": 2, "priceCents": "150"}, {"sku": "B2", "quantity": 1, "priceCents": "9007199254740993"}]),
        "{how}: {r:?}"
    );
    // query parameters: repeated, nested, enums by name and number, WKTs, wrappers, 64-bit
    let r = call(
        gw,
        "GET",
        h.lax,
        "/v1/orders?shop=s1&status=PAID&status=3&pageSize=5&filter.minTotalCents=100&filter.sku=A%201&labels=a&labels=b&createdAfter=2026-01-02T03:04:05Z&minItems=3&gift=true&min_sequence=18446744073709551615&maxAge=1.5s&maxWeightKg=2.5&ignored=1",
        &[],
        "",
    )
    .await;
    assert_eq!(
        r.json()["applied"],
        json!({"shop": "s1", "status": ["PAID", "SHIPPED"], "pageSize": 5, "filter": {"minTotalCents": "100", "sku": "A 1"},
               "labels": ["a", "b"], "createdAfter": "2026-01-02T03:04:05Z", "minItems": 3, "gift": true,
               "minSequence": "18446744073709551615", "maxAge": "1.500s", "maxWeightKg": 2.5}),
        "{how}: {r:?}"
    );
    // the whole Order round trip: numbers accepted for 64-bit, proto names accepted, every WKT
    // body: "order": the body is the order itself
    let body = json!({
            "id": "n1", "status": "PENDING", "total_cents": 9007199254740993u64, "sequence": "18446744073709551615",
            "items": [{"sku": "Z", "quantity": 1}], "createdAt": "2026-01-02T03:04:05.250Z", "holdFor": "0.5s",
            "metadata": {"tags": ["a", 1, true, null], "n": {"x": 1.5}}, "coupon": "", "signature": "AAEC",
            "labels": {"k": "v"}, "voucherCode": "V1", "customer_email": "x@example.com", "extra": [1, "two"],
            "weightKg": 1.25, "gift": false, "rating": 4.5, "parentId": "-12", "updatedFields": "a.b,cD"
    });
    let r = call(
        gw,
        "POST",
        h.lax,
        "/v1/shops/s9/orders",
        JSON,
        &body.to_string(),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": "n1", "shop": "s9", "status": "PENDING", "totalCents": "9007199254740993", "sequence": "18446744073709551615",
               "items": [{"sku": "Z", "quantity": 1}], "createdAt": "2026-01-02T03:04:05.250Z", "holdFor": "0.500s",
               "metadata": {"tags": ["a", 1.0, true, null], "n": {"x": 1.5}}, "coupon": "", "signature": "AAEC",
               "labels": {"k": "v"}, "voucherCode": "V1", "email": "x@example.com", "extra": [1.0, "two"],
               "weightKg": 1.25, "rating": 4.5, "parentId": "-12", "updatedFields": "a.b,cD"}),
        "{how}: {r:?}"
    );
    // unknown JSON fields and query parameters are ignored by default
    let r = call(
        gw,
        "POST",
        h.lax,
        "/v1/orders/7:cancel?x=1",
        JSON,
        r#"{"reason": "r", "nope": {"a": 1}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{how}: {r:?}");
    // routing errors
    let r = call(gw, "GET", h.lax, "/v1/nope", &[], "").await;
    assert_eq!(r.status, 404, "{how}: {r:?}");
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{how}"
    );
    assert_eq!(
        r.json()["type"],
        "https://meshgate.dev/problems/no-route",
        "{how}"
    );
    let r = call(gw, "PUT", h.lax, "/v1/orders/7", JSON, "{}").await;
    assert_eq!(
        (r.status, r.headers["allow"].to_str().unwrap_or_default()),
        (405, "GET, PATCH, DELETE"),
        "{how}: {r:?}"
    );
    let r = call(gw, "GET", h.lax, "/v1/orders/7:cancel", &[], "").await;
    assert_eq!(
        r.json()["id"],
        "7:cancel",
        "{how}: without its verb, ':cancel' is part of the id"
    );
}

/// 400 before the service is called, naming the field; strict mode; `calls` counts what the
/// service saw (tonic only).
async fn check_input_errors(gw: SocketAddr, h: Hosts, how: &str, calls: Option<&AtomicUsize>) {
    let before = calls.map(|c| c.load(Ordering::SeqCst));
    let cases: &[(&str, &str, &str, &str)] = &[
        ("POST", "/v1/shops/s/orders", r#"{"id": "#, "not valid JSON"),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"id": "a"} {"#,
            "trailing characters",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"id": 7}"#,
            "/id: expected a string",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"items": [{"quantity": 3000000000}]}"#,
            "/items/0/quantity: 3000000000 is out of range for int32",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"card": {"last4": "1"}, "voucherCode": "v"}"#,
            "same oneof",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"status": "LOST"}"#,
            "/status: \"LOST\" is not a value of enum Status",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"createdAt": "yesterday"}"#,
            "/createdAt",
        ),
        (
            "POST",
            "/v1/shops/s/orders",
            r#"{"signature": "***"}"#,
            "/signature",
        ),
        ("GET", "/v1/orders?pageSize=lots", "", "?pageSize"),
        ("GET", "/v1/orders?status=LOST", "", "?status"),
        (
            "GET",
            "/v1/orders?shop=a&shop=b",
            "",
            "?shop: given more than once",
        ),
        ("GET", "/v1/orders/%FF", "", "{id}"),
    ];
    for (method, path, body, want) in cases {
        let r = call(gw, method, h.lax, path, JSON, body).await;
        assert_eq!(r.status, 400, "{how}: {method} {path} {body}: {r:?}");
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{how}"
        );
        let detail = r.json()["detail"].as_str().unwrap_or_default().to_owned();
        assert!(detail.contains(want), "{how}: {body}: {detail}");
    }
    let r = call(
        gw,
        "POST",
        h.lax,
        "/v1/shops/s/orders",
        &[("content-type", "text/plain")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 415, "{how}: {r:?}");
    // strict: unknown fields and parameters are refused by name
    let r = call(
        gw,
        "POST",
        h.strict,
        "/v1/orders/7:cancel",
        JSON,
        r#"{"reason": "r", "nope": 1}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{how}: {r:?}");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("/nope: unknown field"),
        "{how}: {r:?}"
    );
    let r = call(
        gw,
        "GET",
        h.strict,
        "/v1/orders?shop=a&colour=red&size=9",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{how}: {r:?}");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("?colour, ?size"),
        "{how}: {r:?}"
    );
    if let (Some(c), Some(b)) = (calls, before) {
        assert_eq!(
            c.load(Ordering::SeqCst),
            b,
            "{how}: the service saw none of the refused requests"
        );
    }
    // a valid strict call still works
    let r = call(gw, "GET", h.strict, "/v1/orders?shop=a", &[], "").await;
    assert_eq!(
        (r.status, r.json()["applied"]["shop"].clone()),
        (200, json!("a")),
        "{how}: {r:?}"
    );
}

/// Every gRPC code to its HTTP status, with the decoded message and the details.
async fn check_status_table(gw: SocketAddr, h: Hosts, how: &str) {
    let table = [
        (1, 499),
        (2, 500),
        (3, 400),
        (4, 504),
        (5, 404),
        (6, 409),
        (7, 403),
        (8, 429),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (13, 500),
        (14, 503),
        (15, 500),
        (16, 401),
    ];
    for (code, http) in table {
        let c = code.to_string();
        let r = call(gw, "GET", h.lax, "/v1/orders/7", &[("x-fail-code", &c)], "").await;
        assert_eq!(r.status, http, "{how}: code {code}: {r:?}");
        assert_eq!(r.headers["content-type"], "application/json", "{how}");
        assert_eq!(
            r.json(),
            json!({"code": code, "message": FAIL_MESSAGE, "details": []}),
            "{how}: code {code}"
        );
        assert!(
            r.body
                .starts_with(&format!("{{\"code\":{code},\"message\":")),
            "{how}: {}",
            r.body
        );
    }
    let r = call(
        gw,
        "GET",
        h.lax,
        "/v1/orders/7",
        &[("x-fail-code", "3"), ("x-fail-details", "1")],
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{how}: {r:?}");
    assert_eq!(
        r.json()["details"],
        json!([{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "id", "description": "must be numeric"}]}]),
        "{how}: {r:?}"
    );
}

/// A raw HTTP/1.1 GET whose body chunks are timed as they arrive: (status line and head,
/// (arrival, decoded body bytes so far) per read, whether the chunked body ended cleanly).
async fn timed_get(
    gw: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (String, Vec<(Duration, String)>, bool) {
    let mut s = tokio::net::TcpStream::connect(gw).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    arrivals.push((started.elapsed(), raw.len()));
                }
            }
        }
    })
    .await;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    // dechunk, remembering where each body byte came from
    let mut body = Vec::new();
    let mut at = end + 4;
    let mut clean = false;
    let mut offsets = Vec::new();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        while let Some(le) = raw[at..].windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&raw[at..at + le]).trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                clean = raw.len() >= at + le + 4;
                break;
            }
            let start = at + le + 2;
            if raw.len() < start + size {
                break;
            }
            body.extend_from_slice(&raw[start..start + size]);
            offsets.push((start + size, body.len()));
            at = start + size + 2;
        }
    } else {
        body.extend_from_slice(&raw[at..]);
        offsets.push((raw.len(), body.len()));
        clean = true;
    }
    let timeline = arrivals
        .iter()
        .map(|(t, upto)| {
            let n = offsets
                .iter()
                .filter(|(raw_end, _)| raw_end <= upto)
                .map(|(_, b)| *b)
                .max()
                .unwrap_or(0);
            (*t, String::from_utf8_lossy(&body[..n]).into_owned())
        })
        .collect();
    (head, timeline, clean)
}

/// Streams: incremental delivery, SSE, an error before the first message, a mid-stream error.
async fn check_streams(gw: SocketAddr, h: Hosts, how: &str) {
    let (head, timeline, clean) =
        timed_get(gw, h.lax, "/v1/orders:watch?count=4&interval=0.3s", &[]).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{how}: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{how}: {head}"
    );
    assert!(clean, "{how}: a successful stream ends cleanly");
    let last = timeline.last().map(|(_, b)| b.clone()).unwrap_or_default();
    let lines: Vec<Value> = last
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 4, "{how}: {last}");
    assert_eq!(
        lines[0],
        json!({"orderId": "o1", "status": "PAID", "sequence": "1"}),
        "{how}"
    );
    // message by message: the first line arrived long before the last one
    let first_at = timeline
        .iter()
        .find(|(_, b)| b.lines().count() >= 1)
        .map(|(t, _)| *t)
        .expect("first line");
    let last_at = timeline
        .iter()
        .find(|(_, b)| b.lines().count() >= 4)
        .map(|(t, _)| *t)
        .expect("last line");
    assert!(
        last_at.saturating_sub(first_at) >= Duration::from_millis(600),
        "{how}: lines were held back: first at {first_at:?}, last at {last_at:?}"
    );
    // SSE when asked
    let (head, timeline, _) = timed_get(
        gw,
        h.lax,
        "/v1/orders:watch?count=2&interval=0.05s",
        &[("accept", "text/event-stream")],
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{how}: {head}"
    );
    let body = timeline.last().map(|(_, b)| b.clone()).unwrap_or_default();
    assert_eq!(
        body,
        "data: {\"orderId\":\"o1\",\"status\":\"PAID\",\"sequence\":\"1\"}\n\ndata: {\"orderId\":\"o2\",\"status\":\"PAID\",\"sequence\":\"2\"}\n\n",
        "{how}"
    );
    // an error before the first message: its real status
    let r = call(
        gw,
        "GET",
        h.lax,
        "/v1/orders:watch?count=3",
        &[("x-fail-code", "5")],
        "",
    )
    .await;
    assert_eq!(
        (
            r.status,
            r.json()["code"].clone(),
            r.json()["message"].clone()
        ),
        (404, json!(5), json!(FAIL_MESSAGE)),
        "{how}: {r:?}"
    );
    // a mid-stream error: a final error record, and no clean end
    for (accept, fmt) in [
        ("application/x-ndjson", "ndjson"),
        ("text/event-stream", "sse"),
    ] {
        let (head, timeline, clean) = timed_get(
            gw,
            h.lax,
            "/v1/orders:watch?count=5&interval=0.02s",
            &[
                ("x-fail-code", "14"),
                ("x-fail-after", "2"),
                ("accept", accept),
            ],
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{how} {fmt}: {head}");
        assert!(
            !clean,
            "{how} {fmt}: a failed stream must not end as a clean success"
        );
        let body = timeline.last().map(|(_, b)| b.clone()).unwrap_or_default();
        match fmt {
            "ndjson" => {
                let lines: Vec<&str> = body.lines().collect();
                assert_eq!(lines.len(), 3, "{how}: {body}");
                let err: Value = serde_json::from_str(lines[2]).expect("error record");
                assert_eq!(
                    err,
                    json!({"error": {"code": 14, "message": FAIL_MESSAGE, "details": []}}),
                    "{how}"
                );
            }
            _ => {
                let (_, last) = body
                    .rsplit_once("event: error\ndata: ")
                    .unwrap_or_else(|| panic!("{how}: no error event in {body}"));
                let err: Value = serde_json::from_str(last.trim_end()).expect("error event JSON");
                assert_eq!(
                    err,
                    json!({"code": 14, "message": FAIL_MESSAGE, "details": []}),
                    "{how}"
                );
                assert!(last.ends_with("\n\n"), "{how}: {body}");
                assert_eq!(body.matches("data: ").count(), 3, "{how}: {body}");
            }
        }
    }
}

/// A gRPC-Web call (binary and text) to the gRPC route: frames, then the trailers frame.
async fn check_grpc_web(gw: SocketAddr, h: Hosts, how: &str) {
    use base64::Engine as _;
    let msg = pb::GetOrderRequest {
        id: "7".into(),
        shop: String::new(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let parse = |body: &[u8]| -> (Vec<Vec<u8>>, String) {
        let mut msgs = Vec::new();
        let mut trailers = String::new();
        let mut i = 0;
        while i + 5 <= body.len() {
            let len =
                u32::from_be_bytes([body[i + 1], body[i + 2], body[i + 3], body[i + 4]]) as usize;
            let payload = body[i + 5..i + 5 + len].to_vec();
            if body[i] & 0x80 != 0 {
                trailers = String::from_utf8_lossy(&payload).into_owned();
            } else {
                msgs.push(payload);
            }
            i += 5 + len;
        }
        (msgs, trailers)
    };
    let mut conn = plain_bytes(
        gw,
        h.lax,
        "/demo.orders.v1.Orders/GetOrder",
        "application/grpc-web+proto",
        frame.clone(),
    )
    .await;
    assert_eq!(conn.0, 200, "{how}: {:?}", conn.1);
    assert_eq!(
        conn.1["content-type"], "application/grpc-web+proto",
        "{how}"
    );
    let (msgs, trailers) = parse(&conn.2);
    assert_eq!(msgs.len(), 1, "{how}");
    let order = pb::Order::decode(msgs[0].as_slice()).expect("an Order");
    assert_eq!(order, canonical("7", ""), "{how}");
    assert!(
        trailers.contains("grpc-status: 0\r\n"),
        "{how}: {trailers:?}"
    );
    // text: base64 both ways
    let b64 = base64::engine::general_purpose::STANDARD;
    conn = plain_bytes(
        gw,
        h.lax,
        "/demo.orders.v1.Orders/GetOrder",
        "application/grpc-web-text",
        b64.encode(&frame).into_bytes(),
    )
    .await;
    assert_eq!(
        conn.1["content-type"], "application/grpc-web-text+proto",
        "{how}"
    );
    let text = String::from_utf8(conn.2.clone()).expect("text");
    // padded segments one after another
    let mut raw = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let cut = rest
            .find('=')
            .map(|i| rest[i..].find(|c| c != '=').map_or(rest.len(), |j| i + j))
            .unwrap_or(rest.len());
        raw.extend(b64.decode(&rest[..cut]).expect("base64"));
        rest = &rest[cut..];
    }
    let (msgs, trailers) = parse(&raw);
    assert_eq!(
        (msgs.len(), trailers.contains("grpc-status: 0")),
        (1, true),
        "{how}: {trailers}"
    );
    // a failing call: its status in the trailers frame (or a trailers-only head)
    let r = plain_bytes_with(
        gw,
        h.lax,
        "/demo.orders.v1.Orders/GetOrder",
        "application/grpc-web+proto",
        frame,
        &[("x-fail-code", "7")],
    )
    .await;
    let (_, trailers) = parse(&r.2);
    let head_status =
        r.1.get("grpc-status")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert!(
        trailers.contains("grpc-status: 7") || head_status.as_deref() == Some("7"),
        "{how}: PERMISSION_DENIED arrives: {:?} {trailers:?}",
        r.1
    );
}

async fn plain_bytes(
    gw: SocketAddr,
    host: &str,
    path: &str,
    ct: &str,
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    plain_bytes_with(gw, host, path, ct, body, &[]).await
}

async fn plain_bytes_with(
    gw: SocketAddr,
    host: &str,
    path: &str,
    ct: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> (u16, http::HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(gw).await.expect("connect");
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let mut b = http::Request::post(path)
        .header("host", host)
        .header("content-type", ct)
        .header("x-grpc-web", "1");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let req = b
        .body(http_body_util::Full::new(Bytes::from(body)))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(10), s.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

struct TonicMesh {
    mesh: Mesh,
    svc: TonicOrders,
    _task: tokio::task::JoinHandle<()>,
}

const TONIC: Hosts = Hosts {
    lax: "tonic.example",
    strict: "strict.tonic.example",
};

async fn tonic_mesh() -> TonicMesh {
    let (port, svc, task) = tonic_orders().await;
    let gw = routes(GatewaySpec::new(), TONIC, &|r| r.to("orders"))
        .configure(|c| c.paths.escaped_slashes = Spelling::Keep);
    let mesh = TestMesh::new()
        .agent(AgentSpec::new("node-b").service(ServiceSpec::grpc("orders", port)))
        .intention(Intention::allow("gateway", "orders"))
        .gateway(gw)
        .start()
        .await;
    TonicMesh {
        mesh,
        svc,
        _task: task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcoding_maps_every_rule_to_a_tonic_service_in_the_mesh() {
    let m = tonic_mesh().await;
    let gw = m.mesh.gw().http();
    check_mappings(gw, TONIC, "tonic").await;
    check_input_errors(gw, TONIC, "tonic", Some(&m.svc.calls)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_map_to_http_statuses_with_their_details() {
    let m = tonic_mesh().await;
    check_status_table(m.mesh.gw().http(), TONIC, "tonic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_are_relayed_message_by_message_and_errors_are_never_clean() {
    let m = tonic_mesh().await;
    check_streams(m.mesh.gw().http(), TONIC, "tonic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_get_their_frames_and_trailers() {
    let m = tonic_mesh().await;
    check_grpc_web(m.mesh.gw().http(), TONIC, "tonic").await;
}

const PY: Hosts = Hosts {
    lax: "py.example",
    strict: "strict.py.example",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_transcoding_against_grpcio_as_an_external_h2c_url() {
    let Some(python) = venv_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let set = dir.path().join("orders.pb");
    std::fs::write(&set, meshgate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let py = PyServer::start(
        &python,
        "grpc_orders_server.py",
        &[set.to_str().expect("utf8")],
    )
    .await;
    let url = format!("http://{}", py.addr());
    let gw = routes(GatewaySpec::new(), PY, &|r| {
        r.extra(json!({"backend": {"external": {"url": url, "h2c": true}}}))
    })
    .configure(|c| c.paths.escaped_slashes = Spelling::Keep);
    let mesh = TestMesh::new().gateway(gw).start().await;
    let gw = mesh.gw().http();
    check_mappings(gw, PY, "grpcio").await;
    check_input_errors(gw, PY, "grpcio", None).await;
    check_status_table(gw, PY, "grpcio").await;
    check_streams(gw, PY, "grpcio").await;
    check_grpc_web(gw, PY, "grpcio").await;
}
