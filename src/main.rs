//! The `switchyard` binary: parse the command line and hand over to the library.

/// mimalloc: request handling allocates many small, short-lived values across threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    switchyard::cli::main()
}
