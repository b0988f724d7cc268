"""Public test doubles: tabular components whose probabilities are free parameters.

`TableGenerator` and `TableRetriever` have no language model inside: every log-probability
is a learnable table entry, so an exact check (sum over the whole corpus) costs nothing and
tests can set the distributions they need. They are test helpers, not registered components.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Generator, Reduce, Retriever
from latentrag.core.types import Candidates, Corpus, Example


def _lookup(table: dict[str, int], keys: Sequence[str], what: str) -> Tensor:
    try:
        return torch.tensor([table[key] for key in keys], dtype=torch.long)
    except KeyError as exc:
        raise LatentragError(f"table component: unknown {what} {exc.args[0]!r}") from None


def posterior_query(example: Example) -> str:
    """What the pipeline's posterior reads for an example (see `Pipeline.posterior_queries`)."""
    return f"{example.question} {example.target}"


class TableGenerator(nn.Module, Generator):
    """p(y|x,h) = softmax over an answer vocabulary of learnable logits[question, passage].

    A proper distribution over the answers (log-probabilities <= 0). Answers are single
    "tokens": token_logprobs has T = 1 and reduce="mean" equals "sum".
    """

    def __init__(
        self,
        questions: Sequence[str],
        passages: Sequence[str],
        answers: Sequence[str],
        seed: int = 0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.question_rows = {q: i for i, q in enumerate(questions)}
        self.passage_rows = {p: i for i, p in enumerate(passages)}
        self.answers = list(answers)
        self.answer_rows = {a: i for i, a in enumerate(self.answers)}
        seeded = torch.Generator().manual_seed(seed)
        shape = (len(questions), len(passages), len(answers))
        self.logits = nn.Parameter(scale * torch.randn(shape, generator=seeded))

    @classmethod
    def from_examples(
        cls, examples: Sequence[Example], corpus: Corpus, seed: int = 0, scale: float = 1.0
    ) -> TableGenerator:
        """One row per distinct question, one column per corpus passage, the targets as answers."""
        questions = list(dict.fromkeys(e.question for e in examples))
        answers = list(dict.fromkeys(e.target for e in examples))
        return cls(questions, corpus.texts(), answers, seed, scale)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"table": self}

    def log_answer_probs(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        """log p(a|x,h) for every answer a: [B,K,A]."""
        questions = _lookup(self.question_rows, queries, "question")
        rows = torch.stack([_lookup(self.passage_rows, ps, "passage") for ps in passages])
        return torch.log_softmax(self.logits[questions.unsqueeze(1), rows], dim=-1)

    def loglik(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        reduce: Reduce = "sum",
    ) -> Tensor:
        answers = _lookup(self.answer_rows, targets, "answer")
        log_probs = self.log_answer_probs(queries, passages)
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
        """The most probable answer given each query's first passage."""
        best = self.log_answer_probs(queries, [ps[:1] for ps in passages]).argmax(-1)[:, 0]
        return [self.answers[i] for i in best.tolist()]


class TableRetriever(nn.Module, Retriever):
    """score(query, passage) = a learnable table entry [queries, passages]."""

    def __init__(
        self, queries: Sequence[str], num_passages: int, seed: int = 0, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.query_rows = {q: i for i, q in enumerate(queries)}
        seeded = torch.Generator().manual_seed(seed)
        shape = (len(queries), num_passages)
        self.table = nn.Parameter(scale * torch.randn(shape, generator=seeded))

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[Example],
        corpus: Corpus,
        posterior: bool = False,
        seed: int = 0,
        scale: float = 1.0,
    ) -> TableRetriever:
        """A prior (keyed by question) or a posterior (keyed by question and answer)."""
        keys = [posterior_query(e) if posterior else e.question for e in examples]
        return cls(list(dict.fromkeys(keys)), len(corpus), seed, scale)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"table": self}

    def index(self, corpus: Corpus) -> None:
        if len(corpus) != self.table.shape[1]:
            raise LatentragError(
                f"table retriever has {self.table.shape[1]} passages, the corpus {len(corpus)}"
            )

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        with torch.no_grad():
            top = torch.topk(self.table[_lookup(self.query_rows, queries, "query")], k, dim=-1)
        return Candidates(top.indices, top.values)

    def score(self, queries: Sequence[str], passage_rows: Tensor) -> Tensor:
        rows = _lookup(self.query_rows, queries, "query")
        return self.table[rows.unsqueeze(1), passage_rows]

    @torch.no_grad()
    def set_scores(self, query: str, scores: Tensor) -> None:
        """Overwrite one query's scores (tests that need a particular distribution)."""
        self.table[self.query_rows[query]] = scores
