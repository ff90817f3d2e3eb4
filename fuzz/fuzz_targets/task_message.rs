//! AFL++ target `task_message`: see `switchyard_fuzz::actors::task_message` and docs/fuzzing.md.

fn main() {
    afl::fuzz!(|data: &[u8]| switchyard_fuzz::actors::task_message(data));
}
