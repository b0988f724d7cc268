"""Pipeline and training configs: TOML in, validated pydantic models out.

The top level is checked by `PipelineConfig`; each component section (``[retriever]``,
``[posterior]``, ``[reranker]``, ``[generator]``, ``[estimator]``) names a registered
component and is then checked by that component's own config model. Every problem is
collected and reported as ``file: section.key: message``, one line each.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.registry import ComponentSpec, Registry, default_registry
from latentrag.core.roles import ROLE_KINDS, TRAINABLE_ROLES, canonical_role, canonical_roles

#: config section (role) -> component kind
ROLES = ROLE_KINDS


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ComponentRef(BaseModel):
    """A config field that holds another registered component: its registry `name` and
    its options, checked by that component's own model when the config is resolved.

    Use the subclass for the kind wanted (`RetrieverRef`, `RerankerRef`, `GeneratorRef`)::

        class FusionConfig(StrictModel):
            first: RetrieverRef
            second: RetrieverRef

    and in TOML ``[retriever.first]`` ``name = "bm25"``. An error inside names its full path
    (``retriever.second.modle: unknown key``). The factory builds it with
    ``context.build(config.first)`` (see `BuildContext`), from the registry that resolved
    the config, so components registered in a test's registry can be wrapped too.
    """

    model_config = ConfigDict(extra="allow")
    kind: ClassVar[str] = ""
    name: str
    _spec: ComponentSpec | None = PrivateAttr(None)
    _config: BaseModel | None = PrivateAttr(None)

    @property
    def spec(self) -> ComponentSpec:
        if self._spec is None:
            raise ConfigError(f"{self.kind} {self.name!r}: not resolved yet (see BuildContext)")
        return self._spec

    @property
    def config(self) -> BaseModel:
        """The nested component's validated config (defaults filled in)."""
        if self._config is None:
            raise ConfigError(f"{self.kind} {self.name!r}: not resolved yet (see BuildContext)")
        return self._config

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any, info: Any) -> dict[str, Any]:
        if self._config is None:
            return handler(self)
        inner = self._config.model_dump(mode=info.mode, exclude_none=info.exclude_none)
        return {"name": self.name, **inner}


class RetrieverRef(ComponentRef):
    kind: ClassVar[str] = "retriever"


class RerankerRef(ComponentRef):
    kind: ClassVar[str] = "reranker"


class GeneratorRef(ComponentRef):
    kind: ClassVar[str] = "generator"


def resolve_refs(
    config: BaseModel, path: str, registry: Registry, source: str = "<config>"
) -> list[str]:
    """Validate every `ComponentRef` inside `config` (recursively) against `registry`;
    return the problems as ``source: path.key: message`` lines."""
    problems: list[str] = []
    for field_name in type(config).model_fields:
        value = getattr(config, field_name)
        if isinstance(value, ComponentRef):
            problems += _resolve_ref(value, f"{path}.{field_name}", registry, source)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, ComponentRef):
                    problems += _resolve_ref(item, f"{path}.{field_name}.{i}", registry, source)
    return problems


def _resolve_ref(ref: ComponentRef, path: str, registry: Registry, source: str) -> list[str]:
    try:
        spec = registry.get(ref.kind, ref.name)
    except LatentragError as exc:
        return [f"{source}: {path}.name: {exc}"]
    try:
        config = spec.config_model.model_validate(ref.options())
    except ValidationError as exc:
        return _errors(source, path, exc)
    ref._spec, ref._config = spec, config
    return resolve_refs(config, path, registry, source)


@dataclass
class BuildContext:
    """Handed to factories that take it: builds the components nested in their config."""

    registry: Registry

    def build(self, ref: ComponentRef) -> Any:
        """The component `ref` names, built with its validated options."""
        if ref._spec is None:
            problems = _resolve_ref(ref, ref.kind, self.registry, "<config>")
            if problems:
                raise ConfigError("\n".join(problems))
        return ref.spec.build(ref.config, self)


class ComponentSection(BaseModel):
    """A component section before its own model checks it: a name plus its options."""

    model_config = ConfigDict(extra="allow")
    name: str


class TrainConfig(StrictModel):
    steps: int = Field(100, ge=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    lrs: dict[str, float] = Field(
        default_factory=dict,
        description="per-role learning rates, e.g. {retriever = 1e-5, generator = 3e-5}",
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(
        1.0, ge=0, description="clip the gradient norm to this (0: no clipping)"
    )
    seed: int = 0
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1, description="checkpoints kept in the run folder")
    eval_qa: bool = Field(False, description="periodic eval also generates answers (EM/F1)")
    refresh_index_every: int = Field(0, ge=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    device: str = Field(
        "auto",
        description="where training runs: 'auto' (a GPU when present, else the CPU), 'cpu', "
        "'cuda', 'cuda:N' or 'mps'",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast for the estimator's forward pass: 'fp32' (none), 'bf16', "
        "'fp16' (with a gradient scaler; GPUs only)",
    )
    data_parallel: Literal["auto", "exact", "ddp"] = Field(
        "auto",
        description="how ranks under torchrun average gradients: 'exact' (one all-reduce per "
        "parameter, bit-for-bit repeatable on the CPU), 'ddp' (DistributedDataParallel), "
        "'auto' (ddp when training on CUDA under torchrun, else exact)",
    )
    keep_optimizer: bool = Field(
        True,
        description="the final checkpoint of a finished run keeps the optimizer state "
        "(intermediate checkpoints always do, so that a run resumes)",
    )
    loggers: list[Literal["tensorboard"]] = Field(
        default_factory=list,
        description="where the run log also goes besides metrics.jsonl: 'tensorboard' "
        "(needs the tensorboard package); plugins receive it through the log_record hook",
    )

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _no_clipping(cls, value: Any) -> Any:
        """None (Python callers; TOML has no null) means no clipping, like 0."""
        return 0.0 if value is None else value

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"{device!r} is not 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return device

    @field_validator("loggers")
    @classmethod
    def _loggers_once(cls, loggers: list[str]) -> list[str]:
        repeated = sorted({name for name in loggers if loggers.count(name) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return loggers

    @field_validator("lrs")
    @classmethod
    def _lrs_name_roles(cls, lrs: dict[str, float]) -> dict[str, float]:
        known = (*TRAINABLE_ROLES, "estimator")
        out: dict[str, float] = {}
        for key, value in lrs.items():
            role = canonical_role(key, "train.lrs")
            if role not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown role {key!r}{hint} Roles: {', '.join(known)}")
            out[role] = value
        return out


DataFormat = Literal["latentrag", "beir", "dpr", "kilt", "squad", "hf"]
#: what `[data] fields` may map (hf tables): passage fields, then question fields
DATA_FIELDS = (
    "passage_id", "text", "title",
    "id", "question", "answers", "gold_ids", "gold_grades", "candidate_ids",
)  # fmt: skip
#: sources whose data are files in a `format`
FILE_SOURCES = ("files", "jsonl")


class DataConfig(StrictModel):
    """Where the corpus and examples come from: the shipped "squad-slice", the dozen-passage
    "toy" set of `latentrag.toy` (gradcheck, smoke tests), or files in a `format`
    (docs/data.md): "latentrag" JSONL (`corpus` plus any of `train`/`dev`/`test`), a
    "beir" folder (`path`), "dpr" (passages TSV + question files), "kilt" (knowledge source +
    task files), "squad" (split files; the corpus is their paragraphs) or "hf" (Arrow or
    parquet tables, columns mapped by `fields`). Giving `format` implies source = "files";
    source = "jsonl" (the older spelling) means format = "latentrag"."""

    source: Literal["squad-slice", "jsonl", "toy", "files"] = "squad-slice"
    format: DataFormat | None = None
    path: str | None = Field(None, description="the dataset folder (format = 'beir')")
    corpus: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    fields: dict[str, str] | None = Field(
        None, description="format = 'hf': latentrag field = column, e.g. {question = 'query'}"
    )
    unit: Literal["paragraph", "page"] | None = Field(
        None, description="format = 'kilt': passages are paragraphs (default) or pages"
    )
    max_train: int | None = Field(None, ge=1)
    max_eval: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _format_means_files(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") is not None and "source" not in data:
            return {**data, "source": "files"}
        return data

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str] | None) -> dict[str, str] | None:
        for key in fields or {}:
            if key not in DATA_FIELDS:
                close = difflib.get_close_matches(key, DATA_FIELDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown field {key!r}{hint} Fields: {', '.join(DATA_FIELDS)}")
        return fields

    @model_validator(mode="after")
    def _files_are_named(self) -> DataConfig:
        if self.source == "jsonl":
            if self.format not in (None, "latentrag"):
                raise ValueError("source = 'jsonl' reads latentrag JSONL: drop it to use format")
            self.format = "latentrag"
        if self.format is not None and self.source not in FILE_SOURCES:
            raise ValueError(f"format {self.format!r} reads files: drop source = {self.source!r}")
        if self.source == "files" and self.format is None:
            raise ValueError("format is required when source = 'files'")
        if self.fields and self.format != "hf":
            raise ValueError("fields maps the columns of format = 'hf' only")
        needs = {"beir": "path", "squad": None}.get(self.format or "", "corpus")
        if self.format is not None and needs and getattr(self, needs) is None:
            raise ValueError(f"{needs} is required when format = {self.format!r}")
        splits = (self.train, self.dev, self.test)
        if self.format == "squad" and not any(splits):
            raise ValueError("format = 'squad' needs at least one of train, dev, test")
        return self


class EvalConfig(StrictModel):
    """What `measure` reports. Retrieval, per question then averaged: hit@k (a gold passage
    in the top k: what latentrag called recall@k before), recall@k (all-gold recall: the
    share of the question's gold passages in the top k; equal to hit@k with one gold
    passage), all@k (every gold passage in the top k), ndcg@k (graded relevance when the
    data has grades), mrr@k (1/rank of the first gold passage in the top k)."""

    recall_at: list[int] = Field(
        default_factory=lambda: [1, 5, 20], description="the k of hit@k, recall@k and all@k"
    )
    metrics: list[Literal["hit", "recall", "all", "ndcg", "mrr"]] = Field(
        default_factory=lambda: ["hit", "recall", "mrr", "ndcg"],
        description="retrieval metrics to report",
    )
    mrr_at: int = Field(10, ge=1)
    ndcg_at: list[int] = Field(default_factory=lambda: [10])
    max_new_tokens: int = Field(16, ge=1)
    passages: int = Field(1, ge=1, description="passages shown to the generator when answering")
    rerank_pool: int = Field(20, ge=1, description="prior candidates a reranker reorders")


class PipelineConfig(StrictModel):
    retriever: ComponentSection
    posterior: ComponentSection | None = None
    reranker: ComponentSection | None = None
    generator: ComponentSection | None = None
    estimator: ComponentSection | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


@dataclass
class ResolvedConfig:
    """A validated config: top-level settings and each component's spec and config."""

    pipeline: PipelineConfig
    components: dict[str, tuple[ComponentSpec, BaseModel]]
    source: str = "<config>"
    registry: Registry | None = None

    def build_context(self) -> BuildContext:
        """What the factories of this config's components are handed."""
        return BuildContext(self.registry or default_registry())

    def component(self, role: str) -> tuple[ComponentSpec, BaseModel] | None:
        return self.components.get(role)

    def to_dict(self) -> dict[str, Any]:
        """The full config with every default filled in (what `config show` prints)."""
        data = self.pipeline.model_dump(exclude_none=True)
        for role, (spec, cfg) in self.components.items():
            data[role] = {"name": spec.name, **cfg.model_dump(exclude_none=True)}
        return data


def _format_loc(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts)


def _errors(source: str, prefix: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        key = _format_loc(prefix, err["loc"])
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")  # our validators' own words
            value = err.get("input")
            if isinstance(value, (str, int, float, bool)) and repr(value) not in message:
                message += f" (got {value!r})"
        lines.append(f"{source}: {key}: {message}")
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`estimator.samples=4` -> (["estimator", "samples"], 4); values are TOML, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. estimator.samples=4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in key.split(".")], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None


def resolve(
    data: dict[str, Any], source: str = "<config>", registry: Registry | None = None
) -> ResolvedConfig:
    """Validate a config dict completely; raise one ConfigError listing every problem."""
    problems: list[str] = []
    pipeline = None
    try:
        pipeline = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_errors(source, "", exc))
    registry = registry or default_registry()
    components: dict[str, tuple[ComponentSpec, BaseModel]] = {}
    for role, kind in ROLES.items():
        section = data.get(role)
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            continue  # reported by the top-level check
        options = {k: v for k, v in section.items() if k != "name"}
        try:
            spec = registry.get(kind, section["name"])
            components[role] = (spec, spec.config_model.model_validate(options))
            problems.extend(resolve_refs(components[role][1], role, registry, source))
        except LatentragError as exc:
            problems.append(f"{source}: {role}.name: {exc}")
        except ValidationError as exc:
            problems.extend(_errors(source, role, exc))
    problems.extend(_missing_sections(data, components, source))
    if problems or pipeline is None:
        raise ConfigError("\n".join(problems))
    return ResolvedConfig(pipeline, components, source, registry)


def _missing_sections(
    data: dict[str, Any], components: dict[str, tuple[ComponentSpec, BaseModel]], source: str
) -> list[str]:
    """Sections the configured estimator declares in its `requires` but the config lacks."""
    if "estimator" not in components:
        return []
    spec = components["estimator"][0]
    required = canonical_roles(spec.declared("requires", ()), f"estimator {spec.name!r} requires")
    return [
        f"{source}: {role}: required by estimator {spec.name!r} (add a [{role}] section)"
        for role in required
        if role not in data
    ]


def load_config(
    path: str | Path, overrides: list[str] = (), registry: Registry | None = None
) -> ResolvedConfig:
    """Read, override and validate a TOML config file."""
    data = apply_overrides(read_toml(path), list(overrides))
    return resolve(data, str(path), registry)
