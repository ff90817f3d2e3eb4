//! AFL++ target `stored_record`: see `switchyard_fuzz::actors::stored_record` and docs/fuzzing.md.

fn main() {
    afl::fuzz!(|data: &[u8]| switchyard_fuzz::actors::stored_record(data));
}
