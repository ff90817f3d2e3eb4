//! The command line of SPEC.md, run for *the application* whose `main` hands over its setup:
//! stdout carries only results, logs and messages go to stderr; exit 0 success, 2 bad usage or
//! configuration, 1 runtime failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{AuthStore, Broker, Config, LogFormat, SessionEngine};
use crate::http::users::{PgUsers, UserError};
use crate::{engines, App};

/// Exit code for bad usage or invalid configuration.
const EXIT_USAGE: u8 = 2;
/// Exit code for a runtime failure.
const EXIT_FAILURE: u8 = 1;

/// Switchyard: sessions, context processors and tasks on actix and NATS.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (default: config/default.toml when it exists, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an HTTP node (the demo shop); with tasks.broker = "memory" also its workers.
    Serve(ServeArgs),
    /// Run a worker node consuming task queues from NATS.
    Worker(WorkerArgs),
    /// Run periodic schedules.
    Beat(NodeArgs),
    /// Publish a task and print its id.
    Publish(PublishArgs),
    /// Print the result record of a task.
    Result { id: String },
    /// Revoke a task that has not started.
    Revoke { id: String },
    /// Drop every waiting task of a queue.
    Purge { queue: String },
    /// Session maintenance.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// User accounts of auth.store = "postgres" (an extension of SPEC.md).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Inspect and replay dead-lettered tasks.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Cluster inspection.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Tasks waiting for their eta.
    #[command(subcommand)]
    Scheduled(ScheduledCommand),
}

#[derive(Debug, Subcommand)]
enum ScheduledCommand {
    /// One JSON line per scheduled task: {"id","task","queue","eta"}, soonest first.
    List {
        #[arg(long)]
        queue: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (overrides server.bind); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// This node's id (overrides server.node_id).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    /// Queues to consume, comma-separated (default: every configured queue).
    #[arg(long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Tasks run at once per queue (overrides each queue's concurrency).
    #[arg(long)]
    concurrency: Option<u32>,
    /// This node's id.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// This node's id.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The task's registered name.
    task: String,
    /// The task's arguments, a JSON object.
    args: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    unique: Option<String>,
    #[arg(long)]
    countdown: Option<f64>,
    #[arg(long)]
    eta: Option<String>,
    /// Wait for the result (default 30 s) and print it.
    #[arg(long, num_args = 0..=1, default_missing_value = "30")]
    wait: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// Delete expired sessions from the configured engine.
    Clear,
    /// End every session of one user.
    Revoke {
        #[arg(long)]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Create a user; prints {"created":NAME}.
    Create {
        name: String,
        /// Read the password from the first line of standard input (required).
        #[arg(long)]
        password_stdin: bool,
        /// A permission such as shop.view_order (repeatable).
        #[arg(long = "permission", value_name = "PERM")]
        permissions: Vec<String>,
        /// The user may open the operator dashboard (server.dashboard_path).
        #[arg(long)]
        staff: bool,
    },
    /// Replace a user's password and end every session of the user; prints
    /// {"updated":NAME,"revoked":N}.
    SetPassword {
        name: String,
        /// Read the password from the first line of standard input (required).
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// One JSON line per dead letter.
    List { queue: Option<String> },
    /// Send dead letters back to their queue.
    Replay {
        id: Option<String>,
        #[arg(long)]
        all: bool,
        queue: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration.
    Check { file: Option<PathBuf> },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The live nodes of the cluster.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line and runs it for the application `setup` builds: the whole CLI of
/// SPEC.md (`serve`, `worker`, `publish`, ...) for that application's routes, context
/// processors and tasks. `setup` gets an [`App`] holding the loaded configuration
/// (`app.config()`) and returns it with the application's parts added.
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     switchyard::main(|app| app.routes(|cfg| { /* cfg.route(...) */ }))
/// }
/// ```
pub fn main(setup: impl FnOnce(App) -> App) -> ExitCode {
    let cli = Cli::parse();
    run(cli, setup)
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let path = path.or_else(Config::default_path);
    Config::load(path.as_deref()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// Runs a parsed command line for the application `setup` builds.
pub fn run(cli: Cli, setup: impl FnOnce(App) -> App) -> ExitCode {
    let config_path = cli.config;
    match cli.command {
        Command::Config(ConfigCommand::Check { file }) => {
            let config = match load(file.or(config_path)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Serve(args) => {
            let mut config = match load(config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(bind) = args.bind {
                config.server.bind = bind.to_string();
            }
            if let Some(id) = args.node_id {
                config.server.node_id = id;
            }
            if let Err(e) = config.validate() {
                return usage_error(e);
            }
            init_tracing(&config);
            serve(setup(App::new(config)))
        }
        Command::Worker(_)
        | Command::Beat(_)
        | Command::Publish(_)
        | Command::Result { .. }
        | Command::Revoke { .. }
        | Command::Purge { .. }
        | Command::Scheduled(_)
        | Command::Dead(_)
        | Command::Cluster(_) => {
            let mut config = match load(config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match config.tasks.broker {
                Broker::Memory => usage_error(
                    "tasks.broker = \"memory\" keeps the task queue inside `switchyard serve`; \
                     set tasks.broker = \"nats\" (for example SWITCHYARD_TASKS__BROKER=nats) \
                     to use this command",
                ),
                Broker::Nats => {
                    init_tracing(&config);
                    task_command(&mut config, cli.command, setup)
                }
            }
        }
        Command::Sessions(cmd) => {
            let config = match load(config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match config.sessions.engine {
                SessionEngine::Memory | SessionEngine::SignedCookies => usage_error(format!(
                    "sessions.engine = \"{}\" keeps no sessions this command can reach; \
                     it needs a server-side engine such as \"file\" or \"postgres\"",
                    config.sessions.engine.as_str()
                )),
                _ => block_on(sessions_command(config, cmd)),
            }
        }
        Command::Users(cmd) => {
            let config = match load(config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if config.auth.store != AuthStore::Postgres {
                return usage_error(format!(
                    "auth.store = \"{}\" keeps its users in [[auth.users]]; set auth.store = \
                     \"postgres\" (for example SWITCHYARD_AUTH__STORE=postgres) to manage users \
                     with this command",
                    config.auth.store.as_str()
                ));
            }
            block_on(users_command(config, cmd))
        }
    }
}

/// The task commands with `tasks.broker = "nats"` (see `task_commands`).
fn task_command(config: &mut Config, command: Command, setup: impl FnOnce(App) -> App) -> ExitCode {
    use crate::task_commands::{self as tc, Simple};
    let config = std::mem::take(config);
    // The application's tasks: what `worker` runs and `publish` knows the options of.
    let app = |config: &Config| setup(App::new(config.clone()));
    match command {
        Command::Worker(args) => {
            let mut config = config;
            if let Some(id) = args.node_id {
                config.server.node_id = id;
            }
            let registry = app(&config).into_registry();
            tc::worker(config, registry, args.queues, args.concurrency)
        }
        Command::Publish(a) => block_on(tc::publish(
            app(&config).into_registry(),
            config,
            tc::PublishRequest {
                task: a.task,
                args: a.args,
                queue: a.queue,
                unique: a.unique,
                countdown: a.countdown,
                eta: a.eta,
                wait: a.wait,
            },
        )),
        Command::Result { id } => block_on(tc::simple(config, Simple::Result(id))),
        Command::Revoke { id } => block_on(tc::simple(config, Simple::Revoke(id))),
        Command::Purge { queue } => block_on(tc::simple(config, Simple::Purge(queue))),
        Command::Dead(DeadCommand::List { queue }) => block_on(tc::dead_list(config, queue)),
        Command::Dead(DeadCommand::Replay { id, all, queue }) => {
            block_on(tc::dead_replay(config, id, all, queue))
        }
        Command::Beat(args) => {
            let mut config = config;
            if let Some(id) = args.node_id {
                config.server.node_id = id;
            }
            let (config, registry) = app(&config).into_config_and_registry();
            tc::beat(config, registry)
        }
        Command::Scheduled(ScheduledCommand::List { queue }) => {
            block_on(tc::scheduled_list(config, queue))
        }
        Command::Cluster(ClusterCommand::Status { json }) => {
            block_on(tc::cluster_status(config, json))
        }
        _ => failure("not a task command"),
    }
}

/// Runs a command's future on a single-threaded runtime.
fn block_on(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => failure(format!("cannot start the runtime: {e}")),
    }
}

async fn sessions_command(config: Config, cmd: SessionsCommand) -> ExitCode {
    let store = match open_for_cli(&config).await {
        Ok(Some(store)) => store,
        Ok(None) => return usage_error("sessions.engine keeps no sessions on the server"),
        Err(code) => return code,
    };
    match cmd {
        SessionsCommand::Clear => match store.purge_expired().await {
            Ok(n) => {
                println!("{}", serde_json::json!({ "deleted": n }));
                ExitCode::SUCCESS
            }
            Err(e) => failure(e),
        },
        SessionsCommand::Revoke { user } => {
            let ids = match store.sessions_of(&user).await {
                Ok(ids) => ids,
                Err(e) => return failure(e),
            };
            let mut n = 0u64;
            for id in ids {
                if let Err(e) = store.delete(&id).await {
                    return failure(format!("{e} (after ending {n} sessions)"));
                }
                n += 1;
            }
            println!("{}", serde_json::json!({ "revoked": n }));
            ExitCode::SUCCESS
        }
    }
}

/// The configured engine for a maintenance command; `cached_db` first learns the live nodes so
/// that its deletions reach their caches before the command returns.
async fn open_for_cli(
    config: &Config,
) -> Result<Option<std::sync::Arc<dyn switchyard_actors::session::SessionStore>>, ExitCode> {
    let opened = match engines::open(&engines::Services::new(config)).await {
        Ok(Some(o)) => o,
        Ok(None) => return Ok(None),
        Err(e) => return Err(failure(e)),
    };
    if let Some(cached) = &opened.cached {
        if let Err(e) = cached.listen(None).await {
            return Err(failure(format!("nats.url: {e}")));
        }
    }
    Ok(Some(opened.store))
}

/// The first line of standard input, without its line ending.
fn password_from_stdin(given: bool) -> Result<String, ExitCode> {
    if !given {
        return Err(usage_error(
            "pass the password on standard input with --password-stdin",
        ));
    }
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        return Err(failure(format!("cannot read standard input: {e}")));
    }
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(usage_error(
            "the password read from standard input is empty",
        ));
    }
    Ok(password)
}

async fn users_command(config: Config, cmd: UsersCommand) -> ExitCode {
    let users = match engines::Services::new(&config).postgres().await {
        Ok(pool) => match PgUsers::open(pool).await {
            Ok(u) => u,
            Err(e) => return failure(format!("postgres.url: {e}")),
        },
        Err(e) => return failure(e),
    };
    match cmd {
        UsersCommand::Create {
            name,
            password_stdin,
            permissions,
            staff,
        } => {
            let password = match password_from_stdin(password_stdin) {
                Ok(p) => p,
                Err(code) => return code,
            };
            match users
                .create_user(&name, &password, &permissions, staff)
                .await
            {
                Ok(()) => {
                    println!("{}", serde_json::json!({ "created": name }));
                    ExitCode::SUCCESS
                }
                Err(UserError::Invalid(m)) => usage_error(m),
                Err(e) => failure(e),
            }
        }
        UsersCommand::SetPassword {
            name,
            password_stdin,
        } => {
            let password = match password_from_stdin(password_stdin) {
                Ok(p) => p,
                Err(code) => return code,
            };
            if let Err(e) = users.set_password(&name, &password).await {
                return match e {
                    UserError::Invalid(m) => usage_error(m),
                    e => failure(e),
                };
            }
            // A new password ends every session of the user (when sessions live server-side).
            let revoked = match config.sessions.engine {
                SessionEngine::Memory | SessionEngine::SignedCookies => 0,
                _ => match open_for_cli(&config).await {
                    Ok(Some(store)) => match store.sessions_of(&name).await {
                        Ok(ids) => {
                            let mut n = 0u64;
                            for id in ids {
                                if store.delete(&id).await.is_ok() {
                                    n += 1;
                                }
                            }
                            n
                        }
                        Err(e) => return failure(format!("password changed; {e}")),
                    },
                    Ok(None) => 0,
                    Err(code) => {
                        eprintln!("the password was changed; its sessions were not ended");
                        return code;
                    }
                },
            };
            println!(
                "{}",
                serde_json::json!({ "updated": name, "revoked": revoked })
            );
            ExitCode::SUCCESS
        }
    }
}

fn serve(app: App) -> ExitCode {
    let system = actix_rt::System::new();
    system.block_on(async move {
        let running = match app.start().await {
            Ok(r) => r,
            Err(e) => return failure(e),
        };
        for addr in running.addrs() {
            println!("listening on http://{addr}");
        }
        running.wait().await;
        ExitCode::SUCCESS
    })
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging already initialised: {e}");
    }
}
