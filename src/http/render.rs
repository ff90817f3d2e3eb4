//! Rendering: handlers return a [`Render`] (template + its own context); the render middleware
//! builds the full context around it and turns it into HTML.
//!
//! The split lets rendering be asynchronous (context processors run in actors) while a
//! handler stays a plain function returning a value, as a Django view returns `render(...)`.

use std::sync::Arc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::Value;

use super::context::{Evaluated, Processors};
use super::page::PendingRender;
pub use super::page::{Render, ERROR_TEMPLATE};
use super::template_vars::Needs;
use super::templates::Templates;

/// What the render middleware needs, shared by every HTTP worker.
pub struct Renderer {
    pub(crate) templates: Arc<Templates>,
    pub(crate) debug: bool,
    /// `context.lazy`: run only the processors a template can use.
    pub(crate) lazy: bool,
    pub(crate) processors: Arc<Processors>,
}

impl Renderer {
    async fn page(&self, req: &HttpRequest, pending: PendingRender) -> HttpResponse {
        let PendingRender { render, detail } = pending;
        let needs = if self.lazy {
            self.templates.needs(&render.template)
        } else {
            Arc::new(Needs::All)
        };
        let Evaluated { mut vars, failures } = self.processors.evaluate(req, &needs).await;
        vars.extend(render.context);
        let mut context = vars;
        // Error details and processor failures: in debug, and to a loopback client only.
        let show_details = self.debug && is_local(req);
        if show_details {
            if !failures.is_empty() {
                let list: Vec<Value> = failures
                    .iter()
                    .map(|f| Value::String(f.to_string()))
                    .collect();
                context.insert("context_errors".into(), Value::Array(list));
            }
            if let Some(detail) = detail {
                context.insert("error_detail".into(), Value::String(detail));
            }
        }
        // By value: rendering from a borrowed context would copy all of it first.
        match self
            .templates
            .render_owned(&render.template, Value::Object(context))
        {
            Ok(html) => html_response(render.status, html),
            Err(e) => {
                tracing::error!("{e}");
                if render.template == ERROR_TEMPLATE {
                    // The error page itself is broken: fall back to plain text.
                    return plain_error(show_details.then(|| e.to_string()));
                }
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                let fallback = PendingRender::error(
                    status,
                    serde_json::json!({
                        "status": status.as_u16(),
                        "title": "Server error",
                        "message": "Something went wrong on our side. It has been logged.",
                    }),
                    Some(e.to_string()),
                );
                Box::pin(self.page(req, fallback)).await
            }
        }
    }
}

/// Whether the request comes from this machine ([`super::client::Client::local`]: a loopback
/// client, and a loopback peer that is no trusted proxy forwards for nobody).
pub(crate) fn is_local(req: &HttpRequest) -> bool {
    super::client::client(req).local
}

fn html_response(status: StatusCode, html: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(html)
}

fn plain_error(detail: Option<String>) -> HttpResponse {
    let mut body = String::from("Server error\n");
    if let Some(d) = detail {
        body.push_str(&d);
        body.push('\n');
    }
    HttpResponse::InternalServerError()
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

/// The render middleware: turns a [`Render`] left in a response into HTML.
pub async fn render_middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let res = next.call(req).await?;
    let pending = res.response().extensions().get::<PendingRender>().cloned();
    let Some(pending) = pending else {
        return Ok(res.map_into_boxed_body());
    };
    let Some(renderer) = res.request().app_data::<web::Data<Renderer>>().cloned() else {
        let (req, _) = res.into_parts();
        let e = super::Error::Internal(
            "the renderer is not installed on this app (a start-up bug)".into(),
        );
        return Ok(ServiceResponse::new(req, e.error_response()));
    };
    let (req, old) = res.into_parts();
    let mut page = renderer.page(&req, pending).await;
    // Keep what handlers and inner middleware put on the response (cookies, Vary, Location).
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            page.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(ServiceResponse::new(req, page))
}
