"""The `dpr` retriever plugin: its config model and hook (no torch, no faiss: see
`retriever.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.core.errors import ConfigError
from latentrag.plugins.hub_models import check_model_setting
from latentrag.plugins.st_layout import EncoderLayout, read_layout

IndexType = Literal["flat", "ivf", "hnsw"]
PACKAGED = ("minilm", "tiny-random")


class DPRConfig(StrictModel):
    model: str = Field(
        "minilm",
        description="'minilm' (packaged), 'tiny-random' (tests), a model directory or a "
        "Hugging Face id in the local cache",
    )
    query_model: str | None = Field(
        None,
        description="a separate query encoder (set with passage_model, instead of model): a "
        "DPR question encoder, or any model folder or Hugging Face id",
    )
    passage_model: str | None = Field(
        None,
        description="a separate passage encoder (set with query_model): a DPR context "
        "encoder, or any model folder or Hugging Face id",
    )
    shared_encoders: bool = Field(False, description="one encoder for queries and passages")
    train_passage_encoder: bool = Field(
        False, description="re-encode scored passages with grad (else use the index's vectors)"
    )
    with_title: bool = Field(False, description="encode passages as 'title. text'")
    query_prefix: str = Field(
        "",
        description="prepended to every query before tokenisation, the posterior's "
        "'question answer' included (E5: 'query: '; BGE: its retrieval instruction)",
    )
    passage_prefix: str = Field(
        "",
        description="prepended to every passage before tokenisation (E5: 'passage: '); "
        "recorded in the index manifest, so a changed prefix refuses a saved index",
    )
    query_prompt_name: str | None = Field(
        None,
        description="the model's named prompt (config_sentence_transformers.json) used as "
        "query prefix, e.g. 'query' ('' for none; default: the model's default prompt)",
    )
    passage_prompt_name: str | None = Field(
        None, description="the model's named prompt used as passage prefix, e.g. 'passage'"
    )
    max_length: int | None = Field(
        None, ge=8, description="tokens per text (default: the model's max_seq_length, else 128)"
    )
    batch_size: int = Field(64, ge=1)
    normalize: bool | None = Field(
        None,
        description="L2-normalise vectors (default: when the model has a Normalize module; "
        "DPR checkpoints: no)",
    )
    precision: Literal["auto", "float32", "bfloat16", "bf16-mixed"] = Field(
        "auto",
        description="encoder compute: float32; bfloat16 weights (inference, frozen encoders); "
        "bf16-mixed (float32 weights, bfloat16 autocast: training); auto: bf16-mixed on a CPU "
        "with native bfloat16, else float32",
    )
    index: IndexType = "flat"
    nlist: int = Field(100, ge=1, description="IVF lists (capped at one per 39 passages)")
    nprobe: int = Field(8, ge=1, description="IVF lists searched per query")
    hnsw_m: int = Field(32, ge=2, description="HNSW neighbours per node")
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)
    index_factory: str | None = Field(
        None,
        description="a faiss factory string (e.g. 'IVF1024,PQ32', 'HNSW32'); overrides index",
    )
    train_sample: int = Field(
        100_000, ge=1, description="vectors an index that needs training (IVF, PQ) trains on"
    )
    encode_chunk: int = Field(
        8192, ge=1, description="passages encoded per step: what a killed build resumes from"
    )
    index_dir: str | None = Field(None, description="where the index is saved and reused")
    refresh_every: int = Field(
        0,
        ge=0,
        description="re-encode the corpus every N optimizer steps (0: never): the trainer "
        "calls refresh(); the retriever never refreshes by itself",
    )
    seed: int = Field(0, description="weights of 'tiny-random'")

    @field_validator("model", "query_model", "passage_model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if check_model_setting(value, PACKAGED) not in PACKAGED:
            _layout(value)  # a folder this package cannot read fails here, not at build
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DPRConfig:
        if (self.query_model is None) != (self.passage_model is None):
            raise ValueError("query_model and passage_model are set together")
        if self.query_model is not None:
            if self.model != "minilm":
                raise ValueError("give either model or query_model / passage_model, not both")
            if self.shared_encoders:
                raise ValueError("shared_encoders = true cannot be used with query_model")
        for side in ("query", "passage"):
            if getattr(self, f"{side}_prefix") and getattr(self, f"{side}_prompt_name"):
                raise ValueError(f"give either {side}_prefix or {side}_prompt_name, not both")
        if self.query_prompt_name or self.passage_prompt_name:
            try:
                self.prefixes()  # the names exist among the models' prompts
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self

    def prefixes(self) -> tuple[str, str]:
        """The texts put before queries and passages: an explicit prefix, else the named
        prompt, else the model's default prompt (config_sentence_transformers.json)."""
        query = read_layout(self.query_model or self.model)
        passage = read_layout(self.passage_model or self.model)
        return (
            query.prefix(self.query_prefix, self.query_prompt_name),
            passage.prefix(self.passage_prefix, self.passage_prompt_name),
        )


def _layout(model: str) -> EncoderLayout:
    """`read_layout` with its ConfigError as the ValueError pydantic reports."""
    try:
        return read_layout(model)
    except ConfigError as error:
        raise ValueError(str(error)) from None


@hookimpl
def register_components(register) -> None:
    register(
        "retriever",
        "dpr",
        "latentrag.plugins.dpr.retriever:DPRRetriever",
        DPRConfig,
        "Dense bi-encoder (MiniLM) with a persistent faiss index",
    )
