"""Tiny random Qwen2 / Llama models with a real byte-level BPE tokenizer, as HF folders and GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. A model serves tokens to the people who ask.",
    "Hello, world! How are you today? I am fine, thank you. The weather is sunny and warm.",
    "Once upon a time there was a small language model that wanted to learn to talk.",
    "It read books, it read the news, and it answered questions about the world.",
    "你好，世界！今天天气很好。我们一起学习语言模型。这是一个小小的测试。",
    "人工智能正在改变世界。模型可以回答问题，也可以写诗。",
    "Emoji are fun: 😀 😃 😄 😁 🚀 🌍 ❤️ 👍 🎉 and they are made of several bytes.",
    "Numbers like 12345 and 2024, symbols like @#$%^&*() and code like def f(x): return x + 1.",
]

ARCHS = ("qwen2", "llama")


def make_tokenizer() -> HFTokenizer:
    """A byte-level BPE trained on a few lines of English, Chinese and emoji (vocab ~400)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    return tok


def _hf_config(arch: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 50000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,  # <|endoftext|>
        "eos_token_id": 2,  # <|im_end|>
    }
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=False, attention_bias=False, **common)
    raise ValueError(f"unknown arch {arch!r}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (biases and norms too), so every mapping is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.08 * noise)


def make_tiny_hf(dir: Path, arch: str) -> Path:
    """Save a tiny random `{Qwen2,Llama}ForCausalLM` with tokenizer to `dir`; return `dir`."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    backend = make_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    config = _hf_config(arch, len(hf_tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=1 if arch == "qwen2" else 2)
    model.eval()
    model.save_pretrained(dir, safe_serialization=True)
    hf_tok.save_pretrained(dir)
    # Two end-of-turn ids, as real Qwen2 instruct models ship.
    gen_cfg = {"eos_token_id": [2, 0], "bos_token_id": 0}
    (dir / "generation_config.json").write_text(json.dumps(gen_cfg))
    return dir


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (q/k rows for its rotary layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_HF_TO_GGUF[module]}.{parts[-1]}"


def gguf_source_dir(gguf_path: Path) -> Path:
    """The Hugging Face folder `make_tiny_gguf` converted into `gguf_path`."""
    return gguf_path.with_name(gguf_path.stem + "-source")


def make_tiny_gguf(
    dir: Path, arch: str, quant: str | None = None, mixed: dict[str, str] | None = None
) -> Path:
    """Write a tiny model as `dir/tiny-{arch}.gguf` (F32, or `quant`: "Q8_0", "Q4_0", "Q4_1" for 2-D weights).

    mixed: per GGUF tensor kind (`attn_v`, `ffn_down`, ...), another type for its 2-D
    weights, as llama.cpp's mixed files store some tensors with more bits.
    The transformers model it came from is saved next to it (see `gguf_source_dir`).
    """
    import gguf
    from transformers import AutoConfig
    from transformers import PreTrainedTokenizerFast as Fast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    mix = "".join(f"-{kind}-{q.lower()}" for kind, q in sorted((mixed or {}).items()))
    path = dir / f"tiny-{arch}{'-' + quant.lower() if quant else ''}{mix}.gguf"
    source = make_tiny_hf(gguf_source_dir(path), arch)
    cfg = AutoConfig.from_pretrained(source)
    hf_tok = Fast.from_pretrained(source)
    from safetensors.torch import load_file

    state = load_file(str(source / "model.safetensors"))

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if quant is None else gguf.LlamaFileType[f"MOSTLY_{quant}"]
    )

    backend = json.loads(hf_tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    for added in backend["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == cfg.vocab_size
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, tensor in state.items():
        data = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = _permute(data, heads, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = _permute(data, heads, kv_heads)
        name = _gguf_name(hf_name)
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        if quant is not None and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType[(mixed or {}).get(kind, quant)]
            packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
