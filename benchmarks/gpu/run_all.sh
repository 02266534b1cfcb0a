#!/usr/bin/env bash
# Every GPU measurement of memstack in one run (< 8 minutes on one H200), one JSON record under
# reports/benchmarks/gpu/. `--smoke` runs it tiny on the CPU (Triton interpreted) to check it works.
# See benchmarks/gpu/run_all.py for what runs and what the record holds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu/run_all.py "$@"
