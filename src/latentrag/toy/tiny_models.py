"""Tiny random causal language models and an on-the-fly tokenizer, for tests only.

Nothing here downloads anything: the tokenizer is a word-level `tokenizers` model over a
fixed, sorted vocabulary and the models are randomly initialised from a small config, so
they are deterministic for a given seed and fast enough for unit tests. Their outputs are
meaningless; use them to check shapes, masking, batching and gradients.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from latentrag.toy.corpus import toy_corpus, toy_examples

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
_PROMPT_WORDS = "context question answer passage the a of is in and"
_WORD = re.compile(r"[^\W\d_]+")  # letters only: digits and punctuation are tokens of their own


def _default_texts() -> list[str]:
    texts = [_PROMPT_WORDS]
    texts += [f"{p.title} {p.text}" for p in toy_corpus()]
    texts += [f"{e.question} {' '.join(e.answers)}" for e in toy_examples()]
    return texts


def tiny_vocabulary(texts: Iterable[str] = ()) -> list[str]:
    """Special tokens, then sorted: letters, digits, punctuation and the lowercased words
    of the toy corpus, its questions and `texts`."""
    words = set(string.ascii_lowercase) | set(string.digits) | set(string.punctuation)
    for text in [*_default_texts(), *texts]:
        words.update(_WORD.findall(text.lower()))
    return [*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))]


def tiny_tokenizer(texts_or_vocab: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer with <pad>, <s> (prepended), </s> and [UNK].

    `texts_or_vocab` adds words to the default vocabulary (toy corpus and questions); a
    list of single words is just a list of very short texts. Digits and punctuation are
    split into single characters, so every number is covered.
    """
    if isinstance(texts_or_vocab, str):
        texts_or_vocab = [texts_or_vocab]
    vocab = {token: i for i, token in enumerate(tiny_vocabulary(texts_or_vocab))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    max_positions: int = 1024,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM sized for `tokenizer` (default: tiny_tokenizer)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
        **_special_ids(tokenizer),
    )
    return _seeded(LlamaForCausalLM, config, seed)


def tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    max_positions: int = 1024,
    attn_implementation: str = "sdpa",
) -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel (dropout off) sized for `tokenizer`."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = GPT2Config(
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn_implementation,
        **_special_ids(tokenizer),
    )
    return _seeded(GPT2LMHeadModel, config, seed)


def tiny_t5(
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> T5ForConditionalGeneration:
    """A randomly initialised T5ForConditionalGeneration (dropout off) sized for `tokenizer`;
    the decoder starts from <pad>, as T5's does."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // heads,
        d_ff=2 * hidden,
        num_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(T5ForConditionalGeneration, config, seed)


def _seeded(model_class, config, seed: int):
    """Build the model under `seed` without disturbing the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()
