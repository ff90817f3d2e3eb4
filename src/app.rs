//! The public builder an application embeds Switchyard through.
//!
//! An application hands [`App`] its configuration and its routes; [`App::serve`] assembles the
//! node (actors, pools, HTTP server) and runs it until SIGINT or SIGTERM. The bundled demo shop
//! ([`crate::shop`]) is written against exactly this API.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::web;
use serde_json::{Map, Value};
use switchyard_actors::context::ContextProcessor;
use switchyard_actors::tasks::{Registry, Task, TaskContext, TaskError, TaskOptions};

use crate::config::Config;
pub use crate::error::StartError;
use crate::http::auth::MergeFn;
pub use crate::topology::Running;
use crate::topology::{Parts, RouteFn, Topology};

/// An application: configuration plus what it adds to Switchyard (routes, and in later
/// versions context processors and tasks).
pub struct App {
    pub(crate) config: Config,
    pub(crate) routes: Vec<RouteFn>,
    pub(crate) processors: HashMap<String, Arc<dyn ContextProcessor>>,
    pub(crate) merge: Option<MergeFn>,
    pub(crate) csrf_exempt: std::collections::HashSet<String>,
    pub(crate) tasks: Registry,
}

impl App {
    /// A new application on `config`. Handlers and tasks already share one value: the
    /// [`Mailer`](crate::mail::Mailer) of `[mail]`.
    pub fn new(config: Config) -> Self {
        let mailer = crate::mail::Mailer::new(&config.mail);
        let mut tasks = Registry::new();
        crate::beat::register_builtins(&mut tasks, &config);
        Self {
            config,
            routes: Vec::new(),
            processors: HashMap::new(),
            merge: None,
            csrf_exempt: Default::default(),
            tasks,
        }
        .data(mailer)
    }

    /// Shares `value` with every handler (as `web::Data<T>`) and every task (as
    /// `ctx.data::<T>()`), as actix's `App::app_data` does for handlers.
    pub fn data<T: Send + Sync + 'static>(self, value: T) -> Self {
        self.data_arc(Arc::new(value))
    }

    /// [`App::data`] for a value already in an `Arc`, such as a trait object
    /// (`Arc<dyn OrderStore>`, reached as `web::Data<dyn OrderStore>`).
    pub fn data_arc<T: ?Sized + Send + Sync + 'static>(mut self, value: Arc<T>) -> Self {
        self.tasks.insert_data(value.clone());
        let data = web::Data::from(value);
        self.routes(move |cfg| {
            cfg.app_data(data.clone());
        })
    }

    /// The configuration this application runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds routes, as `actix_web::App::configure` does. May be called several times.
    pub fn routes(mut self, f: impl Fn(&mut web::ServiceConfig) + Send + Sync + 'static) -> Self {
        self.routes.push(Arc::new(f));
        self
    }

    /// Registers a context processor under its name; list the name in `context.processors`
    /// to use it (the list fixes the merge order).
    pub fn context_processor(mut self, processor: impl ContextProcessor) -> Self {
        self.processors
            .insert(processor.name().to_owned(), Arc::new(processor));
        self
    }

    /// The hook `sessions.on_login = "merge"` calls at login: `(anonymous data, the user's
    /// previous session data) -> the new session's data`.
    pub fn on_login_merge(
        mut self,
        f: impl Fn(&Map<String, Value>, &Map<String, Value>) -> Map<String, Value>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.merge = Some(Arc::new(f));
        self
    }

    /// Exempts a route pattern (as written in `routes`, e.g. `/hooks/{name}`) from the CSRF
    /// check, as Django's `@csrf_exempt` (for endpoints other programs POST to).
    pub fn csrf_exempt(mut self, pattern: impl Into<String>) -> Self {
        self.csrf_exempt.insert(pattern.into());
        self
    }

    /// Registers a task: workers of this node run it, and handlers publish it through
    /// `web::Data<switchyard::tasks::Tasks>` (see `docs/tasks.md`).
    pub fn task<T: Task>(mut self, task: T) -> Self {
        self.tasks.register(task);
        self
    }

    /// Registers the async function `f` as the task `name` (Celery's `@shared_task`): its
    /// arguments are the message's `args` object decoded as `A`, its result `O` as JSON.
    /// `options` sets its queue, retries and limits (`TaskOptions::new()` for the defaults).
    pub fn task_fn<F, A, O, Fut>(mut self, name: &'static str, options: TaskOptions, f: F) -> Self
    where
        F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, TaskError>> + Send + 'static,
        A: serde::de::DeserializeOwned + Send + 'static,
        O: serde::Serialize + 'static,
    {
        self.tasks.register_fn(name, options, f);
        self
    }

    /// The tasks registered so far.
    pub fn tasks(&self) -> &Registry {
        &self.tasks
    }

    /// The registry of tasks, taking it (what `switchyard worker` runs).
    /// Adds a periodic task to `[[beat.schedule]]` (run by `switchyard beat`, or by `serve` on
    /// the memory broker or with `[beat] embedded = true`). It is checked when the beat starts.
    pub fn schedule(mut self, entry: crate::config::ScheduleEntry) -> Self {
        self.config.beat.schedule.push(entry);
        self
    }

    pub(crate) fn into_registry(self) -> Registry {
        self.tasks
    }

    /// The configuration (with the schedules added in code) and the tasks.
    pub(crate) fn into_config_and_registry(self) -> (Config, Registry) {
        (self.config, self.tasks)
    }

    /// Starts the node: actors, then the HTTP server. Must run inside an actix system.
    pub async fn start(self) -> Result<Running, StartError> {
        Topology::start(Parts {
            config: self.config,
            routes: self.routes,
            processors: self.processors,
            merge: self.merge,
            csrf_exempt: self.csrf_exempt,
            tasks: self.tasks,
        })
        .await
    }

    /// Starts the node and runs it until SIGINT or SIGTERM, then shuts down in order.
    pub async fn serve(self) -> Result<(), StartError> {
        self.start().await?.wait().await;
        Ok(())
    }
}
