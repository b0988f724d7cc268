"""The `hf-causal-lm` generator plugin: its config model and hook (no torch, no
transformers: see `generator.py`). The model name is checked here, without loading it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.plugins.hub_models import check_model_setting
from latentrag.plugins.prompt_template import check_prompt_template

DEFAULT_TEMPLATE = "Context: {passage}\nQuestion: {question}\nAnswer:"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
BUILTIN_MODELS = ("smollm2", *TINY_MODELS)


class LoraSettings(StrictModel):
    """LoRA adapters through peft; only the adapter weights are trained."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; None: peft's default for the architecture"
    )


class HFGeneratorConfig(StrictModel):
    model: str = Field(
        "smollm2",
        description="'smollm2', 'tiny-llama', 'tiny-gpt2', a local model directory or a "
        "Hugging Face id in the local cache",
    )
    prompt_template: str = DEFAULT_TEMPLATE
    max_passage_tokens: int = Field(128, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="weights' dtype; auto: bfloat16 for a pretrained model that is frozen or "
        "trained through LoRA, on a CPU with native bfloat16; float32 otherwise",
    )
    lora: LoraSettings | None = None
    freeze: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the transformer's activations in backward instead of storing "
        "them (less memory, about one more forward per step) whenever gradients pass through "
        "the generator: training it, or G-Rerank's mask through a frozen reader",
    )
    seed: int = 0
    passage_cache_mb: float = Field(
        256.0,
        ge=0,
        description="memory for a frozen generator's cached passage key/value states (0: off)",
    )
    passage_cache_dtype: Literal["model", "bfloat16"] = Field(
        "model", description="storage of cached states: the model's dtype (exact) or bfloat16"
    )
    cache_dir: str | None = Field(
        None, description="SmolLM2 safetensors cache (default $LATENTRAG_CACHE/smollm2)"
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_setting(value, BUILTIN_MODELS)

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        return check_prompt_template(value)


@hookimpl
def register_components(register) -> None:
    register(
        "generator",
        "hf-causal-lm",
        "latentrag.plugins.hf_generator.generator:HFCausalLMGenerator",
        HFGeneratorConfig,
        "Any transformers causal LM (packaged SmolLM2-135M by default)",
    )
