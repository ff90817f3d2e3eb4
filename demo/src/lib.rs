//! The bundled demo shop: products, a session cart, login, orders and their confirmation mail.
//!
//! An application of the `switchyard` library like any other: it uses only the library's public
//! API, and its binary hands [`install`] to [`switchyard::main`].

pub mod orders;
pub mod tasks;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{Either, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use orders::{MemoryOrderStore, NewOrder, OrderError, OrderItem, OrderStore, PgOrderStore};
use switchyard::context::{processor, Request};
use switchyard::http::auth::{self, Auth, CurrentUser};
use switchyard::http::session::Session;
use switchyard::messages::{self, Level};
use switchyard::tasks::{ClientError, PublishOptions, TaskOptions, TaskState, Tasks};
use switchyard::{web, App, Error, Render};
use tasks::{OrderCreatedArgs, EMAILS_QUEUE, ORDER_CREATED};

/// The session key holding the cart: product id → quantity.
pub const CART_KEY: &str = "cart";

/// A cart: product id (as a string, JSON object keys are strings) → quantity.
pub type Cart = BTreeMap<String, u32>;

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
        format_cents(self.price_cents)
    }
}

fn format_cents(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
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

fn product_json(p: &Product) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "price": p.price(),
    })
}

/// Total quantity and total price (cents) of a cart; unknown products are ignored.
pub fn cart_totals(cart: &Cart) -> (u64, u64) {
    cart.iter().fold((0, 0), |(n, total), (id, qty)| {
        let price = id
            .parse()
            .ok()
            .and_then(product)
            .map_or(0, |p| p.price_cents);
        (n + u64::from(*qty), total + price * u64::from(*qty))
    })
}

/// The `cart` context processor: `cart_count` and `cart_total` for the header.
pub fn cart_context(req: &Request) -> Value {
    let (count, total) = cart_totals(&req.session_get(CART_KEY).unwrap_or_default());
    json!({ "cart_count": count, "cart_total": format_cents(total) })
}

/// Merges two carts at login (`on_login = "merge"`): quantities add up.
pub fn merge_carts(
    anonymous: &Map<String, Value>,
    previous: &Map<String, Value>,
) -> Map<String, Value> {
    let mut merged = previous.clone();
    for (k, v) in anonymous {
        if k != CART_KEY {
            merged.insert(k.clone(), v.clone());
        }
    }
    let cart_of = |m: &Map<String, Value>| -> Cart {
        m.get(CART_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    };
    let mut cart = cart_of(previous);
    for (id, qty) in cart_of(anonymous) {
        *cart.entry(id).or_default() += qty;
    }
    if !cart.is_empty() {
        merged.insert(CART_KEY.into(), json!(cart));
    }
    merged
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

/// `GET /`: the product list.
async fn index() -> Render {
    // The catalogue is constant: built once, copied per request.
    static PRODUCTS_JSON: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(|| Value::Array(PRODUCTS.iter().map(product_json).collect()));
    Render::new(
        "shop/index",
        json!({ "title": "Products", "products": PRODUCTS_JSON.clone() }),
    )
}

/// `POST /cart/add/{id}`: one more of a product in the session cart.
async fn cart_add(id: web::Path<u32>, session: Session) -> Result<HttpResponse, Error> {
    let p = product(*id).ok_or(Error::NotFound)?;
    session.update(CART_KEY, |cart: Option<Cart>| add_one(cart, p.id))?;
    messages::success(&session, format!("{} added to your cart.", p.name))?;
    Ok(see_other("/cart"))
}

/// `cart` with one more of product `id`.
fn add_one(cart: Option<Cart>, id: u32) -> Cart {
    let mut cart = cart.unwrap_or_default();
    *cart.entry(id.to_string()).or_default() += 1;
    cart
}

/// `GET /cart`.
async fn cart(session: Session) -> Result<Render, Error> {
    let cart: Cart = session.get(CART_KEY)?.unwrap_or_default();
    let items: Vec<Value> = cart
        .iter()
        .filter_map(|(id, qty)| {
            let p = product(id.parse().ok()?)?;
            Some(json!({
                "id": p.id,
                "name": p.name,
                "quantity": qty,
                "price": p.price(),
                "subtotal": format_cents(p.price_cents * u64::from(*qty)),
            }))
        })
        .collect();
    let (_, total) = cart_totals(&cart);
    Ok(Render::new(
        "shop/cart",
        json!({"title": "Cart", "items": items, "total": format_cents(total)}),
    ))
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
}

fn login_page(next: Option<&str>, username: &str) -> Render {
    Render::new(
        "shop/login",
        json!({
            "title": "Log in",
            "next": next.and_then(auth::safe_next).unwrap_or(""),
            "username": username,
        }),
    )
}

/// `GET /login`.
async fn login_form(query: web::Query<LoginQuery>) -> Render {
    login_page(query.next.as_deref(), "")
}

/// `POST /login`.
async fn login_submit(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    auth_store: web::Data<Auth>,
) -> Result<Either<HttpResponse, Render>, Error> {
    let form = form.into_inner();
    match auth_store
        .authenticate(&req, &form.username, &form.password)
        .await?
    {
        Some(user) => {
            auth::login(&req, &user).await?;
            let next = form
                .next
                .as_deref()
                .and_then(auth::safe_next)
                .unwrap_or("/");
            Ok(Either::Left(see_other(next)))
        }
        None => {
            if let Some(session) = Session::of(&req) {
                messages::add(&session, Level::Error, "Wrong username or password.")?;
            }
            Ok(Either::Right(login_page(
                form.next.as_deref(),
                &form.username,
            )))
        }
    }
}

/// `POST /logout`.
async fn logout(req: HttpRequest) -> HttpResponse {
    auth::logout(&req);
    see_other("/")
}

fn order_err(e: OrderError) -> Error {
    match e {
        OrderError::Unavailable(message) => Error::Unavailable {
            what: "order store".into(),
            message,
        },
    }
}

/// The cart's lines, priced now (unknown products and zero quantities are left out).
fn order_items(cart: &Cart) -> Vec<OrderItem> {
    cart.iter()
        .filter(|(_, qty)| **qty > 0)
        .filter_map(|(id, qty)| {
            let p = product(id.parse().ok()?)?;
            Some(OrderItem {
                product_id: p.id,
                name: p.name.to_owned(),
                quantity: *qty,
                price_cents: p.price_cents,
            })
        })
        .collect()
}

/// Whether checkout enqueues the order's e-mail in the order's transaction
/// (`tasks.outbox = "postgres"`).
struct UseOutbox(bool);

/// `POST /orders`: checkout. Creates the order, empties the cart, publishes
/// `shop.order_created` on `emails`.
async fn order_create(
    user: CurrentUser,
    session: Session,
    auth_store: web::Data<Auth>,
    orders: web::Data<dyn OrderStore>,
    tasks: web::Data<Tasks>,
    outbox: web::Data<UseOutbox>,
) -> Result<HttpResponse, Error> {
    let Some(user) = user.0 else {
        return Err(Error::LoginRequired {
            location: auth::login_redirect(auth_store.login_url(), "/cart"),
        });
    };
    let cart: Cart = session.get(CART_KEY)?.unwrap_or_default();
    let items = order_items(&cart);
    if items.is_empty() {
        messages::add(&session, Level::Warning, "Your cart is empty.")?;
        return Ok(see_other("/cart"));
    }
    let total_cents = items
        .iter()
        .map(|i| i.price_cents * u64::from(i.quantity))
        .sum();
    let task_id = switchyard::tasks::new_task_id();
    let mut options = PublishOptions::new().task_id(task_id.clone());
    if !tasks.has_queue(EMAILS_QUEUE) {
        // The built-in defaults have only the default queue; default.toml adds `emails`.
        options = options.queue(tasks.default_queue());
    }
    let new_order = NewOrder {
        owner: user.username,
        items,
        total_cents,
        task_id: Some(task_id),
    };
    let email = |order_id: u64| {
        let args = serde_json::to_value(OrderCreatedArgs { order_id })
            .map_err(|e| ClientError::Args(e.to_string()))?;
        tasks.prepare(ORDER_CREATED, args, &options)
    };
    // With the outbox the order and its e-mail commit together; else the e-mail is published
    // after the order, which is undone when that fails.
    let outboxed = match outbox.0 {
        true => orders.create_with_task(new_order.clone(), &email).await,
        false => None,
    };
    let order = match outboxed {
        Some(created) => created.map_err(order_err)?,
        None => {
            let order = orders.create(new_order).await.map_err(order_err)?;
            let args = serde_json::to_value(OrderCreatedArgs { order_id: order.id })
                .map_err(Error::internal)?;
            if let Err(e) = tasks.send(ORDER_CREATED, args, options.clone()).await {
                if let Err(undo) = orders.delete(order.id).await {
                    tracing::error!(order = order.id, "cannot undo the order: {undo}");
                }
                return Err(Error::Unavailable {
                    what: "task broker".into(),
                    message: e.to_string(),
                });
            }
            order
        }
    };
    session.remove(CART_KEY);
    messages::add(
        &session,
        Level::Success,
        format!("Thank you! Order #{} is placed.", order.id),
    )?;
    Ok(see_other(&format!("/orders/{}", order.id)))
}

/// `GET /orders/{id}`: the order and the state of its confirmation e-mail; only its owner
/// sees it, everyone else (anonymous included) gets a 404.
async fn order_detail(
    path: web::Path<String>,
    user: CurrentUser,
    orders: web::Data<dyn OrderStore>,
    tasks: web::Data<Tasks>,
) -> Result<Render, Error> {
    let id: u64 = path.into_inner().parse().map_err(|_| Error::NotFound)?;
    let order = orders
        .get(id)
        .await
        .map_err(order_err)?
        .ok_or(Error::NotFound)?;
    if user.0.map(|u| u.username).as_deref() != Some(order.owner.as_str()) {
        return Err(Error::NotFound);
    }
    let state = match &order.task_id {
        Some(task_id) => {
            tasks
                .result(task_id)
                .await
                .map_err(|e| Error::Unavailable {
                    what: "task broker".into(),
                    message: e.to_string(),
                })?
                .state
        }
        None => TaskState::Pending,
    };
    let items: Vec<Value> = order
        .items
        .iter()
        .map(|i| {
            json!({
                "id": i.product_id,
                "name": i.name,
                "quantity": i.quantity,
                "price": format_cents(i.price_cents),
                "subtotal": format_cents(i.price_cents * u64::from(i.quantity)),
            })
        })
        .collect();
    Ok(Render::new(
        "shop/order",
        json!({
            "title": format!("Order #{}", order.id),
            "order": {
                "id": order.id,
                "items": items,
                "total": format_cents(order.total_cents),
                "created_at": order.created_at.to_rfc3339(),
            },
            "task_id": order.task_id,
            "task_state": state.as_str(),
            "task_done": state.is_ready(),
        }),
    ))
}

/// `GET /orders/{id}/events`: the order's e-mail task's events as server-sent events, for the
/// order's owner only (everyone else, anonymous included, gets a 404).
async fn order_events(
    req: HttpRequest,
    path: web::Path<String>,
    user: CurrentUser,
    orders: web::Data<dyn OrderStore>,
    monitor: web::Data<switchyard::dashboard::Monitor>,
) -> Result<HttpResponse, Error> {
    let id: u64 = path.into_inner().parse().map_err(|_| Error::NotFound)?;
    let order = orders
        .get(id)
        .await
        .map_err(order_err)?
        .ok_or(Error::NotFound)?;
    if user.0.map(|u| u.username).as_deref() != Some(order.owner.as_str()) {
        return Err(Error::NotFound);
    }
    let task_id = order.task_id.ok_or(Error::NotFound)?;
    Ok(switchyard::dashboard::event_stream(
        &req,
        &monitor,
        Some(task_id),
    ))
}

/// `GET /orders/live.js`: the order page's live updates (no inline script: the CSP allows
/// none).
async fn order_live_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(include_str!("order_live.js"))
}

/// Adds the demo shop to `app`: its routes, its `cart` processor, its cart merge hook, its
/// order store and its tasks. Orders live in Postgres when the task queues are shared through
/// NATS (`tasks.broker = "nats"`: a worker on another node must read them), else in memory.
pub fn install(app: App) -> App {
    let config = app.config();
    let orders: Arc<dyn OrderStore> = if config.tasks.broker == switchyard::config::Broker::Nats {
        Arc::new(PgOrderStore::new(
            config.postgres.url.expose_secret(),
            config.postgres.pool_size,
        ))
    } else {
        Arc::new(MemoryOrderStore::new())
    };
    let emails = TaskOptions::new().queue(EMAILS_QUEUE);
    let outbox = UseOutbox(config.tasks.outbox == switchyard::config::Outbox::Postgres);
    app.data_arc(orders)
        .data(outbox)
        .context_processor(processor(
            "cart",
            &["cart_count", "cart_total"],
            cart_context,
        ))
        .on_login_merge(merge_carts)
        .task(tasks::Add)
        .task(tasks::Sum)
        .task(tasks::Sleep)
        .task(tasks::Flaky)
        .task(tasks::Count)
        .task_fn(ORDER_CREATED, emails, tasks::order_created)
        .routes(|cfg| {
            cfg.route("/", web::get().to(index))
                .route("/cart/add/{id}", web::post().to(cart_add))
                .route("/cart", web::get().to(cart))
                .route("/login", web::get().to(login_form))
                .route("/login", web::post().to(login_submit))
                .route("/logout", web::post().to(logout))
                .route("/orders", web::post().to(order_create))
                .route("/orders/live.js", web::get().to(order_live_js))
                .route("/orders/{id}", web::get().to(order_detail))
                .route("/orders/{id}/events", web::get().to(order_events));
        })
}
