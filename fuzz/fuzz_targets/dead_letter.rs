//! AFL++ target `dead_letter`: see `switchyard_fuzz::actors::dead_letter` and docs/fuzzing.md.

fn main() {
    afl::fuzz!(|data: &[u8]| switchyard_fuzz::actors::dead_letter(data));
}
