#!/usr/bin/env bash
# The GPU harness's CPU path under the H200 machine's Python packages (/work/shared/GPU.md),
# before a device lease is spent on an API break. Builds a venv from a Python >= 3.12 (the
# device's jax 0.11 has no wheel for 3.11), pins what the device has, leaves out what it lacks
# (tyro, tensorboardX, openai, gymnax, rejax, trl, pyzmq, gymnasium), and runs the checks
# against this checkout on PYTHONPATH (the device has no editable install).
#
#   benchmarks/device_mirror.sh /root/.pyenv/versions/3.12.1/bin/python3.12 [VENV_DIR]
#
# Re-running reuses VENV_DIR. About 15 minutes of CPU on a 2-core box, install excluded.
set -euo pipefail

PY312=${1:?usage: $0 PYTHON>=3.12 [VENV_DIR]}
VENV=${2:-/tmp/mirror312}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

"$PY312" -c 'import sys; assert sys.version_info >= (3, 12), sys.version' ||
    { echo "$PY312 is not Python >= 3.12 (jax 0.11 needs it)"; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # torch 2.11.0 from PyPI is the CUDA 13 build (as on the device); it runs on CPU too
    "$VENV/bin/pip" install -q jax==0.11.2 jaxlib==0.11.2 flax==0.12.10 optax==0.2.8 \
        transformers==5.17.0 tokenizers==0.23.2 peft==0.21.0 torch==2.11.0 \
        orbax-checkpoint chex numpy safetensors jinja2 pytest
fi
PY="$VENV/bin/python"
for absent in tyro tensorboardX openai gymnax rejax trl zmq gymnasium; do
    if "$PY" -c "import $absent" 2>/dev/null; then
        echo "$absent is installed in $VENV but absent on the device: use a fresh VENV_DIR"
        exit 2
    fi
done

cd "$ROOT"
export PYTHONPATH=$ROOT JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
set -x
"$PY" -c 'import jax, flax, transformers, torch; print(jax.__version__, flax.__version__,
transformers.__version__, torch.__version__)'
"$PY" benchmarks/gpu_all.py --list
"$PY" benchmarks/gpu_all.py --dry-run
"$PY" benchmarks/gpu_all.py --dry-run --extra=--scan-decode
# the device command itself, each job with --tiny (its own processes, the mirror interpreter)
OUT_DIR=$(mktemp -d)
"$PY" benchmarks/gpu_all.py --tiny --budget-s 900 --out-dir "$OUT_DIR/jobs" \
    --bundle "$OUT_DIR/gpu_all.json" --log "$OUT_DIR/gpu_all.log"
"$PY" -c "import json, sys; s = json.load(open('$OUT_DIR/gpu_all.json'))['summary'];
print(s); sys.exit(set(s) != {'ok'})"
# the tests the GPU scripts rest on; the tests that write TensorBoard need tensorboardX
"$PY" -m pytest -q -p no:cacheprovider -W default tests/test_gpu_benchmarks.py tests/models \
    tests/test_sampling*.py tests/train \
    --deselect tests/train/test_kto_trainer.py::test_apo_zero_unpaired_trains_without_kl_rows \
    --ignore tests/train/test_kto_logging.py
