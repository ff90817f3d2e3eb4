#!/usr/bin/env bash
# Builds the fuzz targets into the main workspace's target directory (target/release/), with
# only Switchyard's crates and the targets instrumented (fuzz/afl-rustc): the dependencies are
# the ones a `cargo build --release` or `cargo bench` of the workspace already built. Needs
# cargo-afl's runtime (`cargo install cargo-afl && cargo afl config --build`).
set -euo pipefail
cd "$(dirname "$0")"
rt=$(ls -d "${XDG_DATA_HOME:-$HOME/.local/share}"/afl.rs/rustc-*/afl.rs-*/afl-llvm/afl-compiler-rt.o | tail -1)
[ -f "$rt" ] || { echo "no AFL++ runtime: run cargo afl config --build" >&2; exit 1; }
AFL_RT_OBJECT=$rt RUSTC_WRAPPER="$PWD/afl-rustc" CARGO_TARGET_DIR="$PWD/../target" \
  cargo build --release "$@"
