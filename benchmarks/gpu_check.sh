#!/usr/bin/env bash
# The one command for a GPU machine (issue 12). From the repository root:
#
#   benchmarks/gpu_check.sh OUTDIR            # build with CUDA (sm_90), GPU tests, kernel and model benchmarks
#   benchmarks/gpu_check.sh OUTDIR --dry-run  # the same stages on a CPU: tiny shapes, Triton interpreter
#
# Each stage runs under its own time cap; OUTDIR gets summary.md, kernels.json, models.json,
# determinism.json and logs/<stage>.log (8 files). See benchmarks/gpu_check.py for the details.
# PYTHON overrides the interpreter (default: python3). Exit status 0 when every stage passed.
set -euo pipefail
if [ "$#" -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUTDIR [--dry-run] [--stages build tests kernels models]" >&2
  exit 2
fi
OUT="$1"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # a relative OUTDIR names a folder of the caller's directory, not of the repository
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "gpu_check: $PY not found" >&2; exit 2; }
command -v timeout >/dev/null || { echo "gpu_check: coreutils timeout not found" >&2; exit 2; }
exec "$PY" benchmarks/gpu_check.py "$OUT" --python "$PY" "$@"
