#!/usr/bin/env bash
# `peernet serve` as a background service on a Ray head (cluster.yaml runs it):
#   peernet-serve.sh start|stop|restart|status
#   peernet-serve.sh report [--json]   (`peernet status` with the deployed settings)
#   peernet-serve.sh upgrade            (`peernet upgrade`: rolling restart onto the code now installed)
# It reads deploy/peernet.env (or $PEERNET_ENV_FILE), runs ~/peernet-venv's `peernet serve`
# (or $PEERNET_VENV's), logs to ~/peernet-serve.log and keeps its pid in ~/peernet-serve.pid.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
env_file="${PEERNET_ENV_FILE:-$here/peernet.env}"
venv="${PEERNET_VENV:-$HOME/peernet-venv}"
pid_file="$HOME/peernet-serve.pid"
log_file="$HOME/peernet-serve.log"

running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

stop() {
  if running; then
    pid="$(cat "$pid_file")"
    kill -TERM "$pid"  # peernet serve shuts Serve down and leaves Ray on SIGTERM
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$pid_file"
}

load_env() {
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
}

start() {
  if running; then echo "peernet serve is running (pid $(cat "$pid_file"))"; return 0; fi
  load_env
  export PEERNET_RAY_ADDRESS="${PEERNET_RAY_ADDRESS:-auto}"
  # Where cluster.yaml's `ray start` keeps its files: "auto" reads the head's address there.
  export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/peernet}" RAY_AUTH_MODE="${PEERNET_RAY_AUTH_MODE:-disabled}"
  nohup "$venv/bin/peernet" serve >>"$log_file" 2>&1 </dev/null &
  echo $! >"$pid_file"
  echo "peernet serve started (pid $!, log $log_file)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) if running; then echo "running (pid $(cat "$pid_file"))"; else echo "stopped"; exit 1; fi ;;
  report) shift; load_env; exec "$venv/bin/peernet" status "$@" ;;
  upgrade) shift; load_env; exec "$venv/bin/peernet" upgrade "$@" ;;
  *) echo "usage: $0 start|stop|restart|status|report [--json]|upgrade" >&2; exit 2 ;;
esac
