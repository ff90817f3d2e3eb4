//! The page a handler returns ([`Render`]: a template, the handler's own context, a status), and
//! the [`PendingRender`] it leaves in the response for the render middleware (`super::render`),
//! which builds the full context around it. Error pages are pending renders of
//! [`ERROR_TEMPLATE`] too (`super::error`).

use actix_web::body::BoxBody;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, Responder};
use serde_json::{Map, Value};

/// The template every error page renders with.
pub const ERROR_TEMPLATE: &str = "error";

/// A page to render: the template's name, the handler's own context, and the status.
#[derive(Debug, Clone)]
pub struct Render {
    pub(crate) template: String,
    pub(crate) context: Map<String, Value>,
    pub(crate) status: StatusCode,
}

impl Render {
    /// Renders `template` with `context` (a JSON object; anything else is put under `value`).
    pub fn new(template: impl Into<String>, context: Value) -> Self {
        let context = match context {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        Self {
            template: template.into(),
            context,
            status: StatusCode::OK,
        }
    }

    /// Answers with `status` instead of 200.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The template's name.
    pub fn template(&self) -> &str {
        &self.template
    }
}

/// A render waiting in a response's extensions for the render middleware.
#[derive(Debug, Clone)]
pub(crate) struct PendingRender {
    pub(crate) render: Render,
    /// The internal detail of an error page, shown only in debug.
    pub(crate) detail: Option<String>,
}

impl PendingRender {
    pub(crate) fn error(status: StatusCode, context: Value, detail: Option<String>) -> Self {
        Self {
            render: Render::new(ERROR_TEMPLATE, context).with_status(status),
            detail,
        }
    }
}

impl Responder for Render {
    type Body = BoxBody;

    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        let mut res = HttpResponse::build(self.status)
            .content_type("text/plain; charset=utf-8")
            .body("this page is rendered by switchyard's render middleware\n");
        res.extensions_mut().insert(PendingRender {
            render: self,
            detail: None,
        });
        res
    }
}
