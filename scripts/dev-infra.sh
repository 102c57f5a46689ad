#!/usr/bin/env bash
# Start/stop a REAL single-node Kafka broker (KRaft) and a REAL Redis on 127.0.0.1 for tests
# and CI, so integration tests exercise the real protocols instead of in-process fakes.
#
#   scripts/dev-infra.sh up              install what is missing, start both, wait until ready
#   scripts/dev-infra.sh down [--wipe]   stop both (keep data unless --wipe)
#   scripts/dev-infra.sh status          say whether each is up
#   scripts/dev-infra.sh restart-kafka   restart only the broker, keeping its data
#
# Env: KAFKA_PORT (9093), KAFKA_CONTROLLER_PORT (9094), REDIS_PORT (6390),
#      MASKPROP_INFRA_DIR (state: <repo>/.cache/dev-infra), MASKPROP_CACHE (jars: ~/.cache/maskprop),
#      DEV_INFRA_TIMEOUT (seconds to wait for readiness, 90),
#      KAFKA_MAX_MESSAGE_BYTES (every topic's max.message.bytes, 1048576: set on the broker as the
#      default and on maskprop's topics explicitly; producers cut their events below it).
# After `up`, `source .cache/dev-infra/env` exports KAFKA_BOOTSTRAP, REDIS_URL and
# MASKPROP_KAFKA_MAX_MESSAGE_BYTES (the services' bound must match the topics').
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

KAFKA_VERSION=4.4.0
SCALA_VERSION=2.13
KAFKA_PORT="${KAFKA_PORT:-9093}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9094}"
REDIS_PORT="${REDIS_PORT:-6390}"
KAFKA_MAX_MESSAGE_BYTES="${KAFKA_MAX_MESSAGE_BYTES:-1048576}"
[[ "$KAFKA_MAX_MESSAGE_BYTES" =~ ^[0-9]+$ ]] || { echo "KAFKA_MAX_MESSAGE_BYTES must be a number" >&2; exit 2; }
# The topics maskprop_runtime.topics names (namespaced test topics get the broker default).
TOPICS=(maskprop.images maskprop.masks maskprop.trees maskprop.labels maskprop.deadletter)
TIMEOUT="${DEV_INFRA_TIMEOUT:-90}"
HOST=127.0.0.1

state="${MASKPROP_INFRA_DIR:-$root/.cache/dev-infra}"
# Jars live outside the repo so every checkout, rerun and later session reuses one download.
kafka_home="${MASKPROP_CACHE:-$HOME/.cache/maskprop}/kafka-$KAFKA_VERSION"
kafka_libs="$kafka_home/libs"

redis_dir="$state/redis"
redis_pid="$redis_dir/redis.pid"
redis_log="$redis_dir/redis.log"
kafka_dir="$state/kafka"
kafka_data="$kafka_dir/data"
kafka_cfg="$kafka_dir/server.properties"
kafka_pid="$kafka_dir/kafka.pid"
kafka_log="$kafka_dir/kafka.log"
env_file="$state/env"

log() { printf '[dev-infra] %s\n' "$*" >&2; }
die() { printf '[dev-infra] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the last lines of a server log, so a failed start explains itself in CI output.
log_tail() {
  if [[ -f "$1" ]]; then
    printf -- '----- last 40 lines of %s -----\n' "$1" >&2
    tail -n 40 "$1" >&2
    printf -- '-----\n' >&2
  fi
}

# True if something accepts TCP connections on 127.0.0.1:$1 (bash /dev/tcp: no extra tools).
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# A zombie still answers kill -0, so also look at its /proc state.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

# Echo the pid stored in $1 if that process is alive and its command line contains $2
# (guards against a stale pid file whose pid was reused by an unrelated process).
live_pid() {
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [[ -n "$pid" ]] || return 1
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  echo "$pid"
}

# SIGTERM, wait up to $3 s, then SIGKILL. Idempotent: a missing/stale pid file is fine.
stop_pid() {
  local pidfile="$1" match="$2" grace="$3" name="$4" pid i
  if ! pid="$(live_pid "$pidfile" "$match")"; then
    rm -f "$pidfile"
    log "$name: not running"
    return 0
  fi
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do
    alive "$pid" || break
    sleep 0.2
  done
  if alive "$pid"; then
    log "$name: still alive after ${grace}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while alive "$pid"; do sleep 0.1; done
  fi
  rm -f "$pidfile"
  log "$name: stopped"
}

# ---------------------------------------------------------------- Redis

ensure_redis_installed() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  command -v apt-get >/dev/null || die "redis-server is not on PATH and apt-get is unavailable"
  log "installing redis-server with apt-get"
  local sudo=()
  [[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server >/dev/null
}

redis_ready() { [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

start_redis() {
  ensure_redis_installed
  if live_pid "$redis_pid" redis-server >/dev/null; then
    log "redis: already running"
    # redis-server's process title is "redis-server HOST:PORT"; a port change needs a restart.
    live_pid "$redis_pid" "redis-server $HOST:$REDIS_PORT" >/dev/null \
      || die "redis is already running on another port; run 'down' first to change REDIS_PORT"
  else
    port_open "$REDIS_PORT" && die "port $REDIS_PORT is taken by another process (set REDIS_PORT)"
    mkdir -p "$redis_dir"
    # AOF with fsync every second: data survives a kill -9, no RDB snapshots (NOTES.md).
    # AOF rewrites wait for 1 GB of log (deploy/k8s/base/redis.yaml says why).
    redis-server --bind "$HOST" --port "$REDIS_PORT" --dir "$redis_dir" \
      --appendonly yes --appendfsync everysec --save '' --auto-aof-rewrite-min-size 1gb \
      --daemonize yes --pidfile "$redis_pid" --logfile "$redis_log" \
      || { log_tail "$redis_log"; die "redis-server failed to start"; }
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until redis_ready; do
    if ((SECONDS >= deadline)); then
      log_tail "$redis_log"
      die "redis did not answer PING on $HOST:$REDIS_PORT within ${TIMEOUT}s"
    fi
    sleep 0.2
  done
  log "redis: ready on $HOST:$REDIS_PORT"
}

# ---------------------------------------------------------------- Kafka

# Fetch kafka_2.13 (the broker) plus kafka-tools (storage format / readiness / console clients)
# and their runtime dependencies once, with Maven, into $kafka_libs. A marker file makes a
# half-finished download retry instead of being trusted.
ensure_kafka_jars() {
  [[ -f "$kafka_home/.complete" ]] && return 0
  command -v mvn >/dev/null || die "mvn is not on PATH (needed once to fetch Kafka jars)"
  command -v java >/dev/null || die "java is not on PATH (Kafka $KAFKA_VERSION needs Java 17+)"
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $kafka_libs"
  mkdir -p "$kafka_home"
  local work="$kafka_home/fetch"
  rm -rf "$work" "$kafka_libs"
  mkdir -p "$work"
  # kafka-tools' own transitive deps are Connect/Jetty/Jersey (~40 jars) that the tools we
  # use do not need; the broker already brings clients, server-common and argparse4j.
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>maskprop</groupId><artifactId>dev-infra-kafka</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_$SCALA_VERSION</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
    <!-- The broker logs through slf4j 1.7; without a binding it would log nothing. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>2.25.5</version>
    </dependency>
  </dependencies>
</project>
EOF
  if ! (cd "$work" && mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1); then
    log_tail "$work/mvn.log"
    die "Maven could not fetch Kafka $KAFKA_VERSION"
  fi
  mv "$work/libs" "$kafka_libs"
  rm -rf "$work"
  touch "$kafka_home/.complete"
  log "Kafka jars: $(find "$kafka_libs" -name '*.jar' | wc -l) jars, $(du -sh "$kafka_libs" | cut -f1)"
}

# log4j2 configs: the broker logs INFO to stdout (redirected to $kafka_log), the tools only WARN
# to stderr so their output stays parseable.
write_log4j() {
  cat >"$kafka_dir/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = warn
EOF
  cat >"$kafka_dir/tools-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = ERR
EOF
}

# Run a Kafka CLI class with a small, quick-starting JVM (these are short-lived); a timeout
# so a wedged tool cannot hang `up`.
kafka_tool() {
  timeout 60 java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$kafka_dir/tools-log4j2.properties" \
    -cp "$kafka_libs/*" "$@"
}

write_kafka_config() {
  mkdir -p "$kafka_data"
  # Regenerated on every start so port overrides apply; the data dir is what persists.
  cat >"$kafka_cfg" <<EOF
# Generated by scripts/dev-infra.sh; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$kafka_data
num.partitions=3
auto.create.topics.enable=true
# Single node: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests should not wait 3 s for the first consumer group rebalance.
group.initial.rebalance.delay.ms=0
# Every topic's default max.message.bytes (auto-created and namespaced test topics included);
# maskprop's own topics also carry it explicitly (configure_topics).
message.max.bytes=$KAFKA_MAX_MESSAGE_BYTES
EOF
  write_log4j
}

# Format once: a formatted data dir (meta.properties) is the broker's identity; reformatting
# would discard topics, so later starts reuse it.
format_kafka_storage() {
  [[ -f "$kafka_data/meta.properties" ]] && return 0
  local id
  # A random 16-byte id, base64url without padding (Kafka's Uuid string form); Kafka's own
  # generator avoids a leading '-' because it looks like a CLI flag, so do the same.
  id=-
  while [[ "$id" == -* ]]; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
  done
  log "kafka: formatting storage (cluster id $id)"
  kafka_tool kafka.tools.StorageTool format --cluster-id "$id" --config "$kafka_cfg" \
    --standalone >"$kafka_dir/format.log" 2>&1 \
    || { log_tail "$kafka_dir/format.log"; die "kafka storage format failed"; }
}

# Ready = the broker answers an ApiVersions round trip that starts with a metadata request;
# checked in the JVM so the script needs no Python.
kafka_ready() {
  kafka_tool org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" >"$kafka_dir/ready.log" 2>&1
}

start_kafka() {
  ensure_kafka_jars
  local pid
  if pid="$(live_pid "$kafka_pid" kafka.Kafka)"; then
    log "kafka: already running (pid $pid)"
    # A running broker keeps the ports it started with; fail fast rather than poll the wrong one.
    grep -qxF "advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT" "$kafka_cfg" \
      || die "kafka is already running with $(grep '^advertised' "$kafka_cfg"); run 'down' first to change KAFKA_PORT"
    write_log4j
  else
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
      port_open "$p" && die "port $p is taken by another process (set KAFKA_PORT/KAFKA_CONTROLLER_PORT)"
    done
    write_kafka_config
    format_kafka_storage
    log "kafka: starting broker on $HOST:$KAFKA_PORT (log: $kafka_log)"
    rm -f "$kafka_pid" # a stale one (after kill -9) would satisfy the wait below
    # Appends, so a fault test can read earlier runs too.
    # setsid + nohup: the broker outlives the calling shell and its process group (CI steps,
    # test runners). The inner shell writes its own pid, then execs java, so the pid file
    # names the JVM itself.
    # shellcheck disable=SC2016  # $$/$1/$@ belong to the inner shell
    setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$kafka_pid" \
      java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$kafka_dir/log4j2.properties" \
      -cp "$kafka_libs/*" kafka.Kafka "$kafka_cfg" \
      </dev/null >>"$kafka_log" 2>&1 &
    for _ in $(seq 50); do [[ -s "$kafka_pid" ]] && break; sleep 0.1; done
  fi
  wait_kafka_ready
}

wait_kafka_ready() {
  local deadline=$((SECONDS + TIMEOUT))
  # Cheap TCP poll first: each JVM check costs a second of CPU on a small machine.
  while true; do
    live_pid "$kafka_pid" kafka.Kafka >/dev/null || {
      log_tail "$kafka_log"
      die "kafka broker exited during startup"
    }
    if port_open "$KAFKA_PORT" && kafka_ready; then break; fi
    if ((SECONDS >= deadline)); then
      log_tail "$kafka_log"
      log_tail "$kafka_dir/ready.log"
      die "kafka did not answer a metadata/ApiVersions request on $HOST:$KAFKA_PORT within ${TIMEOUT}s"
    fi
    sleep 0.5
  done
  log "kafka: ready on $HOST:$KAFKA_PORT"
}

# maskprop's topics with max.message.bytes set explicitly: created when missing, altered when
# they exist.  A marker in the broker's state dir skips the JVM round trips on later `up`s.
configure_topics() {
  local marker="$kafka_dir/topics.max-message-bytes" bs="$HOST:$KAFKA_PORT" existing t
  [[ "$(cat "$marker" 2>/dev/null)" == "$KAFKA_MAX_MESSAGE_BYTES" ]] && return 0
  existing="$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --list \
    2>"$kafka_dir/topics.log")" || { log_tail "$kafka_dir/topics.log"; die "kafka: listing topics failed"; }
  for t in "${TOPICS[@]}"; do
    if grep -qxF "$t" <<<"$existing"; then
      kafka_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$bs" --alter \
        --entity-type topics --entity-name "$t" \
        --add-config "max.message.bytes=$KAFKA_MAX_MESSAGE_BYTES" >>"$kafka_dir/topics.log" 2>&1
    else
      kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --create \
        --if-not-exists --topic "$t" --partitions 3 --replication-factor 1 \
        --config "max.message.bytes=$KAFKA_MAX_MESSAGE_BYTES" >>"$kafka_dir/topics.log" 2>&1
    fi || { log_tail "$kafka_dir/topics.log"; die "kafka: configuring topic $t failed"; }
  done
  echo "$KAFKA_MAX_MESSAGE_BYTES" >"$marker"
  log "kafka: topics carry max.message.bytes=$KAFKA_MAX_MESSAGE_BYTES"
}

stop_kafka() { stop_pid "$kafka_pid" kafka.Kafka 60 kafka; }
stop_redis() { stop_pid "$redis_pid" redis-server 30 redis; }

write_env() {
  mkdir -p "$state"
  local kb="$HOST:$KAFKA_PORT" ru="redis://$HOST:$REDIS_PORT/0"
  # MASKPROP_IT_*: the integration tier's servers (tests/integration/conftest.py), so a
  # sourced env runs those tests instead of skipping them.
  printf 'export KAFKA_BOOTSTRAP=%s\nexport REDIS_URL=%s\nexport MASKPROP_KAFKA_MAX_MESSAGE_BYTES=%s\n' \
    "$kb" "$ru" "$KAFKA_MAX_MESSAGE_BYTES" >"$env_file"
  printf 'export MASKPROP_IT_KAFKA=%s\nexport MASKPROP_IT_REDIS=%s\n' "$kb" "$ru" >>"$env_file"
  printf 'KAFKA_BOOTSTRAP=%s\nREDIS_URL=%s\n' "$kb" "$ru"
}

# ---------------------------------------------------------------- commands

cmd="${1:-}"
case "$cmd" in
  up)
    mkdir -p "$state"
    start_redis
    start_kafka
    configure_topics
    write_env
    log "env written to $env_file"
    ;;
  down)
    stop_kafka
    stop_redis
    if [[ "${2:-}" == --wipe ]]; then
      rm -rf "$redis_dir" "$kafka_dir" "$env_file"
      log "wiped data under $state"
    elif [[ -n "${2:-}" ]]; then
      die "unknown option for down: $2 (only --wipe)"
    fi
    ;;
  status)
    rc=0
    if pid="$(live_pid "$redis_pid" redis-server)" && redis_ready; then
      echo "redis: up (pid $pid) redis://$HOST:$REDIS_PORT/0"
    else
      echo "redis: down"
      rc=1
    fi
    if pid="$(live_pid "$kafka_pid" kafka.Kafka)" && port_open "$KAFKA_PORT"; then
      echo "kafka: up (pid $pid) $HOST:$KAFKA_PORT"
    else
      echo "kafka: down"
      rc=1
    fi
    exit "$rc"
    ;;
  restart-kafka)
    stop_kafka
    start_kafka
    configure_topics
    write_env
    ;;
  *)
    echo "usage: $0 {up|down [--wipe]|status|restart-kafka}" >&2
    exit 2
    ;;
esac
