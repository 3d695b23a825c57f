#!/usr/bin/env bash
# Local Prefect stack for the cellm build flows: a SQLite Prefect server on 127.0.0.1, the
# deployments of infra/prefect.yaml, and one process worker.
#
#   infra/stack.sh up        start server (own PREFECT_HOME under the state dir), deploy all, start worker
#   infra/stack.sh env       print the exports that point the `prefect` CLI at this stack (eval it)
#   infra/stack.sh status    what is running (PIDs, API health, deployments)
#   infra/stack.sh down      stop worker (and any flow-run processes it started) and server, by PID
#
# Settings (environment): CELLM_STACK_DIR (state: PREFECT_HOME, logs, PID files; default
# ~/.local/state/cellm-stack), CELLM_PREFECT_PORT (default 4200), PREFECT_WORKER_QUERY_SECONDS
# (default 2: a triggered run starts within ~4 s).
#
# Each long-running process is started under `set -m`, so it is the leader of its own process group
# (a non-interactive shell's `cmd &` would ignore SIGINT and survive one SIGTERM); `down` signals the
# recorded process group, then every process that descended from it, TERM first and KILL after 10 s.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${CELLM_STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/cellm-stack}"
PORT="${CELLM_PREFECT_PORT:-4200}"
POOL="cellm-process"
PREFECT_FILE="$REPO/infra/prefect.yaml"

export PREFECT_HOME="$STATE/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-2}"
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_UI_API_URL="$PREFECT_API_URL"
export CELLM_REPO="$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

log() { echo "[stack +${SECONDS}s] $*" >&2; }

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

healthy() {
  "$PY" - "$PREFECT_API_URL/health" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

descendants() {  # every process below PID $1 (children first-level and deeper), from `ps`
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q in parent && q != 1 && q != 0) { q = parent[q]; if (q == root) { print p; break } } } }'
}

start_bg() {  # NAME CMD...: start CMD as the leader of its own process group, record its PID
  local name="$1"; shift
  set -m
  "$@" >>"$STATE/$name.log" 2>&1 </dev/null &
  local pid=$!
  set +m
  echo "$pid" >"$STATE/$name.pid"
  log "$name started: pid $pid (process group $pid), log $STATE/$name.log"
}

stop_pid() {  # NAME: TERM the recorded group and all descendants, KILL what is left after 10 s
  local name="$1" pid
  [[ -f "$STATE/$name.pid" ]] || return 0
  pid="$(cat "$STATE/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    local procs; procs="$(descendants "$pid" | tr '\n' ' ')"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for p in $procs; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
      local left=0
      kill -0 "$pid" 2>/dev/null && left=1
      for p in $procs; do kill -0 "$p" 2>/dev/null && left=1; done
      [[ $left == 0 ]] && break
      sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    for p in $pid $procs; do kill -KILL "$p" 2>/dev/null || true; done
    log "$name stopped (pid $pid${procs:+; descendants $procs})"
  fi
  rm -f "$STATE/$name.pid"
}

cmd_up() {
  mkdir -p "$STATE" "$PREFECT_HOME"
  if alive server && healthy; then
    log "server already up at $PREFECT_API_URL (pid $(cat "$STATE/server.pid"))"
  else
    stop_pid server
    start_bg server prefect server start --host 127.0.0.1 --port "$PORT" --no-ui
    for i in $(seq 1 120); do
      healthy && break
      alive server || { tail -n 40 "$STATE/server.log" >&2; log "server exited during start"; exit 1; }
      sleep 0.5
    done
    healthy || { tail -n 40 "$STATE/server.log" >&2; log "server not healthy after 60 s"; stop_pid server; exit 1; }
    log "server healthy at $PREFECT_API_URL"
  fi
  if prefect work-pool create "$POOL" --type process >>"$STATE/deploy.log" 2>&1; then
    log "work pool $POOL (process) created"
  fi  # else: it exists already (the worker would create it too)
  (cd "$REPO" && prefect --no-prompt deploy --all --prefect-file "$PREFECT_FILE") >>"$STATE/deploy.log" 2>&1 \
    || { tail -n 60 "$STATE/deploy.log" >&2; log "deploy failed"; exit 1; }
  log "deployed $PREFECT_FILE (log $STATE/deploy.log)"
  if alive worker; then
    log "worker already running (pid $(cat "$STATE/worker.pid"))"
  else
    start_bg worker prefect worker start --pool "$POOL" --type process --name "cellm-worker-$PORT"
    for i in $(seq 1 60); do
      grep -q "started" "$STATE/worker.log" 2>/dev/null && break
      alive worker || { tail -n 40 "$STATE/worker.log" >&2; log "worker exited during start"; exit 1; }
      sleep 0.5
    done
  fi
  log "stack up; point the CLI at it with: eval \"\$($REPO/infra/stack.sh env)\""
}

cmd_down() {
  stop_pid worker
  stop_pid server
  log "stack down"
}

cmd_status() {
  for n in server worker; do
    if alive "$n"; then echo "$n: running (pid $(cat "$STATE/$n.pid"))"; else echo "$n: stopped"; fi
  done
  if healthy; then echo "api: healthy at $PREFECT_API_URL"; prefect deployment ls 2>/dev/null || true
  else echo "api: not answering at $PREFECT_API_URL"; fi
}

cmd_env() {
  cat <<EOF
export PREFECT_HOME='$PREFECT_HOME'
export PREFECT_API_URL='$PREFECT_API_URL'
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export CELLM_REPO='$REPO'
EOF
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
