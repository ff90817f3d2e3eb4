//! Criterion benchmarks, one module per area; groups are named `area::what`.
//!
//! `cargo bench --bench main`

use criterion::{criterion_group, criterion_main, Criterion};

mod templates {
    use super::*;
    use switchyard::http::templates::Templates;

    pub fn bench(c: &mut Criterion) {
        let t = Templates::load("templates", false).expect("templates");
        let products: Vec<_> = switchyard::shop::PRODUCTS
            .iter()
            .map(|p| serde_json::json!({"id": p.id, "name": p.name, "description": p.description, "price": "1.00"}))
            .collect();
        let ctx = serde_json::json!({"products": products, "static_url": "/static/"});
        c.bench_function("templates::render_index", |b| {
            b.iter(|| t.render("shop/index", &ctx).expect("render"))
        });
    }
}

criterion_group!(benches, templates::bench);
criterion_main!(benches);
