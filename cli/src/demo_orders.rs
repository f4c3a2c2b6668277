//! The demo gRPC service of `meshgate dev` (and `meshgate demo --orders`): `demo.orders.v1.Orders`
//! (proto/proto/demo/orders/v1/orders.proto) with tonic, over an in-memory store seeded with two
//! orders. The gateway offers it as REST/JSON through its `google.api.http` rules and as gRPC
//! (and gRPC-Web) on its gRPC route.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use meshgate_proto::demo::orders::v1::{
    self as pb,
    orders_server::{Orders, OrdersServer},
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The store.
#[derive(Debug, Clone)]
struct Shop {
    orders: Arc<Mutex<BTreeMap<String, pb::Order>>>,
    next: Arc<Mutex<u64>>,
}

fn now() -> prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn seed() -> BTreeMap<String, pb::Order> {
    let order = |id: &str, status: pb::Status, sku: &str, q: i32, price: i64| pb::Order {
        id: id.into(),
        shop: "demo".into(),
        status: status as i32,
        total_cents: price * i64::from(q),
        sequence: 1,
        items: vec![pb::Item {
            sku: sku.into(),
            quantity: q,
            price_cents: price,
        }],
        created_at: Some(now()),
        labels: [("channel".to_owned(), "web".to_owned())].into(),
        customer_email: "buyer@example.com".into(),
        ..Default::default()
    };
    [
        order("1001", pb::Status::Paid, "A1", 2, 1250),
        order("1002", pb::Status::Pending, "B7", 1, 9900),
    ]
    .into_iter()
    .map(|o| (o.id.clone(), o))
    .collect()
}

impl Shop {
    fn new() -> Self {
        Self {
            orders: Arc::new(Mutex::new(seed())),
            next: Arc::new(Mutex::new(2000)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, pb::Order>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<pb::Order, Status> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no order {id}")))
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::OrderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Orders for Shop {
    async fn get_order(
        &self,
        r: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let r = r.into_inner();
        let o = self.get(&r.id)?;
        if !r.shop.is_empty() && r.shop != o.shop {
            return Err(Status::not_found(format!(
                "no order {} in shop {}",
                r.id, r.shop
            )));
        }
        Ok(Response::new(o))
    }

    async fn list_orders(
        &self,
        r: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let r = r.into_inner();
        let orders = self
            .lock()
            .values()
            .filter(|o| r.shop.is_empty() || o.shop == r.shop)
            .filter(|o| r.status.is_empty() || r.status.contains(&o.status))
            .take(if r.page_size > 0 {
                r.page_size as usize
            } else {
                50
            })
            .cloned()
            .collect();
        Ok(Response::new(pb::ListOrdersResponse {
            orders,
            next_page_token: String::new(),
            applied: Some(r),
        }))
    }

    async fn create_order(
        &self,
        r: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let r = r.into_inner();
        let mut o = r.order.unwrap_or_default();
        if o.items.is_empty() {
            return Err(Status::invalid_argument("an order needs at least one item"));
        }
        let id = {
            let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            n.to_string()
        };
        o.id = id.clone();
        o.shop = r.shop;
        o.status = pb::Status::Pending as i32;
        o.total_cents = o
            .items
            .iter()
            .map(|i| i.price_cents * i64::from(i.quantity))
            .sum();
        o.created_at = Some(now());
        o.sequence = 1;
        self.lock().insert(id, o.clone());
        Ok(Response::new(o))
    }

    async fn update_order(
        &self,
        r: Request<pb::UpdateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let r = r.into_inner();
        let patch = r.order.unwrap_or_default();
        let mut o = self.get(&patch.id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        for p in &paths {
            match p.as_str() {
                "note" => o.note = patch.note.clone(),
                "status" => o.status = patch.status,
                "labels" => o.labels = patch.labels.clone(),
                other => return Err(Status::invalid_argument(format!("cannot update {other}"))),
            }
        }
        o.sequence += 1;
        self.lock().insert(o.id.clone(), o.clone());
        Ok(Response::new(o))
    }

    async fn set_note(
        &self,
        r: Request<pb::SetNoteRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let r = r.into_inner();
        let mut o = self.get(&r.id)?;
        o.note = r.note;
        o.sequence += 1;
        self.lock().insert(o.id.clone(), o.clone());
        Ok(Response::new(o))
    }

    async fn delete_order(
        &self,
        r: Request<pb::DeleteOrderRequest>,
    ) -> Result<Response<()>, Status> {
        let id = r.into_inner().id;
        match self.lock().remove(&id) {
            Some(_) => Ok(Response::new(())),
            None => Err(Status::not_found(format!("no order {id}"))),
        }
    }

    async fn cancel_order(
        &self,
        r: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let r = r.into_inner();
        let mut o = self.get(&r.id)?;
        if o.status == pb::Status::Shipped as i32 {
            return Err(Status::failed_precondition(
                "a shipped order cannot be cancelled",
            ));
        }
        o.status = pb::Status::Cancelled as i32;
        o.note = r.reason;
        o.sequence += 1;
        self.lock().insert(o.id.clone(), o.clone());
        Ok(Response::new(o))
    }

    async fn list_items(
        &self,
        r: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::ItemList>, Status> {
        Ok(Response::new(pb::ItemList {
            items: self.get(&r.into_inner().id)?.items,
        }))
    }

    async fn get_attachment(
        &self,
        r: Request<pb::GetAttachmentRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let name = r.into_inner().name;
        Ok(Response::new(pb::Attachment {
            content: format!("demo attachment {name}\n").into_bytes(),
            name,
        }))
    }

    type WatchOrdersStream = Events;

    async fn watch_orders(
        &self,
        r: Request<pb::WatchOrdersRequest>,
    ) -> Result<Response<Events>, Status> {
        let r = r.into_inner();
        let count = if r.count <= 0 { 3 } else { r.count.min(100) };
        let interval = r
            .interval
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(10));
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..count {
                tokio::time::sleep(interval).await;
                let id = ids
                    .get(i as usize % ids.len().max(1))
                    .cloned()
                    .unwrap_or_default();
                let ev = pb::OrderEvent {
                    order_id: id,
                    status: pb::Status::Shipped as i32,
                    sequence: i64::from(i) + 1,
                    at: Some(now()),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn reindex(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

/// Order `id` of the seed as the transcoder writes it (`GET /v1/orders/{id}`), for the REST
/// demo service's plain-JSON twin of that route (`meshgate dev`'s `/api/orders/{id}`).
pub(crate) fn order_json(id: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "shop": "demo", "status": "PAID", "totalCents": "2500", "sequence": "1",
        "items": [{"sku": "A1", "quantity": 2, "priceCents": "1250"}],
        "createdAt": "2026-12-01T11:53:13.587107968Z", "labels": {"channel": "web"},
        "email": "buyer@example.com"
    })
}

/// Serves the demo Orders service (h2c) on `addr` until the task is dropped.
pub(crate) async fn serve(addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the demo orders service on {addr}"))?;
    Ok(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(OrdersServer::new(Shop::new()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    }))
}
