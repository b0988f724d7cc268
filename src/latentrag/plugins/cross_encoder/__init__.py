"""The `cross-encoder` reranker plugin: its config model and hook (no torch: see
`reranker.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.plugins.hub_models import check_model_setting


class CrossEncoderConfig(StrictModel):
    model: str = Field(
        "minilm", description="'minilm' (packaged), 'tiny-random' (tests), a model directory or a "
        "Hugging Face id in the local cache"
    )
    max_length: int = Field(256, ge=8, description="tokens of query and passage together")
    batch_size: int = Field(32, ge=1, description="pairs per encoder forward")
    pooling: Literal["cls", "mean"] = "cls"
    freeze_encoder: bool = Field(False, description="train only the scoring head")
    precision: Literal["auto", "float32", "bfloat16", "bf16-mixed"] = Field(
        "auto",
        description="encoder compute: float32; bfloat16 weights (inference, frozen encoders); "
        "bf16-mixed (float32 weights, bfloat16 autocast: training); auto: bf16-mixed on a CPU "
        "with native bfloat16, else float32",
    )
    seed: int = Field(0, description="initialises the head (and the weights of 'tiny-random')")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_setting(value, ("minilm", "tiny-random"))


@hookimpl
def register_components(register) -> None:
    register(
        "reranker",
        "cross-encoder",
        "latentrag.plugins.cross_encoder.reranker:CrossEncoderReranker",
        CrossEncoderConfig,
        "MiniLM cross-encoder with a trainable scoring head",
    )
