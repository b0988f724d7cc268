"""Take a trained pipeline out of latentrag (`latentrag export RUN --to KIND OUT`).

- ``sentence-transformers``: the retriever's trained query encoder as a sentence-transformers
  model directory (transformer weights and tokenizer, pooling, normalisation, max length):
  ``SentenceTransformer(OUT).encode(texts)`` gives the retriever's query vectors;
- ``peft``: the generator's trained LoRA adapter (and its tokenizer):
  ``PeftModel.from_pretrained(base_model, OUT)``;
- ``faiss``: the retriever's index of the trained passage vectors, ``index.faiss``, with
  ``ids.json`` (the passage id of each faiss label: label i is ``ids[i]``) and the index's
  ``manifest.json``.

Exports read components through their public attributes (a dense retriever's
``query_encoder`` with its ``transformer``, ``tokenizer``, ``pooling``, ``normalize``,
``max_length``; a generator's peft ``model``; `Retriever.save`), so any plugin exposing
them exports too. OUT is written in a temporary folder beside it and renamed when
complete; an existing non-empty OUT is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from latentrag.core.errors import LatentragError
from latentrag.core.pipeline import Pipeline

__all__ = [
    "EXPORTS",
    "check_out",
    "export",
    "export_faiss",
    "export_peft",
    "export_sentence_transformers",
]

IDS_FILE = "ids.json"
INDEX_FILE = "index.faiss"
ST_MODULE = "sentence_transformers.models"


class ExportError(LatentragError):
    """The pipeline has nothing of that kind to export, or OUT cannot be written."""


def check_out(out: str | Path) -> None:
    """ExportError unless `out` is free: absent, or an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty folder")


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds."""
    check_out(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise ExportError(f"{out}: cannot write here ({exc.strerror})") from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _component_name(pipeline: Pipeline, role: str) -> str:
    config = pipeline.config
    if config is not None and role in config.components:
        return f"{role} {config.components[role][0].name!r}"
    return role


def _retriever(pipeline: Pipeline, role: str) -> Any:
    if role not in ("retriever", "posterior"):
        raise ExportError(f"role {role!r}: choose retriever or posterior")
    component = getattr(pipeline, role)
    if component is None:
        raise ExportError(f"the pipeline has no {role}")
    return component


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_sentence_transformers(pipeline: Pipeline, out: Path, role: str = "retriever") -> Path:
    """The `role`'s query encoder as a sentence-transformers model in `out`."""
    encoder = getattr(_retriever(pipeline, role), "query_encoder", None)
    needed = ("transformer", "tokenizer", "pooling", "normalize", "max_length")
    if encoder is None or not all(hasattr(encoder, name) for name in needed):
        raise ExportError(
            f"the {_component_name(pipeline, role)} has no transformer query encoder to "
            "export as a sentence-transformers model (a dense retriever such as dpr has)"
        )
    with _staged(out) as tmp:
        encoder.transformer.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
        _write_sentence_transformers_config(tmp, encoder)
    return out


def _write_sentence_transformers_config(folder: Path, encoder: Any) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULE}.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST_MODULE}.Pooling"})
    if encoder.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{ST_MODULE}.Normalize"}
        )
        (folder / "2_Normalize").mkdir()
    _write_json(folder / "modules.json", modules)
    settings = {"max_seq_length": encoder.max_length, "do_lower_case": False}
    _write_json(folder / "sentence_bert_config.json", settings)
    (folder / "1_Pooling").mkdir()
    pooling = {
        "word_embedding_dimension": encoder.transformer.config.hidden_size,
        "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    # the retriever scores by dot product (cosine when the vectors are normalised)
    _write_json(folder / "config_sentence_transformers.json", {"similarity_fn_name": "dot"})


def export_peft(pipeline: Pipeline, out: Path) -> Path:
    """The generator's LoRA adapter (peft format) and its tokenizer in `out`."""
    model = getattr(pipeline.generator, "model", None)
    if model is None or not hasattr(model, "peft_config"):
        raise ExportError(
            f"the {_component_name(pipeline, 'generator')} has no LoRA adapter to export "
            "(train it with a [generator.lora] section)"
        )
    with _staged(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer = getattr(pipeline.generator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def export_faiss(pipeline: Pipeline, out: Path, role: str = "retriever") -> Path:
    """The `role`'s faiss index (its current, trained passage vectors) with the passage
    id of each label in ids.json."""
    retriever = _retriever(pipeline, role)
    with _staged(out) as tmp:
        retriever.save(tmp)
        if not (tmp / INDEX_FILE).is_file():
            raise ExportError(
                f"the {_component_name(pipeline, role)} keeps no faiss index "
                "(a dense retriever such as dpr does)"
            )
        _write_json(tmp / IDS_FILE, pipeline.corpus.ids)
    return out


EXPORTS: dict[str, Callable[..., Path]] = {
    "sentence-transformers": export_sentence_transformers,
    "peft": export_peft,
    "faiss": export_faiss,
}


def export(pipeline: Pipeline, kind: str, out: str | Path, role: str = "retriever") -> Path:
    """Export what `kind` names (see the module docstring) into `out`; return `out`."""
    if kind not in EXPORTS:
        raise ExportError(f"unknown export {kind!r}; choose from {', '.join(EXPORTS)}")
    if kind == "peft":
        return export_peft(pipeline, Path(out))
    return EXPORTS[kind](pipeline, Path(out), role)
