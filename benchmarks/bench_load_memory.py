"""Memory and time of loading a Q4_0 (or Q8_0) GGUF model in float32, by how the 4-bit blocks are kept.
Peak and final resident sizes include the file's pages mapped while it is read.

Writes a GGUF file with random weights in the shapes of a real model (Qwen2-0.5B by default,
`--shape qwen2-1.5b` / `qwen2-7b` for the larger ones; the embedded default's tokenizer, so
the vocabulary is 49152), Q4_0 projections (`--qtype Q8_0`: Q8_0 ones) and a tied Q8_0
embedding, as llama.cpp writes such a file. Then each mode loads it in a fresh process and reports the load time, the peak
and the final resident memory, and the logits of one prompt (compared across modes):

- lean (`int4_max_rows` = every call: the default on AVX2 without AVX-512): the
  projections are packed for the exact kernel as they are read and never dequantized;
- dense+kernel (`int4_max_rows=256`, how session 10 loaded): dense float32 weights for the
  large calls, the file's blocks packed for the small ones;
- dense (`int4_max_rows=0`): every weight dequantized to float32, torch's products.

A mode that runs out of memory shows the error its process died with.
Prints a table and writes benchmarks/results/bench_load_memory.json.

    python benchmarks/bench_load_memory.py [--shape qwen2-0.5b] [--modes lean,dense+kernel,dense]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json
from inferhub.layers.quant_linear import ALL_ROWS
from inferhub.models.default import default_model_path

# hidden, intermediate, layers, heads, kv heads (the real models' config.json)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "qwen2-0.5b": (896, 4864, 24, 14, 2),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2),
    "qwen2-7b": (3584, 18944, 28, 28, 4),
}
MODES: dict[str, dict[str, Any]] = {
    "lean": {"int4_max_rows": ALL_ROWS},
    "dense+kernel": {"int4_max_rows": 256},
    "dense": {"int4_max_rows": 0},
}
PROMPT = "The quick brown fox jumps over the lazy dog."


def random_blocks(rng: np.random.Generator, n: int, k: int, qtype: str) -> np.ndarray:
    """(n, bytes per row) raw GGUF blocks: a float16 scale then the quants, per 32 weights."""
    groups = k // 32
    d = (rng.random((n, groups), dtype=np.float32) * 0.004 + 0.001).astype(np.float16)
    if qtype == "Q4_0":
        qs = rng.integers(0, 256, (n, groups, 16), dtype=np.uint8)
    else:  # Q8_0
        qs = rng.integers(-127, 128, (n, groups, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(n, groups, 2), qs], axis=-1).reshape(n, -1)


def write_model(path: Path, shape: str, seed: int, qtype: str = "Q4_0") -> None:
    import gguf

    hidden, inter, layers, heads, kv_heads = SHAPES[shape]
    head_dim = hidden // heads
    src = gguf.GGUFReader(str(default_model_path()))

    def field(name: str) -> Any:
        f = src.fields[name]
        if len(f.types) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tolist()[0] if f.types[-1] != gguf.GGUFValueType.STRING
                    else bytes(f.parts[i]).decode() for i in f.data]  # fmt: skip
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else part[0]

    tokens = field("tokenizer.ggml.tokens")
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(f"random-{shape}")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(int(field("tokenizer.ggml.bos_token_id")))
    writer.add_eos_token_id(int(field("tokenizer.ggml.eos_token_id")))
    writer.add_chat_template(field("tokenizer.chat_template"))
    rng = np.random.default_rng(seed)
    q4, q8 = gguf.GGMLQuantizationType[qtype], gguf.GGMLQuantizationType.Q8_0

    def add(name: str, n: int, k: int, qtype: Any) -> None:
        raw = random_blocks(rng, n, k, qtype.name)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    add("token_embd.weight", len(tokens), hidden, q8)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        b = f"blk.{i}"
        writer.add_tensor(f"{b}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"{b}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for part, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            add(f"{b}.attn_{part}.weight", rows * head_dim, hidden, q4)
            bias = (rng.standard_normal(rows * head_dim) * 0.02).astype(np.float32)
            writer.add_tensor(f"{b}.attn_{part}.bias", bias)
        add(f"{b}.attn_output.weight", hidden, heads * head_dim, q4)
        add(f"{b}.ffn_gate.weight", inter, hidden, q4)
        add(f"{b}.ffn_up.weight", inter, hidden, q4)
        add(f"{b}.ffn_down.weight", hidden, inter, q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CHILD = """
import json, resource, sys, time, numpy as np, torch
from inferhub.layers.attention import AttentionGroup, AttentionMetadata
from inferhub.models.loader import load_model
path, kw, prompt, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
t = time.perf_counter()
lm = load_model(path, dtype=torch.float32, device=torch.device("cpu"), show_progress=False, **kw)
took = time.perf_counter() - t
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# one prefill of the prompt over a flat cache (slot i = position i): the last logits
cfg, ids = lm.config, lm.tokenizer.encode(prompt)
n = len(ids)
caches = [(torch.zeros(n, cfg.num_key_value_heads, cfg.head_dim), torch.zeros(n, cfg.num_key_value_heads, cfg.head_dim)) for _ in range(cfg.num_hidden_layers)]
ar = torch.arange(n)
group = AttentionGroup(q_index=ar[None], q_valid=torch.ones(1, n, dtype=torch.bool), blocks=ar[None],
                       mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None], all_valid=True)
meta = AttentionMetadata(slot_mapping=ar, num_decode_tokens=0, decode=None, prefill=group, block_size=1)
with torch.inference_mode():
    logits = lm.model.compute_logits(lm.model(torch.tensor(ids), ar, caches, meta)[-1:])
np.save(out, logits.float().numpy())
print(json.dumps({"load_s": took, "rss": rss, "peak": peak, "released": lm.released_bytes,
                  "exact": sum(1 for m in lm.model.layers.modules() if getattr(m, "exact", False))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qtype", choices=["Q4_0", "Q8_0"], default="Q4_0", help="projections'")
    ap.add_argument("--dir", default=None, help="where the file goes (default: a temp dir)")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / f"random-{args.shape}-{args.qtype.lower()}.gguf"
        t = time.perf_counter()
        write_model(path, args.shape, args.seed, args.qtype)
        print(
            f"wrote {path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s"
        )
        first: np.ndarray | None = None
        for mode in args.modes.split(","):
            logits = Path(tmp) / f"{mode}.npy"
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), json.dumps(MODES[mode]), PROMPT,
                 str(logits)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                rows.append({"mode": mode, "error": lines[-1]})
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            last = np.load(logits)
            first = last if first is None else first
            rows.append(
                {"mode": mode, "load_s": got["load_s"], "peak_MB": got["peak"] / 1e6,
                 "rss_MB": got["rss"] / 1e6, "released_MB": got["released"] / 1e6,
                 "exact_projections": got["exact"],
                 "max_logit_diff": f"{float(np.abs(last - first).max()):.1e}",
                 "same_argmax": bool(last.argmax() == first.argmax())}
            )  # fmt: skip
        size = path.stat().st_size
    columns = ["mode", "load_s", "peak_MB", "rss_MB", "released_MB", "exact_projections"]
    columns.append("max_logit_diff")
    print_table(rows, [*columns, "same_argmax", "error"])
    out = write_json(
        "bench_load_memory",
        {
            "shape": args.shape,
            "qtype": args.qtype,
            "file_bytes": size,
            "machine": machine(),
            "rows": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
