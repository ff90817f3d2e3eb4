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
//! - [`mail`]: outgoing mail as `[mail]` configures it (Django's `send_mail` role).
//! - [`db`]: the application's Postgres handle.
//! - [`tasks`]: defining, registering and publishing tasks (the task API of the actors crate).
//! - `topology`: the only place that assembles actors, pools and the HTTP server, and the
//!   explicit shutdown order.
//! - `cluster`: a node's heartbeat and a worker or beat node's `/metrics` (docs/cluster.md).
//! - `engines`: opens the session engine `sessions.engine` names with its pools and
//!   connections (for `topology` and the CLI's `sessions`/`users` commands).
//!
//! The actors themselves live in the `switchyard-actors` crate, which knows nothing of HTTP.
//! The bundled demo shop is an application of this library (the workspace's `demo/` crate).
//!
//! # Example
//!
//! An application's `main` hands its setup to [`main`], which runs the whole command line
//! (`serve`, `worker`, `publish`, ...) for it; `docs/embedding.md` has a complete one.
//!
//! ```no_run
//! use switchyard::{web, Render};
//!
//! async fn hello(name: web::Path<String>) -> Render {
//!     Render::new("hello", serde_json::json!({ "name": name.into_inner() }))
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     switchyard::main(|app| {
//!         app.routes(|cfg| {
//!             cfg.route("/hello/{name}", web::get().to(hello));
//!         })
//!     })
//! }
//! ```

pub mod app;
mod beat;
pub mod cli;
mod cluster;
pub mod config;
pub mod dashboard;
pub mod db;
mod engines;
pub mod error;
pub mod http;
pub mod mail;
pub mod outbox;
mod task_commands;
pub mod tasks;
mod topology;

pub use actix_web::web;
pub use app::{App, Running};
pub use cli::main;
pub use error::StartError;
pub use http::auth::{CurrentUser, LoginRequired, User};
pub use http::error::Error;
pub use http::render::Render;
pub use http::session::Session;
pub use switchyard_actors::context::messages;

/// Context processors as an application writes them (Django's `context_processors`).
///
/// ```
/// use serde_json::{json, Value};
/// use switchyard::context::Request;
///
/// fn greeting(req: &Request) -> Value {
///     json!({ "greeting": format!("Hello from {}", req.path) })
/// }
/// let p = switchyard::context::processor("greeting", &["greeting"], greeting);
/// # let _ = p;
/// ```
pub mod context {
    pub use crate::http::context::FnProcessor;
    pub use switchyard_actors::context::{
        ContextProcessor, ProcessError, ProcessResult, RequestSnapshot as Request, UserInfo,
    };

    /// A context processor named `name` (as listed in `context.processors`) providing the
    /// template variables `provides`, computed by `f` from the request as a JSON object. With
    /// `context.lazy`, it runs only for templates that use one of `provides`.
    pub fn processor<F>(name: &str, provides: &'static [&'static str], f: F) -> FnProcessor<F>
    where
        F: Fn(&Request) -> serde_json::Value + Send + Sync + 'static,
    {
        FnProcessor::new(name, provides, f)
    }
}
/// The session handle's types (the [`Session`] extractor dereferences to
/// [`session::Session`]).
pub mod session {
    pub use switchyard_actors::session::{
        Expiry, Session, SessionError, SessionId, SessionStore, AUTH_USER_KEY,
    };
}
pub use switchyard_actors::context::ContextProcessor;
