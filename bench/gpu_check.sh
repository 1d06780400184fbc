#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one H100/H200, no network, ~10 minutes, one JSON line.
#
#   bench/gpu_check.sh [--data DIR] [--out DIR] [--budget-s 540] [--cpu-dry-run]
#
# On a bare GPU machine (the image's python3 with its own CUDA torch), the packages it lacks are
# installed first from the wheel folder $HICELLER_WHEELS (default .gpu/wheels, made by
# bench/gpu_prepare.sh) into a temporary target, with no index. $PYTHON picks the interpreter
# (default: python3). See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${HICELLER_WHEELS:-.gpu/wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/hiceller-gpu-site.XXXXXX")
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_check.py "$@"
