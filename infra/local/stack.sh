#!/usr/bin/env bash
# The whole local stack: SeaweedFS S3 (buckets anomalymoe, mlflow), MLflow server (sqlite, artifacts proxied into
# s3://mlflow/artifacts, one worker, job execution off) and a Ray head (auth disabled), all on 127.0.0.1.
#
#   infra/local/stack.sh start [--num-cpus N]   start what is not running, attach to what is; waits for health
#   infra/local/stack.sh stop                   stop exactly what this state root started (Ray, MLflow, S3)
#   infra/local/stack.sh status                 exit 0 when all three run, 3 otherwise
#   eval "$(infra/local/stack.sh env)"          export AWS_*, MLFLOW_TRACKING_URI, RAY_ADDRESS, RAY_AUTH_MODE
#
# Logs, pid files and data: $ANOMALYMOE_LOCAL_STACK (default <repo>/.local-stack)/{s3,mlflow,ray}/. Ports:
# ANOMALYMOE_S3_PORT (8333), ANOMALYMOE_MLFLOW_PORT (5000), ANOMALYMOE_RAY_PORT (6379). The single servers also
# have their own scripts (s3.sh, mlflow.sh, ray.sh); all wrap anomalymoe/platform/cluster/local/*.py, as the tests do.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_local anomalymoe.platform.cluster.local.stack "$@"
