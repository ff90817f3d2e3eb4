//! AFL++ target `config_file`: see `switchyard_fuzz::config::config_file` and docs/fuzzing.md.

fn main() {
    afl::fuzz!(|data: &[u8]| switchyard_fuzz::config::config_file(data));
}
