"""Profile batch-1 decode steps on CUDA (random 0.5B weights): where the step time goes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu import build
from inferhub.config import EngineConfig
from inferhub.engine.llm_engine import LLMEngine
from inferhub.engine.sampling_params import SamplingParams

shape = sys.argv[1] if len(sys.argv) > 1 else "0.5b"
loaded = build(shape, torch.device("cuda"))
eng = LLMEngine(
    EngineConfig(
        model=shape,
        dtype="bfloat16",
        device="cuda",
        attention_backend="triton",
        max_num_seqs=8,
        max_model_len=4096,
        kv_cache_fraction=0.3,
        show_progress=False,
    ),
    loaded,
)
print("graphs:", eng.runner.graphs is not None and sorted(eng.runner.graphs.graphs))
eng.add_request(
    "p", list(range(100, 228)), SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
)
for _ in range(5):
    eng.step()
t0 = time.perf_counter()
for _ in range(50):
    eng.step()
print(f"step ms (wall): {(time.perf_counter() - t0) / 50 * 1000:.3f}")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        eng.step()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
