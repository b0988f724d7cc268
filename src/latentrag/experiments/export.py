"""Take a trained pipeline out of latentrag (`latentrag export RUN --to KIND OUT`).

- ``sentence-transformers``: the retriever's trained query encoder as a sentence-transformers
  model directory (transformer weights and tokenizer, pooling, Dense layers, normalisation,
  max length, the query / passage prefixes as prompts):
  ``SentenceTransformer(OUT).encode(texts, prompt_name="query")`` gives the retriever's
  query vectors (``prompt_name`` only matters when the retriever has a query prefix);
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
    """The `role`'s query encoder as a sentence-transformers model in `out`: every module it
    computes with (transformer, pooling, Dense layers, Normalize), its max length and
    lowercasing, and the retriever's query / passage prefixes as the prompts "query" and
    "passage" (``encode(texts, prompt_name="query")`` gives the retriever's query vectors)."""
    retriever = _retriever(pipeline, role)
    encoder = getattr(retriever, "query_encoder", None)
    needed = ("transformer", "tokenizer", "pooling", "normalize", "max_length")
    if encoder is None or not all(hasattr(encoder, name) for name in needed):
        raise ExportError(
            f"the {_component_name(pipeline, role)} has no transformer query encoder to "
            "export as a sentence-transformers model (a dense retriever such as dpr has)"
        )
    body, pooling, head = _sentence_transformers_parts(encoder)
    prompts = {
        name: text
        for name, text in (
            ("query", getattr(retriever, "query_prefix", "")),
            ("passage", getattr(retriever, "passage_prefix", "")),
        )
        if text
    }
    with _staged(out) as tmp:
        body.save_pretrained(tmp)
        if encoder.pooling == "pooler":
            _as_bert_config(tmp / "config.json")
        encoder.tokenizer.save_pretrained(tmp)
        modules = [_st_module(0, "", "Transformer")]
        _write_pooling(tmp, modules, body.config.hidden_size, pooling)
        for module in [*head, *(["normalize"] if encoder.normalize else [])]:
            _write_head_module(tmp, modules, module)
        _write_json(tmp / "modules.json", modules)
        settings = {
            "max_seq_length": encoder.max_length,
            "do_lower_case": bool(getattr(encoder, "lowercase", False)),
        }
        _write_json(tmp / "sentence_bert_config.json", settings)
        # the retriever scores by dot product (cosine when the vectors are normalised)
        _write_json(
            tmp / "config_sentence_transformers.json",
            {"similarity_fn_name": "dot", "prompts": prompts, "default_prompt_name": None},
        )
    return out


def _sentence_transformers_parts(encoder: Any) -> tuple[Any, list[str], list[Any]]:
    """The transformer body, pooling modes and modules after pooling that compute what
    `encoder` computes. A DPR encoder's pooler output is the [CLS] state of its BERT,
    through a linear projection when it has one."""
    head = list(getattr(encoder, "head", ()))
    if encoder.pooling != "pooler":
        return encoder.transformer, encoder.pooling.split("+"), head
    dpr = encoder.transformer.base_model  # DPREncoder: bert_model (+ encode_proj)
    projection = getattr(dpr, "encode_proj", None)
    if projection is not None:
        head.insert(0, _IdentityDense(projection))
    return dpr.bert_model, ["cls"], head


def _as_bert_config(path: Path) -> None:
    """A DPR encoder's BERT carries the DPR config; as a BERT, AutoModel loads it as one."""
    config = json.loads(path.read_text("utf-8"))
    config.pop("projection_dim", None)
    config.update(model_type="bert", architectures=["BertModel"])
    _write_json(path, config)


class _IdentityDense:
    """A linear projection written as a Dense module without activation."""

    def __init__(self, linear: Any) -> None:
        self.linear = linear
        self.activation_path = "torch.nn.modules.linear.Identity"
        self.use_residual = False

    def state_dict(self) -> dict[str, Any]:
        return {f"linear.{k}": v for k, v in self.linear.state_dict().items()}


def _st_module(index: int, path: str, kind: str) -> dict[str, Any]:
    return {"idx": index, "name": str(index), "path": path, "type": f"{ST_MODULE}.{kind}"}


def _write_pooling(folder: Path, modules: list[dict], width: int, pooling: list[str]) -> None:
    path = f"{len(modules)}_Pooling"
    modules.append(_st_module(len(modules), path, "Pooling"))
    (folder / path).mkdir()
    flags = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens": "weightedmean",
        "pooling_mode_lasttoken": "lasttoken",
    }
    config = {"word_embedding_dimension": width}
    config.update({flag: mode in pooling for flag, mode in flags.items()})
    _write_json(folder / path / "config.json", {**config, "include_prompt": True})


def _write_head_module(folder: Path, modules: list[dict], module: Any) -> None:
    """A Dense layer (its config and weights) or a Normalize step."""
    if not hasattr(module, "linear"):  # Normalize: no settings, no weights
        path = f"{len(modules)}_Normalize"
        modules.append(_st_module(len(modules), path, "Normalize"))
        (folder / path).mkdir()
        return
    from safetensors.torch import save_file

    path = f"{len(modules)}_Dense"
    modules.append(_st_module(len(modules), path, "Dense"))
    (folder / path).mkdir()
    activation = getattr(module, "activation_path", None) or _class_path(module.activation)
    config = {
        "in_features": module.linear.in_features,
        "out_features": module.linear.out_features,
        "bias": module.linear.bias is not None,
        "activation_function": activation,
    }
    if module.use_residual:  # a key older sentence-transformers do not know: only when used
        config["use_residual"] = True
    _write_json(folder / path / "config.json", config)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(weights, str(folder / path / "model.safetensors"))


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


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
