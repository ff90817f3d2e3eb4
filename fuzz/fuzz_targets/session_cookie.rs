//! AFL++ target `session_cookie`: see `switchyard_fuzz::actors::session_cookie` and docs/fuzzing.md.

fn main() {
    afl::fuzz!(|data: &[u8]| switchyard_fuzz::actors::session_cookie(data));
}
