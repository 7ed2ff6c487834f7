# Shared by infra/local/*.sh: run one anomalymoe.platform.cluster.local.* module with this checkout's .venv (or $PYTHON),
# the state root $ANOMALYMOE_LOCAL_STACK (default <repo>/.local-stack) and this checkout on PYTHONPATH.
# Usage (from a script in infra/local/):  source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"; run_local <module> "$@"
run_local() {
    local module=$1; shift
    local root py
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    py=${PYTHON:-$root/.venv/bin/python}
    [ -x "$py" ] || { echo "$(basename "$0"): $py not found: run infra/setup.sh first (or set PYTHON)" >&2; exit 1; }
    export ANOMALYMOE_LOCAL_STACK=${ANOMALYMOE_LOCAL_STACK:-$root/.local-stack}
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    exec "$py" -m "$module" "$@"
}
