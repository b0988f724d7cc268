"""Key -> code: a tractable benchmark whose generator really needs the right passage.

Each passage pairs a random key with a random code ("The code for key qvxal is 4817."); a
question names a key ("What is the code for key qvxal?") and its answer is that passage's
code. A few *distractor* passages per question carry a code that shares the first half of
the answer, so a reader copying their code gets the answer half right.

The models are exact and cheap, so that `latentrag gradcheck` can sum over the whole corpus:

- prior p(h|x): a learnable score table [questions, passages] (`TableRetriever`), random at
  first (the retriever has to *learn* where each key is);
- generator p(y|x,h): `KeycodeReader`, a reader that copies the passage's code:
  logits(a | h) = w_h * sim(a, code_h) + b_a over every code a of the corpus, sim the share
  of digit positions two codes agree on. log p(y|x,h) is high for the gold passage only,
  partly for the distractors, about -log(passages) elsewhere;
- posterior q(h|x,y): a score table set to a chosen *proposal quality* λ:
  q = λ π + (1 - λ) q0, π the exact posterior p(h|x,y) over the corpus, q0 a random table
  (λ = 0: random proposal, λ = 1: the exact posterior).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentrag.core.config import StrictModel
from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Generator, Reduce
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch, Corpus, Example, Passage
from latentrag.toy.components import TableRetriever

CODE_DIGITS = 4


class KeycodeConfig(StrictModel):
    """The `[benchmark]` section of a gradcheck config (name = "keycode")."""

    name: str = Field("keycode", pattern="^keycode$", description="the benchmark")
    passages: int = Field(100, ge=2, le=5000, description="passages in the corpus")
    questions: int = Field(8, ge=1, description="questions (each with its own gold passage)")
    distractors: int = Field(2, ge=0, description="passages per question whose code shares half")
    reader: float = Field(6.0, ge=0, description="initial copy strength w_h of the reader")
    prior_scale: float = Field(1.0, ge=0, description="std of the random initial prior scores")
    prior_gold: float = Field(0.0, description="added to each gold passage's prior score")
    proposal: float = Field(0.5, ge=0, le=1, description="λ: q = λ posterior + (1-λ) random")
    proposal_scale: float = Field(1.0, ge=0, description="std of the random proposal's scores")
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_distractors(self) -> KeycodeConfig:
        needed = self.questions * (1 + self.distractors)
        if needed > self.passages:
            raise ValueError(
                f"questions * (1 + distractors) = {needed} passages needed, "
                f"passages = {self.passages}"
            )
        return self


def keycode_data(config: KeycodeConfig) -> tuple[Corpus, list[Example]]:
    """The corpus and the questions, reproducible from `config.seed`."""
    rng = random.Random(config.seed)
    keys = _unique(rng, config.passages, lambda: "".join(rng.choices(string.ascii_lowercase, k=5)))
    codes = _unique(rng, config.passages, lambda: "".join(rng.choices(string.digits, k=4)))
    gold_rows = rng.sample(range(config.passages), config.questions)
    others = [r for r in range(config.passages) if r not in set(gold_rows)]
    rng.shuffle(others)
    taken = set(codes)
    half = CODE_DIGITS // 2
    for i, gold in enumerate(gold_rows):
        for row in others[i * config.distractors : (i + 1) * config.distractors]:
            taken.discard(codes[row])
            codes[row] = _unique_code(rng, codes[gold][:half], taken)
    corpus = Corpus(
        Passage(id=f"kc{row}", title=f"key {keys[row]}", text=_passage(keys[row], codes[row]))
        for row in range(config.passages)
    )
    examples = [
        Example(
            id=f"kq{i}",
            question=f"What is the code for key {keys[row]}?",
            answers=(codes[row],),
            gold_ids=(f"kc{row}",),
        )
        for i, row in enumerate(gold_rows)
    ]
    return corpus, examples


def _passage(key: str, code: str) -> str:
    return f"The code for key {key} is {code}."


def _unique(rng: random.Random, n: int, draw) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(draw(), None)
    out = list(seen)
    rng.shuffle(out)
    return out


def _unique_code(rng: random.Random, prefix: str, taken: set[str]) -> str:
    while True:
        code = prefix + "".join(rng.choices(string.digits, k=CODE_DIGITS - len(prefix)))
        if code not in taken:
            taken.add(code)
            return code


def code_of(text: str) -> str:
    """The code a keycode passage states (its last word, without the full stop)."""
    return text.rstrip(".").rsplit(" ", 1)[-1]


class KeycodeReader(nn.Module, Generator):
    """p(y|x,h) = softmax_a(w_h * sim(a, code_h) + b_a) over every code of the corpus.

    A reader that copies the passage's code: w_h (one per passage) is how well it reads
    passage h, b_a an answer bias; both learnable. Answers are single "tokens"
    (token_logprobs has T = 1; reduce="mean" equals "sum"). The question is not read: finding
    the passage that holds the key is the retriever's job.
    """

    def __init__(self, corpus: Corpus, strength: float = 6.0) -> None:
        super().__init__()
        texts = corpus.texts()
        self.codes = [code_of(t) for t in texts]
        self.passage_rows = {t: i for i, t in enumerate(texts)}
        self.answer_rows = {c: i for i, c in enumerate(self.codes)}
        if len(self.answer_rows) != len(self.codes):
            raise LatentragError("keycode reader: two passages state the same code")
        digits = torch.tensor([[int(d) for d in c] for c in self.codes])
        self.register_buffer("sim", (digits[:, None, :] == digits[None, :, :]).float().mean(-1))
        self.strength = nn.Parameter(torch.full((len(texts),), float(strength)))
        self.bias = nn.Parameter(torch.zeros(len(texts)))

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"reader": self}

    def _rows(self, table: dict[str, int], keys: Sequence[str], what: str) -> Tensor:
        try:
            return torch.tensor([table[k] for k in keys], dtype=torch.long)
        except KeyError as exc:
            raise LatentragError(f"keycode reader: unknown {what} {exc.args[0]!r}") from None

    def log_answer_probs(self, passages: Sequence[Sequence[str]]) -> Tensor:
        """log p(a|h) for every code a: [B,K,A]."""
        rows = torch.stack([self._rows(self.passage_rows, ps, "passage") for ps in passages])
        logits = self.strength[rows].unsqueeze(-1) * self.sim[rows] + self.bias
        return torch.log_softmax(logits, dim=-1)

    def loglik(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        reduce: Reduce = "sum",
    ) -> Tensor:
        answers = self._rows(self.answer_rows, targets, "answer")
        log_probs = self.log_answer_probs(passages)
        index = answers.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
        return log_probs.gather(-1, index).squeeze(-1)

    def token_logprobs(
        self, queries: Sequence[str], passages: Sequence[Sequence[str]], targets: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        loglik = self.loglik(queries, passages, targets)
        return loglik.unsqueeze(-1), torch.ones(len(queries), 1, dtype=torch.bool)

    @torch.no_grad()
    def generate(
        self, queries: Sequence[str], passages: Sequence[Sequence[str]], max_new_tokens: int = 16
    ) -> list[str]:
        best = self.log_answer_probs([ps[:1] for ps in passages]).argmax(-1)[:, 0]
        return [self.codes[i] for i in best.tolist()]


def keycode_pipeline(config: KeycodeConfig, temperature: float = 1.0) -> tuple[Pipeline, Batch]:
    """Prior, reader and posterior over the keycode corpus, the posterior set to the
    proposal quality `config.proposal` at `temperature`; and the batch of all questions."""
    corpus, examples = keycode_data(config)
    prior = TableRetriever.from_examples(
        examples, corpus, seed=config.seed + 1, scale=config.prior_scale
    )
    with torch.no_grad():
        for i, example in enumerate(examples):
            prior.table[i, corpus.index_of(example.gold_ids[0])] += config.prior_gold
    posterior = TableRetriever.from_examples(
        examples, corpus, posterior=True, seed=config.seed + 2, scale=config.proposal_scale
    )
    pipeline = Pipeline(corpus, prior, KeycodeReader(corpus, config.reader), posterior)
    pipeline.index()
    batch = Batch(examples)
    set_proposal(pipeline, batch, config.proposal, temperature)
    return pipeline, batch


def exact_posterior(pipeline: Pipeline, batch: Batch, temperature: float) -> Tensor:
    """π(h) = p(h|x,y) over the whole corpus [B,N] (prior normalised over the corpus)."""
    with torch.no_grad():
        cand = pipeline.candidates(batch, "corpus", len(pipeline.corpus))
        joint = pipeline.prior_logprobs(batch, cand, temperature) + pipeline.loglik(batch, cand)
        return torch.softmax(joint.double(), dim=-1)


@torch.no_grad()
def set_proposal(pipeline: Pipeline, batch: Batch, quality: float, temperature: float) -> None:
    """Set the posterior table so that softmax(score / temperature) over the corpus is
    quality * π + (1 - quality) * (its current distribution)."""
    posterior = pipeline.posterior
    if not isinstance(posterior, TableRetriever):
        raise LatentragError("set_proposal needs a table posterior")
    pi = exact_posterior(pipeline, batch, temperature)
    queries = pipeline.posterior_queries(batch)
    rows = torch.arange(len(pipeline.corpus)).expand(len(batch), -1)
    current = torch.softmax(posterior.score(queries, rows).double() / temperature, dim=-1)
    mixed = quality * pi + (1 - quality) * current
    for query, probs in zip(queries, mixed):
        posterior.set_scores(query, (temperature * probs.clamp_min(1e-300).log()).float())
