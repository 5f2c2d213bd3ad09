#!/usr/bin/env bash
# Runs our loopback benchmark (examples/tools/bench.rs) and the tokio + tokio-rustls
# peer (bench-peers/) alternately, in two configurations (all cores, and
# `taskset -c 0`), and prints one markdown table per configuration: the
# medians over the rounds, the ratio peer/ours, and the CPU time per op.
#
#   bash bench-peers/compare.sh                   # 3 rounds of 2 s each
#   SECS=0.3 ROUNDS=1 bash bench-peers/compare.sh # a quick check
#
# Settings (environment, or the equivalent flag):
#   SECS=S        --secs S       seconds per benchmark, both sides (default 2)
#   ROUNDS=N      --rounds N     rounds per configuration (default 3)
#   CONFIGS=LIST  --configs LIST "all cpu0" (default), or one of them
#   BASELINES=0   --no-baselines leave out our RawPingPong/RawStream/RawSend rows
#   SPLIT_PEER=0  --no-split-peer leave out the peer whose server has its
#                                own runtime (the "split" columns)
#   NO_BUILD=1    --no-build     use the binaries already built
#   GO_MONTE=BIN  --go BIN       also run the Go library's six benchmarks
#                                from BIN, a test binary of lithdew/monte
#                                (`go test -c -o BIN` in a checkout of it):
#                                the "Go" columns; not built here
#
# Each round runs every benchmark as its own process, ours then the peer's
# (then the split peer's, then Go's), benchmark by benchmark (our bench's
# --bench takes one name), so all sides of a row ran back to back under
# the same background load. Go's benchmarks run a fixed number of
# iterations, calibrated once per configuration to about SECS seconds, so
# that the process's CPU time (from /usr/bin/time) over them is its CPU
# per op; Go has no async scenarios.
#
# The peer runs its client and server tasks on one tokio runtime, where a
# request and its response can be handled on one worker thread without a
# thread switch: a benchmark-only advantage, since a server runs in its
# own process. The split peer (`--server-runtime own`) gives the server a
# runtime of its own, nearer to a process of its own (still one process).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SECS=${SECS:-2}
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-"all cpu0"}
BASELINES=${BASELINES:-1}
SPLIT_PEER=${SPLIT_PEER:-1}
NO_BUILD=${NO_BUILD:-0}
GO_MONTE=${GO_MONTE:-}

usage() {
  sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --secs) SECS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --no-baselines) BASELINES=0; shift ;;
    --no-split-peer) SPLIT_PEER=0; shift ;;
    --no-build) NO_BUILD=1; shift ;;
    --go) GO_MONTE=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "compare.sh: unknown argument $1" >&2; usage ;;
  esac
done
CONFIGS=${CONFIGS//,/ }
case "$SPLIT_PEER" in
  0 | 1) ;;
  *) echo "compare.sh: SPLIT_PEER is 1 or 0, not $SPLIT_PEER" >&2; exit 2 ;;
esac
for cfg in $CONFIGS; do
  case "$cfg" in
    all | cpu0) ;;
    *) echo "compare.sh: unknown configuration $cfg (all, cpu0)" >&2; exit 2 ;;
  esac
done

BENCHES="Send SendNoWait Request ParallelSend ParallelSendNoWait ParallelRequest"
BENCHES="$BENCHES AsyncRequest AsyncParallelRequest"
REFS=""
[ "$BASELINES" = 1 ] && REFS="RawPingPong RawStream RawSend"

target_dir() { # default target directory of the package in $1
  local dir=${CARGO_TARGET_DIR:-$1/target}
  case "$dir" in /*) ;; *) dir=$root/$dir ;; esac
  echo "$dir"
}
ours=$(target_dir "$root")/release/examples/bench
peer=$(target_dir "$root/bench-peers")/release/tokio-rustls-bench

if [ "$NO_BUILD" != 1 ]; then
  echo "==> building ours: cargo build --release --example bench" >&2
  cargo build --release --example bench
  echo "==> building the peer: cargo build --release --manifest-path bench-peers/Cargo.toml" >&2
  cargo build --release --manifest-path bench-peers/Cargo.toml
fi
for bin in "$ours" "$peer"; do
  [ -x "$bin" ] || { echo "compare.sh: $bin is missing (build it, or drop --no-build)" >&2; exit 1; }
done
GO_BENCHES="Send SendNoWait Request ParallelSend ParallelSendNoWait ParallelRequest"
if [ -n "$GO_MONTE" ]; then
  [ -x "$GO_MONTE" ] || { echo "compare.sh: GO_MONTE=$GO_MONTE is not an executable" >&2; exit 2; }
  [ -x /usr/bin/time ] || { echo "compare.sh: the Go columns need GNU time (/usr/bin/time)" >&2; exit 2; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/compare.XXXXXX")
results=$work/results.tsv
log=$work/stderr.log
notes=$work/notes.txt
: >"$results"
: >"$notes"

# run CONFIG IMPL NAME ROUND: one benchmark in one process; appends
# "config impl name round cores ns/op ns-cpu/op" (ns-cpu/op: n/a if the line
# has no such column) to the results.
run() {
  local cfg=$1 impl=$2 name=$3 round=$4 bin pin="" out=$work/out
  local -a extra=()
  local -a cmd
  [ "$cfg" = cpu0 ] && pin="taskset -c 0"
  case "$impl" in
    ours) cmd=("$ours" --secs "$SECS" --bench "$name") ;;
    peer) cmd=("$peer" --secs "$SECS" --bench "$name") ;;
    split) cmd=("$peer" --secs "$SECS" --bench "$name" --server-runtime own) ;;
    go)
      cmd=(/usr/bin/time -f "%U %S" -o "$work/go.time"
        "$GO_MONTE" -test.run '^$' -test.bench "^Benchmark$name\$"
        -test.benchtime "${go_iterations[$cfg.$name]}x")
      ;;
  esac
  echo "== $cfg round $round: $impl $name" >>"$log"
  if ! $pin "${cmd[@]}" >"$out" 2>>"$log"; then
    echo "compare.sh: $impl $name ($cfg) failed; its output:" >&2
    cat "$out" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  local go_cpu=""
  [ "$impl" = go ] && go_cpu=$(cat "$work/go.time")
  # Go names a benchmark without "-N" when GOMAXPROCS is 1, and reports no
  # CPU: its process's user + sys time over iterations + 1 (its first
  # run of one iteration, which dials).
  awk -F'\t' -v cfg="$cfg" -v impl="$impl" -v name="$name" -v round="$round" -v go_cpu="$go_cpu" '
    {
      label = $1
      sub(/[ \t]+$/, "", label)
      if (label !~ ("^Benchmark" name "(-[0-9]+)?$")) next
      cores = 1
      if (label ~ /-[0-9]+$/) { cores = label; sub(/^.*-/, "", cores) }
      ns = ""; cpu = "n/a"
      for (i = 2; i <= NF; i++) {
        if ($i ~ / ns\/op$/) ns = $i + 0
        else if ($i ~ / ns-cpu\/op$/) cpu = $i + 0
      }
      if (go_cpu != "" && NF >= 2) {
        split(go_cpu, t, " ")
        cpu = (t[1] + t[2]) * 1e9 / ($2 + 1)
      }
      if (ns != "") { print cfg "\t" impl "\t" name "\t" round "\t" cores "\t" ns "\t" cpu; found = 1 }
    }
    END { if (!found) exit 1 }
  ' "$out" >>"$results" || {
    echo "compare.sh: no Benchmark$name line in $impl's output:" >&2
    cat "$out" >&2
    exit 1
  }
  # The baselines' variants (RawPingPong on one core, unpinned and
  # spinning on two; RawStream's write sizes; RawSend's readers), printed after the tables.
  grep '^# Raw' "$out" | sed "s/^# /$cfg, round $round: /" >>"$notes" || true
}

# calibrate_go CONFIG: Go's iteration count per benchmark, for about SECS
# seconds each (from a run of a quarter of that).
declare -A go_iterations
calibrate_go() {
  local cfg=$1 pin="" name ns
  [ "$cfg" = cpu0 ] && pin="taskset -c 0"
  echo "==> $cfg: calibrating Go's iteration counts" >&2
  for name in $GO_BENCHES; do
    ns=$($pin "$GO_MONTE" -test.run '^$' -test.bench "^Benchmark$name\$" \
      -test.benchtime "$(awk -v s="$SECS" 'BEGIN { printf "%.3fs", s / 4 }')" 2>>"$log" |
      awk -F'\t' '$1 ~ /^Benchmark/ { for (i = 2; i <= NF; i++) if ($i ~ / ns\/op$/) print $i + 0 }')
    [ -n "$ns" ] || { echo "compare.sh: Go's Benchmark$name gave no result (see $log)" >&2; exit 1; }
    go_iterations[$cfg.$name]=$(awk -v s="$SECS" -v ns="$ns" 'BEGIN { n = int(s * 1e9 / ns); print (n < 100) ? 100 : n }')
  done
}

for cfg in $CONFIGS; do
  [ -n "$GO_MONTE" ] && calibrate_go "$cfg"
  for round in $(seq 1 "$ROUNDS"); do
    echo "==> $cfg: round $round of $ROUNDS (${SECS}s per benchmark)" >&2
    for name in $BENCHES; do
      run "$cfg" ours "$name" "$round"
      run "$cfg" peer "$name" "$round"
      [ "$SPLIT_PEER" = 1 ] && run "$cfg" split "$name" "$round"
      if [ -n "$GO_MONTE" ] && [[ " $GO_BENCHES " == *" $name "* ]]; then
        run "$cfg" go "$name" "$round"
      fi
    done
    for name in $REFS; do
      run "$cfg" ours "$name" "$round"
    done
  done
done

echo
others="peer"
[ "$SPLIT_PEER" = 1 ] && others="$others split"
[ -n "$GO_MONTE" ] && others="$others go"
awk -F'\t' -v configs="$CONFIGS" -v benches="$BENCHES $REFS" -v rounds="$ROUNDS" -v secs="$SECS" -v others="$others" '
  # The median of column `col` (6: ns/op, 7: ns-cpu/op) over the rounds
  # of `key`; "n/a" if any round lacks it, "" if there are none.
  function median(key, col,    n, i, j, v, a) {
    n = count[key]
    if (n == 0) return ""
    for (i = 1; i <= n; i++) {
      if (vals[key, col, i] == "n/a") return "n/a"
      a[i] = vals[key, col, i] + 0
    }
    for (i = 2; i <= n; i++) {
      v = a[i]
      for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]
      a[j + 1] = v
    }
    if (n % 2) return a[(n + 1) / 2]
    return (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function fmt(x) {
    if (x == "") return "-"
    if (x == "n/a") return x
    return sprintf("%.1f", x)
  }
  {
    key = $1 SUBSEP $2 SUBSEP $3
    n = ++count[key]
    vals[key, 6, n] = $6
    vals[key, 7, n] = $7
    if ($2 == "ours") cores[$1] = $5
  }
  END {
    nc = split(configs, cfgs, " ")
    nb = split(benches, names, " ")
    no = split(others, impl, " ")
    for (c = 1; c <= nc; c++) {
      cfg = cfgs[c]
      title = (cfg == "all") ? "all cores" : "taskset -c 0"
      printf "### %s (%s cores seen by the benchmarks; medians of %s round(s) of %s s)\n\n", title, cores[cfg], rounds, secs
      head = "| benchmark | ours ns/op |"; rule = "|---|--:|"
      for (o = 1; o <= no; o++) {
        head = head " " impl[o] " ns/op | " impl[o] "/ours |"; rule = rule "--:|--:|"
      }
      head = head " ours ns-cpu/op |"; rule = rule "--:|"
      for (o = 1; o <= no; o++) { head = head " " impl[o] " ns-cpu/op |"; rule = rule "--:|" }
      print head
      print rule
      for (b = 1; b <= nb; b++) {
        name = names[b]
        ko = cfg SUBSEP "ours" SUBSEP name
        ours_ns = median(ko, 6)
        label = (count[cfg SUBSEP "peer" SUBSEP name] == 0) ? name " (ours, baseline)" : name
        row = "| " label " | " fmt(ours_ns) " |"
        cpus = " " fmt(median(ko, 7)) " |"
        for (o = 1; o <= no; o++) {
          k = cfg SUBSEP impl[o] SUBSEP name
          their = median(k, 6)
          ratio = "-"
          if (ours_ns != "" && their != "" && ours_ns > 0) ratio = sprintf("%.2f", their / ours_ns)
          row = row " " fmt(their) " | " ratio " |"
          cpus = cpus " " fmt(median(k, 7)) " |"
        }
        print row cpus
      }
      print ""
    }
    print "X/ours > 1: ours is faster. ns-cpu/op: the whole process'"'"'s user + sys time (getrusage) over the timed interval, per op."
    if (others ~ /split/) print "split: the peer with its server on a runtime of its own (--server-runtime own), nearer to a server in a process of its own."
    if (others ~ /go/) print "go: the Go library lithdew/monte, its own six benchmarks (GO_MONTE); its CPU per op over a fixed iteration count."
  }
' "$results"
if [ -s "$notes" ]; then
  echo
  echo "The baselines' variants, per round (the limit rows take the better):"
  echo
  sed 's/^/    /' "$notes"
fi
echo "raw results: $results (stderr of the runs: $log)"
