"""The `dpr` retriever plugin: its config model and hook (no torch, no faiss: see
`retriever.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.plugins.hub_models import check_model_setting

IndexType = Literal["flat", "ivf", "hnsw"]


class DPRConfig(StrictModel):
    model: str = Field(
        "minilm", description="'minilm' (packaged), 'tiny-random' (tests), a model directory or a "
        "Hugging Face id in the local cache"
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
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(64, ge=1)
    normalize: bool = True
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

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_setting(value, ("minilm", "tiny-random"))


@hookimpl
def register_components(register) -> None:
    register(
        "retriever",
        "dpr",
        "latentrag.plugins.dpr.retriever:DPRRetriever",
        DPRConfig,
        "Dense bi-encoder (MiniLM) with a persistent faiss index",
    )
