"""Tokenizer: text <-> token ids, token bytes, end-of-turn ids and the safe chat template."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

# Used when the model ships no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Special tokens that end a turn in the common chat formats (added to eos when present).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "</s>",
)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gguf_tokenizer_cache(path: str) -> Path | None:
    """The cache folder of a GGUF file's converted tokenizer, or None without a cache."""
    import transformers

    from inferhub.config import cache_dir

    root = cache_dir()
    if root is None:
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return root / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:32]


def _save_atomically(hf: Any, folder: Path) -> None:
    """Save to a temporary folder beside `folder`, then rename: readers never see half."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        hf.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first (or an old entry is in the way)
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # no cache (read-only home, full disk): only slower starts


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_types(node: Any) -> set[str]:
    """All decoder type names in a tokenizer.json `decoder` entry (Sequence flattened)."""
    if not isinstance(node, dict):
        return set()
    types = {str(node.get("type"))}
    for child in node.get("decoders") or []:
        types |= _decoder_types(child)
    return types


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer (`self.hf`) with what the engine and server need."""

    def __init__(self, hf: Any, extra_eos_ids: Iterable[int] = ()) -> None:
        backend = getattr(hf, "backend_tokenizer", None)
        if not isinstance(backend, BackendTokenizer):
            raise ValueError(
                f"{type(hf).__name__} is not a fast tokenizer; inferhub needs a `tokenizers` backend"
            )
        self.hf = hf
        # Prompts are never cut or padded behind our back (some tokenizer.json files set both).
        backend.no_truncation()
        backend.no_padding()
        self._backend: BackendTokenizer = backend
        # A copy that never parses special tokens: user content is always plain text.
        serialized = backend.to_str()
        self._plain = BackendTokenizer.from_str(serialized)
        self._plain.encode_special_tokens = True
        self.vocab_size: int = len(hf)
        self._added: dict[int, str] = {
            i: tok.content for i, tok in backend.get_added_tokens_decoder().items()
        }
        special_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        bos = hf.bos_token_id
        self.bos_token_id: int | None = int(bos) if bos is not None else None
        eos: set[int] = set()
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        for text in END_OF_TURN_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None and tid in special_ids:
                eos.add(tid)
        eos.update(int(i) for i in extra_eos_ids if 0 <= int(i) < self.vocab_size)
        self.eos_token_ids: set[int] = eos
        template = hf.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        decoders = _decoder_types(json.loads(serialized).get("decoder"))
        self._byte_level = "ByteLevel" in decoders
        self._byte_decoder = _gpt2_byte_decoder() if self._byte_level else {}

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """The tokenizer files of a local Hugging Face folder (never a hub download)."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the tokenizer from {folder}: {exc}") from exc
        return cls(hf, extra_eos_ids)

    @classmethod
    def from_gguf(cls, path: str, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """The tokenizer and chat template stored in a GGUF file's metadata.

        Converting them means parsing the whole metadata (100k vocabulary strings: about 9 s
        of a 16 s start on this CPU), so the result is cached as ordinary tokenizer files,
        keyed by the file's path, size, modification time and the transformers version."""
        from transformers import AutoTokenizer

        cached = _gguf_tokenizer_cache(path)
        if cached is not None and (cached / "tokenizer.json").is_file():
            try:
                return cls(
                    AutoTokenizer.from_pretrained(cached, local_files_only=True), extra_eos_ids
                )
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry: convert again and replace it
        folder, name = os.path.split(os.path.abspath(path))
        try:
            hf = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot build the tokenizer from {path}: {exc}") from exc
        if cached is not None:
            _save_atomically(hf, cached)
        return cls(hf, extra_eos_ids)

    # -- text <-> ids ----------------------------------------------------------------------
    def encode(
        self, text: str, add_special_tokens: bool = False, *, split_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text`. Special-token text is parsed unless `split_special_tokens`."""
        backend = self._plain if split_special_tokens else self._backend
        return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, id: int) -> str:
        """The decoded text of one token (may be U+FFFD for a token holding part of a character)."""
        return self.decode([id], skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """The raw UTF-8 bytes one token stands for."""
        if id in self._added:
            return self._added[id].encode("utf-8")
        token = self._backend.id_to_token(id)
        if token is None:
            raise ValueError(f"token id {id} is out of range (vocab size {self.vocab_size})")
        if self._byte_level:
            if all(ch in self._byte_decoder for ch in token):
                return bytes(self._byte_decoder[ch] for ch in token)
            return token.encode("utf-8")
        match = _BYTE_TOKEN.match(token)
        if match:
            return bytes([int(match.group(1), 16)])
        if "▁" in token:  # sentencepiece's word boundary
            return token.replace("▁", " ").encode("utf-8")
        return self.decode([id], skip_special_tokens=False).encode("utf-8")

    # -- chat ------------------------------------------------------------------------------
    def _render(
        self, messages: list[dict[str, Any]], template: str, add_generation_prompt: bool
    ) -> str:
        text = self.hf.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        return str(text)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render and tokenize a conversation.

        Only the template's own text may produce special tokens: each message's content is
        replaced by a unique placeholder, the rendering is cut at the placeholders, and the
        content pieces are tokenized with special-token parsing turned off.
        """
        if not messages:
            raise ValueError("messages must contain at least one message")
        template = self.chat_template or CHATML_TEMPLATE
        nonce = secrets.token_hex(8)
        content_of: dict[str, int] = {}
        masked: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str):
                placeholder = f"<<inferhub-content-{nonce}-{i}>>"
                content_of[placeholder] = i
                masked.append({**message, "content": placeholder})
            else:
                masked.append(dict(message))
        rendered = self._render(masked, template, add_generation_prompt)
        # Even positions: template text; odd positions: a placeholder.
        pieces = re.split(rf"(<<inferhub-content-{nonce}-\d+>>)", rendered)
        texts = [messages[content_of[p]]["content"] if k % 2 else p for k, p in enumerate(pieces)]
        real = self._render(list(messages), template, add_generation_prompt)
        if "".join(texts) != real:
            # The template changed some content (e.g. `| trim`): find what it wrote instead.
            for k in range(1, len(pieces), 2):
                texts[k] = self._rendered_content(
                    masked, messages, pieces, k, content_of, template, add_generation_prompt
                )
        ids: list[int] = []
        for k, text in enumerate(texts):
            if text:
                backend = self._plain if k % 2 else self._backend
                ids.extend(backend.encode(text, add_special_tokens=False).ids)
        return ids

    def _rendered_content(
        self,
        masked: list[dict[str, Any]],
        messages: list[dict[str, str]],
        pieces: list[str],
        k: int,
        content_of: dict[str, int],
        template: str,
        add_generation_prompt: bool,
    ) -> str:
        """What the template wrote for the content at pieces[k]: render that one message for real.

        Falls back to the plain content (never to template text) when it cannot be isolated.
        """
        index = content_of[pieces[k]]
        original = messages[index]["content"]
        if pieces[1::2].count(pieces[k]) != 1:
            return original  # the template writes this content several times
        one = list(masked)
        one[index] = dict(messages[index])
        text = self._render(one, template, add_generation_prompt)
        prefix, suffix = "".join(pieces[:k]), "".join(pieces[k + 1 :])
        if (
            len(text) >= len(prefix) + len(suffix)
            and text.startswith(prefix)
            and text.endswith(suffix)
        ):
            return text[len(prefix) : len(text) - len(suffix)]
        return original
