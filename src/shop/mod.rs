//! The bundled demo shop: products, a session cart, login, orders and their confirmation mail.
//!
//! It uses only Switchyard's public API, as an application embedding Switchyard would.

use serde::Serialize;
use serde_json::json;

use crate::{web, App, Render};

/// A product on sale.
#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub id: u32,
    pub name: &'static str,
    pub description: &'static str,
    /// Price in cents.
    pub price_cents: u64,
}

impl Product {
    fn price(&self) -> String {
        format!("{}.{:02}", self.price_cents / 100, self.price_cents % 100)
    }
}

/// The catalogue.
pub const PRODUCTS: &[Product] = &[
    Product {
        id: 1,
        name: "Green tea",
        description: "Sencha from Shizuoka, 100 g.",
        price_cents: 1250,
    },
    Product {
        id: 2,
        name: "Red tea",
        description: "Rooibos with vanilla, 150 g.",
        price_cents: 890,
    },
    Product {
        id: 3,
        name: "Tea pot",
        description: "Cast iron, 0.8 l.",
        price_cents: 4500,
    },
    Product {
        id: 4,
        name: "Cups",
        description: "Two stoneware cups.",
        price_cents: 1800,
    },
];

/// Looks a product up by id.
pub fn product(id: u32) -> Option<&'static Product> {
    PRODUCTS.iter().find(|p| p.id == id)
}

fn product_json(p: &Product) -> serde_json::Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "price": p.price(),
    })
}

/// `GET /`: the product list.
async fn index() -> Render {
    let products: Vec<_> = PRODUCTS.iter().map(product_json).collect();
    Render::new("shop/index", json!({ "title": "Products", "products": products }))
}

/// Adds the demo shop to `app`.
pub fn install(app: App) -> App {
    app.routes(|cfg| {
        cfg.route("/", web::get().to(index));
    })
}
