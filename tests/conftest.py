"""Shared test set-up: Triton's interpreter on machines without CUDA, block-leak checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton reads this when a kernel is defined, so it must be set before any kernel import.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

sys.path.insert(0, str(Path(__file__).parent))

# One cache of converted GGUF tokenizers for the whole run (servers started as subprocesses
# inherit it), never the user's own ~/.cache.
if "INFERHUB_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["INFERHUB_CACHE_DIR"] = tempfile.mkdtemp(prefix="inferhub-test-cache-")
