//! Route lookup cost at 10, 1,000 and 10,000 routes: the index must keep it flat.
//!
//! `cargo bench -p meshgate-gateway --bench routes`
#![allow(missing_docs)] // criterion's macros generate undocumented functions

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use meshgate_gateway::routes::{RequestView, RouteConfig, RouteTable};

/// `n` prefix routes on one host (`/svc{i}/…`), a catch-all, and a few exact and template
/// routes, as a large gateway config would have.
fn table(n: usize) -> RouteTable {
    let mut routes: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({"name": format!("r{i}"),
                "match": {"hosts": ["api.example"], "path": {"prefix": format!("/svc{i}")}},
                "backend": {"service": "users"}})
        })
        .collect();
    routes.push(serde_json::json!({"name": "all", "match": {"path": {"prefix": "/"}}, "backend": {"service": "users"}}));
    routes.push(serde_json::json!({"name": "me", "match": {"path": {"exact": "/users/me"}}, "backend": {"service": "users"}}));
    routes.push(serde_json::json!({"name": "by-id", "match": {"path": {"template": "/users/{id}"}}, "backend": {"service": "users"}}));
    let routes: Vec<RouteConfig> = routes
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("route"))
        .collect();
    RouteTable::compile(&routes).expect("routes compile")
}

fn lookup(c: &mut Criterion) {
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1_000, 10_000] {
        let t = table(n);
        // a route in the middle of the table, and the catch-all (every route is a candidate
        // for a linear scan)
        let mid = format!("/svc{}/items/7", n / 2);
        for (what, path) in [("prefix-hit", mid.as_str()), ("catch-all", "/nothing/here")] {
            let view = RequestView {
                method: "GET",
                host: "api.example",
                path,
                query: "",
                headers: &headers,
            };
            assert!(t.find(&view).is_some());
            g.bench_with_input(BenchmarkId::new(what, n), &view, |b, v| {
                b.iter(|| std::hint::black_box(t.find(v).map(|m| m.route.index())))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
