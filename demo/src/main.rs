//! The `switchyard` binary: the demo shop, handed to the library's command line exactly as any
//! application's `main` is.

/// mimalloc: request handling allocates many small, short-lived values across threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchyard::main(switchyard_demo::install)
}
