//! HTTP: the route table's fixed part, middleware, templates, metrics, and errors → responses.

pub mod auth;
pub mod client;
pub mod context;
pub mod csrf;
pub mod error;
pub mod health;
pub mod metrics;
pub mod page;
pub mod render;
pub mod session;
pub mod template_vars;
pub mod templates;
pub mod throttle;
pub mod users;

pub use error::Error;
pub use render::Render;
