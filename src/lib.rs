//! Switchyard: Django-style sessions and context processors and Celery-style tasks, as actix
//! actors, served by actix-web and scaled out over NATS.
//!
//! # Layout
//!
//! - [`app`]: the public builder an application embeds Switchyard through ([`App`]).
//! - [`config`]: the typed configuration (defaults < file < environment < flags).
//! - [`cli`]: the `switchyard` command line (serve, worker, config check, ...).
//! - [`http`]: routes, middleware, templates, metrics and the one place errors become
//!   responses.
//! - [`shop`]: the bundled demo shop, written against the public API only.
//! - [`tasks`]: defining, registering and publishing tasks (the task API of the actors crate).
//! - `topology`: the only place that assembles actors, pools and the HTTP server, and the
//!   explicit shutdown order.
//! - `engines`: opens the session engine `sessions.engine` names with its pools and
//!   connections (for `topology` and the CLI's `sessions`/`users` commands).
//!
//! The actors themselves live in the `switchyard-actors` crate, which knows nothing of HTTP.
//!
//! # Example
//!
//! ```no_run
//! use switchyard::{App, Render, config::Config, web};
//!
//! async fn hello() -> Render {
//!     Render::new("hello", serde_json::json!({ "name": "world" }))
//! }
//!
//! #[actix_web::main]
//! async fn main() -> anyhow::Result<()> {
//!     let config = Config::load(Config::default_path().as_deref())?;
//!     App::new(config)
//!         .routes(|cfg| {
//!             cfg.route("/hello", web::get().to(hello));
//!         })
//!         .serve()
//!         .await?;
//!     Ok(())
//! }
//! ```

pub mod app;
pub mod cli;
pub mod config;
pub mod db;
mod engines;
pub mod http;
pub mod shop;
mod task_commands;
pub mod tasks;
mod topology;

pub use actix_web::web;
pub use app::{App, Running};
pub use http::auth::{CurrentUser, LoginRequired, User};
pub use http::error::Error;
pub use http::render::Render;
pub use http::session::Session;
pub use switchyard_actors::context::messages;
/// The session handle's types (the [`Session`] extractor dereferences to
/// [`session::Session`]).
pub mod session {
    pub use switchyard_actors::session::{
        Expiry, Session, SessionError, SessionId, SessionStore, AUTH_USER_KEY,
    };
}
pub use switchyard_actors::context::{ContextProcessor, RequestSnapshot};
