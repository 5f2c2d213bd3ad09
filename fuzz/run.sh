#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each; exits non-zero if any
# target crashed (crash inputs land in fuzz/artifacts/<target>/, ignored by
# git).
#
#   bash fuzz/run.sh SECONDS
#
# Seeds come from the committed fuzz/corpus/<target>/seed-*; new corpus
# entries go to a temporary directory that is removed afterwards, so the
# repository is never written to (except artifacts on a crash).
#
# Environment: FUZZ_SANITIZER (default `none`: the code the targets reach is safe Rust, and
# without AddressSanitizer the targets run about twice as fast; set
# `address` to turn it on), FUZZ_TARGETS (space-separated subset).
set -euo pipefail

secs=${1:?usage: bash fuzz/run.sh SECONDS}
cd "$(dirname "$0")"
# cargo-fuzz needs nightly-only rustc flags; the stable toolchain takes them
# with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

sanitizer=${FUZZ_SANITIZER:-none}
# -a: debug assertions and overflow checks on, in the library too.
flags=(-a -s "$sanitizer")
read -r -a targets <<<"${FUZZ_TARGETS:-frame_decode handshake_server handshake_client session_roundtrip connection_input handshake_auth}"

# Inputs longer than this stop adding coverage: two maximum-size (64 KiB)
# frames for the stream targets, a key plus a pipelined frame for the
# handshakes, a few hundred operations for connection_input (one op byte
# can make a maximum-size frame).
max_len_of() {
  case $1 in
    frame_decode) echo 140000 ;;
    session_roundtrip) echo 70000 ;;
    handshake_server | handshake_client) echo 128 ;;
    handshake_auth) echo 512 ;;
    connection_input) echo 4096 ;;
    *) echo 4096 ;;
  esac
}

echo "==> building ${targets[*]}"
start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "build: $(($(date +%s) - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
summary=()
total=0
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t"
  log="$work/$t.log"
  echo "==> fuzzing $t for ${secs}s"
  status=0
  cargo fuzz run "${flags[@]}" "$t" "$work/corpus/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=512 -max_len="$(max_len_of "$t")" \
    -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  total=$((total + ${runs:-0}))
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    echo "!! $t failed (exit $status):"
    grep -A3 'panicked at' "$log" || true
    grep -E '^(SUMMARY|MS:|0x|artifact_prefix|Base64)' "$log" || tail -n 40 "$log"
  fi
  summary+=("$(printf '%-18s execs=%-10s exec/s=%-8s %s%s' "$t" "${runs:-?}" "${rate:-?}" "$cov" \
    "$([ "$status" -ne 0 ] && echo '  CRASH')")")
done

echo
echo "==> summary (${secs}s per target, sanitizer=$sanitizer)"
printf '%s\n' "${summary[@]}"
echo "total execs: $total"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
echo "no crashes"
