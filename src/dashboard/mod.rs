//! The operator dashboard (`server.dashboard_path`, staff only) and the live event streams.
//!
//! Every `serve` node keeps a [`Monitor`]: a bounded index of the recent tasks (the last
//! [`monitor::RECENT_TASKS`]) fed by the task events (the NATS events subjects, or the
//! in-process workers' events on the memory broker), the live nodes from heartbeats, and a
//! broadcast of every event that [`event_stream`] serves as Server-Sent Events. The pages are
//! handlebars templates built into the library (`switchyard/dashboard/*`); the assets are
//! served under `<dashboard_path>static/`. See `docs/dashboard.md`.

pub mod monitor;
mod pages;

pub use monitor::{Monitor, TaskFilter, TaskSummary};
pub use pages::{event_stream, Staff};
pub(crate) use pages::{routes, Backend, Dashboard};

/// The dashboard's templates, registered with the application's (names under
/// `switchyard/dashboard/`).
pub(crate) const TEMPLATES: &[(&str, &str)] = &[
    (
        "switchyard/dashboard/layout",
        include_str!("templates/layout.hbs"),
    ),
    (
        "switchyard/dashboard/overview",
        include_str!("templates/overview.hbs"),
    ),
    (
        "switchyard/dashboard/tasks",
        include_str!("templates/tasks.hbs"),
    ),
    (
        "switchyard/dashboard/task",
        include_str!("templates/task.hbs"),
    ),
    (
        "switchyard/dashboard/dead",
        include_str!("templates/dead.hbs"),
    ),
    (
        "switchyard/dashboard/schedules",
        include_str!("templates/schedules.hbs"),
    ),
    (
        "switchyard/dashboard/task_rows",
        include_str!("templates/task_rows.hbs"),
    ),
];
