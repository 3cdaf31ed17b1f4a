# Shared by bench/collector/run-*: build, a private Kafka broker, a quiet
# machine, the machine's facts. Sourced, not run.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
# shellcheck source=/dev/null
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then . "$HOME/.cargo/env"; fi

log() { echo "[bench] $*" >&2; }
die() {
  echo "[bench] ERROR: $*" >&2
  exit 1
}

# shellcheck disable=SC2034 # used by the run-* scripts
BENCH=$ROOT/target/release/tidemark-bench-collector

# The broker runs on its own ports and in its own directory, so that the
# test suite's broker (scripts/kafka's defaults, 127.0.0.1:19092) is neither
# restarted nor shared: `scripts/kafka start` restarts a running broker of
# the same directory with fresh storage.
export TIDEMARK_KAFKA_PORT=${BENCH_KAFKA_PORT:-29092}
export TIDEMARK_KAFKA_CONTROLLER_PORT=${BENCH_KAFKA_CONTROLLER_PORT:-29093}
export TIDEMARK_KAFKA_DIR=${BENCH_KAFKA_DIR:-/tmp/tidemark-bench-collector-kafka}
KAFKA_STARTED=""

build() {
  [[ -n "${BENCH_NO_BUILD:-}" ]] && return 0
  scripts/setup
  log "building tidemark, tidemark-collector, tidemark-sidecar and the benchmark (release)"
  cargo build --release --locked -q -p tidemark -p tidemark-collector -p tidemark-sidecar \
    -p tidemark-bench-collector
}

start_kafka() {
  scripts/kafka start
  KAFKA_STARTED=1
  eval "$(scripts/kafka env)"
  BROKER_PID=$(cat "$TIDEMARK_KAFKA_DIR/kafka.pid")
  KAFKA_VERSION=$(scripts/kafka perf-classpath | tr ':' '\n' | sed -n 's|.*/kafka_2\.13-\(.*\)\.jar$|\1|p' | head -n 1)
  log "Kafka $KAFKA_VERSION at $TIDEMARK_KAFKA_BROKERS (pid $BROKER_PID)"
}

stop_kafka() {
  if [[ -n "$KAFKA_STARTED" && -z "${BENCH_KEEP_KAFKA:-}" ]]; then
    scripts/kafka stop || true
  fi
}

busy_ticks() {
  local _cpu user nice system _idle _iowait irq softirq steal _rest
  read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}

# Waits (up to BENCH_QUIET_WAIT seconds, default 180) until the machine is
# nearly idle: a build or test running beside the benchmark shows in every
# number. Sets QUIET to what it saw.
wait_for_quiet() {
  local limit=${BENCH_QUIET_WAIT:-180} waited=0 b0 b1 used hz
  hz=$(getconf CLK_TCK)
  while :; do
    b0=$(busy_ticks)
    sleep 2
    b1=$(busy_ticks)
    used=$(awk -v a="$b0" -v b="$b1" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz / 2 }')
    if awk -v u="$used" 'BEGIN { exit !(u < 0.3) }'; then
      log "machine quiet: $used cores busy"
      QUIET="$used cores busy"
      return
    fi
    waited=$((waited + 2))
    if ((waited >= limit)); then
      log "WARNING: $used cores still busy after $limit s; measuring anyway"
      QUIET="$used cores busy (still, after waiting $limit s for quiet)"
      return
    fi
    ((waited % 10)) || log "$used cores busy; waiting for quiet (up to $limit s)"
  done
}

# The machine and the software, as markdown bullets.
facts() {
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes in the tree)')"
  echo "- cpu: $(nproc) cores (nproc), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  echo "- memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "- kernel: $(uname -sr)"
  echo "- $(rustc --version 2>/dev/null || echo 'rustc: unknown')"
  echo "- Kafka $KAFKA_VERSION, single KRaft node on 127.0.0.1 (scripts/kafka), $(java -version 2>&1 | head -n 1)"
  echo "- before the run: $QUIET; load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- everything the benchmark runs (its client, the binaries under test, the broker) shares these cores, over 127.0.0.1"
}
