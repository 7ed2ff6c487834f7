#!/usr/bin/env bash
# Local MLflow tracking + registry server on 127.0.0.1 (sqlite backend, one worker, job execution off).
#
#   infra/local/mlflow.sh start [--port 5000] [--artifacts s3://bucket/prefix]   start, or attach to the running copy
#   infra/local/mlflow.sh stop                                                   stop the copy this state dir started
#   infra/local/mlflow.sh status                                                 exit 0 when running, 3 when not
#   eval "$(infra/local/mlflow.sh env)"                                          export MLFLOW_TRACKING_URI
#
# Artifacts: proxied by the server into --artifacts (S3 keys and endpoint from the AWS_* environment, e.g. after
# `eval "$(infra/local/s3.sh env)"`), else into the state dir. Settings (env): ANOMALYMOE_LOCAL_STACK (state root,
# default <repo>/.local-stack; MLflow keeps db/log/pid in its mlflow/ subfolder), ANOMALYMOE_MLFLOW_PORT (5000),
# ANOMALYMOE_MLFLOW_ARTIFACTS. One implementation: this wraps anomalymoe/platform/cluster/local/mlflow.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run_local anomalymoe.platform.cluster.local.mlflow "$@"
