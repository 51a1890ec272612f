"""GPU benchmark with random weights in the shapes of Qwen2-0.5B and Qwen2-7B.

Measures (1) decode ms/step at batch 1 against the memory-bandwidth floor (every weight but
the embedding table read once per step) and (2) offline throughput on nano-vllm's workload:
256 requests with random input and output lengths in [100, 1024], ignore EOS.
Text is not detokenized (random weights have no tokenizer): the figures are the engine's.

    python benchmarks/bench_gpu.py [--shapes 0.5b,7b] [--requests 256]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json
from inferhub.config import EngineConfig
from inferhub.engine.llm_engine import LLMEngine
from inferhub.engine.sampling_params import SamplingParams
from inferhub.layers.rotary import RotaryEmbedding
from inferhub.models.config import ModelConfig
from inferhub.models.loader import LoadedModel
from inferhub.models.qwen2 import Qwen2ForCausalLM

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


class NullTokenizer:
    """Stands in for a tokenizer: random weights have none."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids: set[int] = set()
        self.bos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def build(shape: str, device: torch.device) -> LoadedModel:
    s: dict[str, Any] = SHAPES[shape]
    cfg = ModelConfig(
        architecture="qwen2",
        vocab_size=151936,
        head_dim=s["hidden_size"] // s["num_attention_heads"],
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        **s,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype=torch.bfloat16)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.rotary = RotaryEmbedding(cfg.head_dim, 4096, cfg.rope_theta).to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model, config=cfg, tokenizer=NullTokenizer(cfg.vocab_size), source=shape
    )  # type: ignore[arg-type]


def weight_bytes(model: Qwen2ForCausalLM) -> int:
    """Bytes a decode step must read: every parameter except the embedding table (one row)."""
    total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def device_bandwidth(device: torch.device) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * reps / (time.perf_counter() - t0)


def decode_ms(engine: LLMEngine, steps: int) -> float:
    rng = random.Random(0)
    prompt = [rng.randrange(100, 150000) for _ in range(128)]
    engine.add_request(
        "decode", prompt, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    )
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def add_workload(engine: LLMEngine, n: int, lo: int, hi: int) -> int:
    """nano-vllm's workload: n requests with random prompt and output lengths in [lo, hi]
    (seed 0), EOS ignored. Returns the output tokens they will generate."""
    rng = random.Random(0)
    total_out = 0
    for i in range(n):
        plen, olen = rng.randint(lo, hi), rng.randint(lo, hi)
        prompt = [rng.randrange(100, 150000) for _ in range(plen)]
        engine.add_request(
            f"t{i}", prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True)
        )
        total_out += olen
    return total_out


def throughput(engine: LLMEngine, n: int, lo: int, hi: int) -> dict[str, float]:
    total_out = add_workload(engine, n, lo, hi)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - t0
    return {"output_tok_s": total_out / elapsed, "elapsed_s": elapsed, "output_tokens": total_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--throughput-shapes", default="0.5b,7b")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--batched-tokens", type=int, default=16384)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run of the script")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        bw = device_bandwidth(device)
        print(f"device {torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s")
    else:
        bw = 20e9
    rows = []
    for shape in args.shapes.split(","):
        loaded = build(shape, device)
        wbytes = weight_bytes(loaded.model)
        cfg = EngineConfig(
            model=shape,
            dtype="bfloat16",
            device=args.device,
            attention_backend="triton" if device.type == "cuda" else "sdpa",
            max_num_seqs=args.requests,
            max_num_batched_tokens=args.batched_tokens,
            max_model_len=4096,
            kv_cache_fraction=0.6,
            cuda_graphs=not args.no_cuda_graphs,
            show_progress=False,
        )
        t0 = time.perf_counter()
        engine = LLMEngine(cfg, loaded)
        setup_s = time.perf_counter() - t0
        ms = decode_ms(engine, args.decode_steps)
        row: dict[str, Any] = {
            "shape": shape,
            "weights_GB": wbytes / 1e9,
            "decode_ms_b1": ms,
            "floor_ms_measured_bw": wbytes / bw * 1000,
            "floor_ms_3.35TBs": wbytes / 3.35e12 * 1000,
            "frac_of_floor": (wbytes / bw * 1000) / ms,
            "setup_s": setup_s,
            "kv_blocks": engine.block_manager.num_blocks,
        }
        if shape in args.throughput_shapes.split(","):
            row.update(throughput(engine, args.requests, args.min_len, args.max_len))
        rows.append(row)
        print_table([row], list(row))
        del engine, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(
        rows,
        sorted(
            {k for r in rows for k in r},
            key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99,
        ),
    )
    path = write_json("bench_gpu", {"args": vars(args), "bandwidth_Bps": bw, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
