#!/usr/bin/env bash
# The MLflow-facing tests at the oldest MLflow the project supports (the lower bound of mlflow
# in pyproject.toml), in a virtual environment of their own; tests/run.sh calls it after the
# whole suite. The tests start their own `mlflow server` from that environment, so the server
# is that version too. Of the tracking-fault tests it runs the one that depends on MLflow's
# client (how its errors are told apart from an outage); the others time the outbox against a
# server process that stops, the same at any MLflow version, and took 340 of the step's 790 s
# (measured beside a CPU benchmark), which CI's 30 minutes could not spare.
#
#   bash tests/run_oldest_mlflow.sh                       # venv .venv-mlflow-<version>
#   VENV=.ci-venv MLFLOW_VERSION=3.15.2 bash tests/run_oldest_mlflow.sh   # another MLflow
set -euo pipefail
cd "$(dirname "$0")/.."

version="${MLFLOW_VERSION:-$(grep -o '"mlflow>=[0-9.]*' pyproject.toml | cut -d= -f2)}"
venv="${VENV:-.venv}-mlflow-$version"
started=$SECONDS
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]" "mlflow==$version"
echo "MLflow $version: environment ready in $((SECONDS - started)) s" >&2
status=0
python -m pytest -q tests/test_mlflow.py tests/test_genai.py tests/test_mlflow_methods.py \
  tests/test_tracking_faults.py::test_an_error_that_is_no_outage_is_reported_once_and_the_rest_of_the_record_goes_out \
  "$@" || status=$?
echo "MLflow $version: $((SECONDS - started)) s in all" >&2
exit $status
