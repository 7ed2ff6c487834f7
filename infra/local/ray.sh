#!/usr/bin/env bash
# Local Ray head on 127.0.0.1 (Ray 2.60 auth mode disabled, own temp dir, jobs run with this venv's python).
#
#   infra/local/ray.sh start [--port 6379] [--num-cpus N]   start, or attach to the running copy
#   infra/local/ray.sh stop                                  stop exactly the processes this state dir started
#   infra/local/ray.sh status                                exit 0 when running, 3 when not
#   eval "$(infra/local/ray.sh env)"                         export RAY_ADDRESS (job API) and RAY_AUTH_MODE
#
# Then: ray job submit --working-dir . -- python jobs/<job>.py ...  Never `ray stop` (it stops every Ray here).
# Settings (env): ANOMALYMOE_LOCAL_STACK (state root, default <repo>/.local-stack; Ray keeps log/pid in ray/),
# ANOMALYMOE_RAY_PORT (6379). One implementation: this wraps anomalymoe/platform/cluster/local/ray_head.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_local anomalymoe.platform.cluster.local.ray_head "$@"
