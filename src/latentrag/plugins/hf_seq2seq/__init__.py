"""The `hf-seq2seq` generator plugin (T5, BART, Flan-T5): its config model and hook (no
torch, no transformers: see `generator.py`). The model name is checked here, without
loading it."""

from __future__ import annotations

from pydantic import Field, field_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.plugins.hub_models import check_model_setting
from latentrag.plugins.prompt_template import check_prompt_template

DEFAULT_TEMPLATE = "question: {question} context: {passage}"
TINY_MODELS = ("tiny-t5",)


class HFSeq2SeqConfig(StrictModel):
    model: str = Field(
        "tiny-t5",
        description="'tiny-t5' (tests), a local model directory or a Hugging Face id in the "
        "local cache (e.g. google/flan-t5-small, facebook/bart-base)",
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="the encoder's text for one (question, passage) pair"
    )
    max_passage_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    freeze: bool = False
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the transformer's activations in backward instead of storing "
        "them (less memory, about one more forward per step) whenever gradients pass through "
        "the generator: training it, or G-Rerank's mask through a frozen reader",
    )
    seed: int = 0

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_setting(value, TINY_MODELS)

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        return check_prompt_template(value)


@hookimpl
def register_components(register) -> None:
    register(
        "generator",
        "hf-seq2seq",
        "latentrag.plugins.hf_seq2seq.generator:HFSeq2SeqGenerator",
        HFSeq2SeqConfig,
        "Encoder-decoder LM (T5, BART): per-passage scores, Fusion-in-Decoder joint reading",
    )
