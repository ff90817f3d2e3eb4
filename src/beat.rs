//! Beat as the application runs it: `[[beat.schedule]]` entries (and those added with
//! [`crate::App::schedule`]) turned into the beat of `switchyard-actors`, the built-in task
//! `switchyard.clear_sessions`, and the beat embedded in `serve`. See docs/tasks.md.

use std::str::FromStr;
use std::sync::Arc;

use serde_json::{json, Value};
use switchyard_actors::session::SessionStore;
use switchyard_actors::tasks::{
    Beat, BeatEntry, BeatStore, CancellationToken, Every, MemoryBeatStore, Misfire, NatsBeatStore,
    NatsBroker, Registry, TaskContext, TaskError, TaskOptions, Tasks,
};
use tokio::sync::OnceCell;

use crate::config::{self, Config, ScheduleEntry};
use crate::engines;

/// The built-in task that deletes expired sessions (Django's `clearsessions`).
pub const CLEAR_SESSIONS: &str = "switchyard.clear_sessions";

/// A schedule entry as the beat runs it, or why it cannot run.
pub(crate) fn entry(e: &ScheduleEntry) -> Result<BeatEntry, String> {
    let every = match (&e.every, &e.cron) {
        (Some(d), None) => Every::Interval(*d),
        (None, Some(expr)) => {
            let cron = croner::Cron::new(expr)
                .with_seconds_required()
                .parse()
                .map_err(|err| format!("schedule {:?}: cron {expr:?}: {err}", e.name))?;
            let tz = chrono_tz::Tz::from_str(&e.timezone)
                .map_err(|err| format!("schedule {:?}: timezone: {err}", e.name))?;
            Every::Cron(Box::new(cron), tz)
        }
        _ => {
            return Err(format!(
                "schedule {:?}: exactly one of every and cron",
                e.name
            ))
        }
    };
    let misfire = match e.misfire {
        config::Misfire::Skip => Misfire::Skip,
        config::Misfire::CatchUp => {
            Misfire::CatchUp(std::time::Duration::from_secs(e.catch_up_window))
        }
    };
    Ok(BeatEntry {
        name: e.name.clone(),
        task: e.task.clone(),
        args: Value::Object(e.args.clone()),
        queue: e.queue.clone().filter(|q| !q.is_empty()),
        every,
        misfire,
        skip_overlap: e.overlap == config::Overlap::Skip,
    })
}

/// Every entry of `config`, or the first that cannot run.
pub(crate) fn entries(config: &Config) -> Result<Vec<BeatEntry>, String> {
    config.beat.schedule.iter().map(entry).collect()
}

/// A beat over `tasks` leading through `store`.
pub(crate) fn beat(
    config: &Config,
    entries: Vec<BeatEntry>,
    store: Arc<dyn BeatStore>,
    tasks: Tasks,
) -> Beat {
    let result_ttl = crate::tasks::settings(config).result_ttl;
    Beat::new(entries, store, tasks, result_ttl)
}

/// Starts the beat embedded in `serve` (the memory broker, or `[beat] embedded = true`):
/// nothing when there is no schedule. The beat stops when `stop` fires.
pub(crate) async fn embedded(
    config: &Config,
    entries: Vec<BeatEntry>,
    tasks: Tasks,
    broker: Option<NatsBroker>,
    stop: CancellationToken,
) -> Result<Option<Arc<dyn BeatStore>>, String> {
    if entries.is_empty() {
        return Ok(None);
    }
    let store: Arc<dyn BeatStore> = match broker {
        Some(b) => {
            let node = config.server.node_id_or_default();
            Arc::new(
                NatsBeatStore::open(&b, &node)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
        None => Arc::new(MemoryBeatStore::default()),
    };
    let beat = beat(config, entries, store.clone(), tasks);
    actix_rt::spawn(beat.run(stop));
    Ok(Some(store))
}

/// Registers `switchyard.clear_sessions` on `registry`: it deletes the expired sessions of
/// the configured engine and returns `{"deleted": N}` (the memory engine purges itself, and
/// signed cookies keep nothing on the server: `{"deleted": 0}` for both).
pub(crate) fn register_builtins(registry: &mut Registry, config: &Config) {
    let config = Arc::new(config.clone());
    // The engine is opened on the first run and kept for the next ones.
    let store: Arc<OnceCell<Option<Arc<dyn SessionStore>>>> = Arc::default();
    registry.register_fn(
        CLEAR_SESSIONS,
        TaskOptions::default(),
        move |_ctx: TaskContext, _args: Value| {
            let (config, store) = (config.clone(), store.clone());
            async move {
                use crate::config::SessionEngine::{Memory, SignedCookies};
                if matches!(config.sessions.engine, Memory | SignedCookies) {
                    return Ok(json!({ "deleted": 0 }));
                }
                let store = store
                    .get_or_try_init(|| async {
                        let services = engines::Services::new(&config);
                        engines::open(&services)
                            .await
                            .map(|opened| opened.map(|o| o.store))
                    })
                    .await
                    .map_err(|e| TaskError::retry("sessions", e))?;
                let deleted = match store {
                    Some(store) => store
                        .purge_expired()
                        .await
                        .map_err(|e| TaskError::retry("sessions", e))?,
                    None => 0,
                };
                Ok(json!({ "deleted": deleted }))
            }
        },
    );
}
