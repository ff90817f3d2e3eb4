#!/usr/bin/env bash
# Fuzzes every target for SECONDS each (default 240), one after another (one core), then prints
# executions, execs/s, corpus size, crashes and hangs per target. Findings stay in out/<target>/.
# Usage: fuzz/run-all.sh [SECONDS] [TARGET...]   (see docs/fuzzing.md)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-240}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(session_cookie stored_record task_message dead_letter config_file)
mkdir -p out
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_AUTORESUME=1
for t in "${targets[@]}"; do
  cargo afl fuzz -i "seeds/$t" -o "out/$t" -V "$seconds" "../target/release/$t" > "out-$t.log" 2>&1 || {
    echo "$t: afl-fuzz failed, see fuzz/out-$t.log"; tail -20 "out-$t.log"; exit 1; }
done
printf '%-15s %12s %10s %8s %8s %6s %s\n' target execs execs/s corpus crashes hangs seconds
for t in "${targets[@]}"; do
  s="out/$t/default/fuzzer_stats"
  v() { awk -F' *: *' -v k="$1" '$1==k {print $2}' "$s"; }
  printf '%-15s %12s %10s %8s %8s %6s %s\n' "$t" "$(v execs_done)" "$(v execs_per_sec)" \
    "$(v corpus_count)" "$(v saved_crashes)" "$(v saved_hangs)" "$(v run_time)"
done
