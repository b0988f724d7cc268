"""Transformer encoders shared by the dense retriever and the cross-encoder.

A model is named by a string: "minilm" (the packaged all-MiniLM-L6-v2), "tiny-random" (a
2-layer BERT with hidden size 32 and a fixed WordPiece vocabulary, random weights drawn
under a seed: for tests) or a local directory holding a transformers / sentence-transformers
model (or a Hugging Face id in the local cache). Nothing is ever downloaded.

The sentence encoder reads a model folder as sentence-transformers does (`st_layout`): all
its modules (Transformer, Pooling in any of its modes, Dense, Normalize), its
max_seq_length and prompts; a DPR question or context encoder gives its pooler output. The
modules are small torch modules here rather than `SentenceTransformer` itself, so that
precision hooks, `clone`, `state_fingerprint` and the tokenize-once `encode` stay as they
are and sentence-transformers stays a test dependency; tests/test_st_modules.py checks the
vectors equal `SentenceTransformer.encode`.

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
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
)

from latentrag.core.errors import ConfigError
from latentrag.plugins.st_layout import (
    MINILM,  # noqa: F401 (re-exported: cross_encoder)
    POOLER,
    TINY_RANDOM,
    DenseLayout,
    EncoderLayout,
    model_dir,
    packaged_minilm_dir,  # noqa: F401 (re-exported: benchmarks, tests)
    read_layout,
)

#: pooling modes joined by "+" (see st_layout.POOLING_MODES), or "pooler" (DPR)
Pooling = str
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


_DPR_CLASSES = {"dpr-question": DPRQuestionEncoder, "dpr-context": DPRContextEncoder}


def _load_body(layout: EncoderLayout, seed: int) -> tuple[nn.Module, BertTokenizer]:
    """The transformer (in float32) and tokenizer of a layout: a DPR checkpoint as its own
    encoder class (AutoModel would read a context encoder as a question encoder)."""
    if layout.transformer_dir is None:
        return tiny_random_bert(seed)
    directory = layout.transformer_dir
    model_class = _DPR_CLASSES.get(layout.kind, AutoModel)
    transformer = model_class.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if layout.do_lower_case:
        _lowercase(tokenizer, layout.model)
    return transformer, tokenizer


def _lowercase(tokenizer, model: str) -> None:
    """Make a fast tokenizer lowercase its input first, as sentence-transformers'
    do_lower_case does."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"model {model!r}: do_lower_case needs a fast tokenizer")
    current = backend.normalizer
    backend.normalizer = (
        Lowercase() if current is None else NormalizerSequence([Lowercase(), current])
    )


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


def _pool_mode(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """One sentence-transformers pooling mode over token states [N,L,D] and a mask [N,L]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":  # the first attended token ([CLS] with right padding)
        first = mask.to(torch.int).argmax(dim=1)
        return hidden[torch.arange(len(hidden), device=hidden.device), first]
    if mode == "lasttoken":
        last = hidden.shape[1] - 1 - mask.to(torch.int).flip(1).argmax(dim=1)
        return (hidden * weights)[torch.arange(len(hidden), device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # position weights 1, 2, ... from the first attended token
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        start = mask.to(torch.int).argmax(dim=1, keepdim=True).to(hidden.dtype)
        weights = weights * (positions.unsqueeze(0) - start).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    count = weights.sum(1).clamp(min=1e-9)
    total = (hidden * weights).sum(1)
    if mode == "mean_sqrt_len_tokens":
        return total / count.sqrt()
    if mode == "mean":
        return total / count
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """Sentence vectors from token states [N,L,D]: each mode of `pooling` ("mean", "cls",
    "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", several joined by "+"),
    concatenated in that order as sentence-transformers does."""
    modes = pooling.split("+")
    vectors = [_pool_mode(hidden, attention_mask, mode) for mode in modes]
    return vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)


class Dense(nn.Module):
    """sentence-transformers' Dense module: activation(linear(x)) (+ x, or a projection of
    x, when `residual`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "Tanh",
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation
        self.activation = getattr(nn, activation)()
        self.use_residual = residual
        if residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @classmethod
    def load(cls, layout: DenseLayout, model: str) -> Dense:
        """The Dense module of a sentence-transformers folder, with its saved weights."""
        dense = cls(
            layout.in_features,
            layout.out_features,
            layout.bias,
            layout.activation,
            layout.residual,
        )
        safetensors, pickled = layout.path / "model.safetensors", layout.path / "pytorch_model.bin"
        if safetensors.is_file():
            from safetensors.torch import load_file

            state = load_file(safetensors)
        elif pickled.is_file():
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        else:
            raise ConfigError(f"model {model!r}: no weights in {layout.path}")
        try:
            dense.load_state_dict(state)
        except RuntimeError:
            raise ConfigError(
                f"model {model!r}: the weights in {layout.path} do not fit its config.json"
            ) from None
        return dense

    def forward(self, vectors: Tensor) -> Tensor:
        out = self.activation(self.linear(vectors))
        if self.use_residual:
            out = out + (self.residual(vectors) if hasattr(self, "residual") else vectors)
        return out


class Normalize(nn.Module):
    """L2 normalisation (a Normalize module before the last Dense)."""

    def forward(self, vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1)


class SentenceEncoder(nn.Module):
    """Transformer + pooling (+ Dense layers) (+ L2 normalisation): texts to vectors, like
    sentence-transformers; with `pooling` "pooler", a DPR encoder's pooler output."""

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: BertTokenizer,
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_length: int = 128,
        head: Sequence[nn.Module] = (),
        lowercase: bool = False,
    ) -> None:
        super().__init__()
        check_max_length(transformer, max_length)
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        #: the modules after pooling (Dense, Normalize), in the model's order
        self.head = nn.ModuleList(head)
        #: the tokenizer lowercases (sentence-transformers' do_lower_case)
        self.lowercase = lowercase

    @property
    def dim(self) -> int:
        dense = [module for module in self.head if isinstance(module, Dense)]
        if dense:
            return dense[-1].out_features
        config = self.transformer.config
        if self.pooling == POOLER:
            return getattr(config, "projection_dim", 0) or config.hidden_size
        return config.hidden_size * len(self.pooling.split("+"))

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
        # keys that only models with them record, so that other manifests stay as they were
        if len(self.head):
            settings["head"] = [
                module.activation_name if isinstance(module, Dense) else "normalize"
                for module in self.head
            ]
        if self.lowercase:
            settings["lowercase"] = True
        if self.precision != "float32":
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
            copy.deepcopy(list(self.head)),
            self.lowercase,
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        output = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == POOLER:
            vectors = output.pooler_output
        else:
            vectors = pool(output.last_hidden_state, attention_mask, self.pooling)
        for module in self.head:
            vectors = module(vectors)
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
    max_length: int | None = None,
    normalize: bool | None = None,
    precision: PrecisionSetting = "float32",
) -> SentenceEncoder:
    """A SentenceEncoder for a model name, built from what its folder declares (see
    `st_layout`): `max_length` None is the model's own, `normalize` None normalises when
    the model ends with a Normalize module."""
    layout = read_layout(model)
    transformer, tokenizer = _load_body(layout, seed)
    set_precision(transformer, resolve_precision(precision, model))
    head: list[nn.Module] = [
        Dense.load(module, model) if isinstance(module, DenseLayout) else Normalize()
        for module in layout.head
    ]
    if layout.normalizes:  # the last Normalize is the `normalize` switch
        head.pop()
    return SentenceEncoder(
        transformer,
        tokenizer,
        "+".join(layout.pooling),
        layout.normalizes if normalize is None else normalize,
        layout.max_length if max_length is None else max_length,
        head,
        layout.do_lower_case,
    )
