#!/usr/bin/env bash
# Builds .gpu/ (ignored by git) for bench/gpu_check.sh on a bare GPU machine with no network:
#   .gpu/wheels  what its image lacks, for CPython 3.12 on x86-64: DeepSpeed (a pure-Python wheel
#                built here from its source archive; its ops are compiled on the GPU at first use)
#                and DeepSpeed's pure-Python needs (hjson, pydantic and its parts)
#   .gpu/data    real counts files to train and annotate on
# and prints the size: the device tool carries at most 64 MiB, the working tree included.
#
#   bench/gpu_prepare.sh [DATA_DIR]     (default ../shared/data; needs pip's index here)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${1:-../shared/data}
FILES=(baron_human_pancreas_came_counts.h5ad pbmc_zheng_sorted_mudan_counts.h5ad
       pbmcA_frozen_mudan_counts_unlabeled.h5ad pbmc3k_clustifyr_counts.h5ad)
for f in "${FILES[@]}"; do
    [ -f "$DATA/$f" ] || { echo "gpu_prepare: $DATA/$f not found (pass the shared data folder)" >&2; exit 2; }
done
mkdir -p .git/info
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/data
# The versions tested here, so the GPU runs what the CPU tests ran.
read -r -a PINS <<<"$("$PY" - <<'PYEOF'
import importlib.metadata as m
names = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PYEOF
)"
DS=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels "deepspeed==$DS"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "${PINS[@]}"
for f in "${FILES[@]}"; do cp "$DATA/$f" .gpu/data/; done
ls -l .gpu/wheels .gpu/data
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
gpu=$(du -sb .gpu | cut -f1)
echo "gpu_prepare: .gpu is $((gpu / 1048576)) MiB, tracked files $((tree / 1048576)) MiB (limit 64 MiB with untracked files)"
