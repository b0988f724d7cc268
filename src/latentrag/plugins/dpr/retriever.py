"""DPR-style dense retriever: a query encoder and a passage encoder over a faiss index.

Both encoders start from the same weights (the packaged all-MiniLM-L6-v2 by default) and
are separate modules unless `shared_encoders`. The corpus is encoded a chunk at a time into
a memory-mapped vector file shared with the faiss index (`faiss_index`: flat, IVF, HNSW or
any faiss factory string), saved with a manifest when `index_dir` is set (a killed build
resumes there) and reused while the corpus and passage encoder are unchanged; without
`index_dir` the files live in a temporary folder. `score()` is differentiable in the query
encoder (and in the passage encoder when `train_passage_encoder`), so the retriever can be
the prior p(h|x) or, reading "question answer", the posterior q(h|x,y).

`query_prefix` / `passage_prefix` (E5's "query: " / "passage: ", BGE's instruction) are
prepended to every query and passage text before tokenisation: when indexing, refreshing,
retrieving and scoring. The passage prefix decides the stored vectors, so it is part of the
index manifest; the query prefix is not (it changes no stored vector). A model's named
prompts (`query_prompt_name` / `passage_prompt_name`, or its default prompt) are prefixes
too. `query_model` / `passage_model` load two separate checkpoints instead of one `model`:
DPR's question and context encoders (vectors: their pooler output), or any asymmetric pair.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.interfaces import Retriever
from latentrag.core.types import Candidates, Corpus
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.faiss_index import (
    IndexManifest,
    IndexOptions,
    VectorStore,
    build_store,
    copy_store,
    has_index,
    open_store,
    search,
)
from latentrag.plugins.dpr.sharded_encoding import encode_sharded
from latentrag.plugins.encoders import SentenceEncoder, load_sentence_encoder, state_fingerprint
from latentrag.plugins.st_layout import read_layout

#: corpora larger than this show a progress bar while encoding
PROGRESS_THRESHOLD = 1000


def index_options(config: DPRConfig) -> IndexOptions:
    """The faiss index settings of a `dpr` config."""
    return IndexOptions(
        type=config.index,
        nlist=config.nlist,
        nprobe=config.nprobe,
        hnsw_m=config.hnsw_m,
        ef_construction=config.ef_construction,
        ef_search=config.ef_search,
        factory=config.index_factory,
        train_sample=config.train_sample,
        chunk=config.encode_chunk,
    )


class _TemporaryFolder:
    """A folder removed when the object holding it is collected (or at exit)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="latentrag-dpr-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)


class DPRRetriever(Retriever, nn.Module):
    """Dense bi-encoder retriever with a persistent faiss index."""

    def __init__(self, config: DPRConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config or DPRConfig()
        cfg = self.config
        #: the texts put before every query / passage (a prefix or the model's prompt)
        self.query_prefix, self.passage_prefix = cfg.prefixes()
        self.query_encoder = self._load(cfg.query_model or cfg.model, self.query_prefix)
        if cfg.passage_model is not None:  # a separate checkpoint (DPR's context encoder)
            self.passage_encoder = self._load(cfg.passage_model, self.passage_prefix)
            self.passage_encoder.requires_grad_(cfg.train_passage_encoder)
            self._check_dims()
        elif cfg.shared_encoders:
            self.passage_encoder = self.query_encoder
        else:
            self._check_prompt_pooling(cfg.model, self.passage_prefix)
            self.passage_encoder = self._copy()
        self.corpus: Corpus | None = None
        self._texts: list[str] = []
        self._store: VectorStore | None = None
        self._scratch: _TemporaryFolder | None = None  # holds the store without index_dir
        self._model_fingerprint = ""
        #: called with the rows encoded after each chunk of a build (tests, benchmarks)
        self.on_chunk: Callable[[int], None] | None = None
        self.eval()  # like a loaded pretrained model; the trainer switches to train mode

    def _load(self, model: str, prefix: str) -> SentenceEncoder:
        cfg = self.config
        self._check_prompt_pooling(model, prefix)
        return load_sentence_encoder(model, cfg.seed, cfg.max_length, cfg.normalize, cfg.precision)

    @staticmethod
    def _check_prompt_pooling(model: str, prefix: str) -> None:
        """Pooling that leaves the prompt out (include_prompt = false) is not implemented:
        refused when a prefix is in effect (without one it changes nothing)."""
        if prefix and not read_layout(model).include_prompt:
            raise ConfigError(
                f"dpr: model {model!r} pools with include_prompt = false, which is not "
                "supported with a query/passage prefix or prompt"
            )

    def _check_dims(self) -> None:
        dims = (self.query_encoder.dim, self.passage_encoder.dim)
        if dims[0] != dims[1]:
            raise ConfigError(
                f"dpr: query_model gives {dims[0]}-dimensional vectors, passage_model {dims[1]}"
            )

    def _copy(self) -> SentenceEncoder:
        encoder = self.query_encoder.clone()
        encoder.requires_grad_(self.config.train_passage_encoder)
        return encoder

    @property
    def refresh_every(self) -> int:
        return self.config.refresh_every

    @property
    def _index(self):
        return None if self._store is None else self._store.index

    @property
    def _vectors(self) -> Tensor | None:
        """The passage vectors [N,D], rows as in the corpus (a view of the memory map)."""
        if self._store is None:
            return None
        return torch.from_numpy(np.asarray(self._store.vectors))

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"query_encoder": self.query_encoder}
        if self.config.train_passage_encoder and not self.config.shared_encoders:
            modules["passage_encoder"] = self.passage_encoder
        return modules

    # -- indexing ------------------------------------------------------------------------

    def index(self, corpus: Corpus) -> None:
        """Load the saved index from `index_dir` when there is one (refusing a stale one),
        else encode the corpus (resuming an interrupted build there), build the index and
        save it there."""
        directory = self._index_dir()
        if directory is not None and has_index(directory):
            self.load(directory, corpus)
        else:
            self.build(corpus)

    def build(self, corpus: Corpus) -> None:
        """Encode `corpus` and build its index in `index_dir` (resuming a build of the same
        corpus, weights and settings that was interrupted there; replacing any other)."""
        self._attach(corpus)
        directory = self._index_dir()
        self._encode_store(directory)

    def refresh(self) -> None:
        """Re-encode the corpus with the current passage encoder and rebuild the index in a
        temporary folder (the saved index keeps describing the configured weights).

        Under torchrun every rank refreshes at the same step (the trainer calls this on
        all of them), so the encoding is shared: each rank encodes 1/N of every chunk and
        the parts are gathered (`encode_sharded`)."""
        self._require_corpus()
        self._encode_store(None, shared_among_ranks=True)

    def _encode_store(self, directory: Path | None, shared_among_ranks: bool = False) -> None:
        fingerprint = state_fingerprint(self.passage_encoder)
        scratch = None
        if directory is None:
            scratch = _TemporaryFolder()
            directory = scratch.path
        encoder, texts, size = self.passage_encoder, self._texts, self.config.batch_size

        def encode_texts(part: Sequence[str]) -> Tensor:
            return encoder.encode(part, size)

        def encode(start: int, end: int) -> np.ndarray:
            if shared_among_ranks:
                return encode_sharded(encode_texts, texts[start:end]).numpy()
            return encode_texts(texts[start:end]).numpy()

        self._store = None  # let a previous scratch folder go before the new one fills
        self._store = build_store(
            directory,
            encode,
            self.corpus.ids,
            self._manifest(fingerprint),
            index_options(self.config),
            progress=len(texts) > PROGRESS_THRESHOLD,
            on_chunk=self.on_chunk,
        )
        self._scratch = scratch
        self._model_fingerprint = fingerprint

    def save(self, directory: Path) -> None:
        """Write the index, its vectors, ids and manifest to `directory` (atomically)."""
        self._require_index()
        copy_store(self._store, Path(directory), self._manifest(self._model_fingerprint))

    def load(self, directory: Path, corpus: Corpus | None = None) -> None:
        """Load a saved index for `corpus` (default: the indexed one); StaleIndexError when
        it was built from another corpus, passage encoder or index configuration."""
        if corpus is not None:
            self._attach(corpus)
        self._require_corpus()
        fingerprint = state_fingerprint(self.passage_encoder)
        expected = self._manifest(fingerprint)
        self._store = open_store(Path(directory), expected, index_options(self.config))
        self._scratch = None
        self._model_fingerprint = fingerprint

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load trained weights; re-encode the corpus when the passage encoder changed."""
        super().load_state_dict(state)
        if self._store is not None and state_fingerprint(self.passage_encoder) != (
            self._model_fingerprint
        ):
            self.refresh()

    def _attach(self, corpus: Corpus) -> None:
        """Hold `corpus` and the texts its passages are encoded from (prefix included)."""
        self.corpus = corpus
        prefix = self.passage_prefix
        self._texts = [prefix + text for text in corpus.texts(with_title=self.config.with_title)]

    def _query_texts(self, queries: Sequence[str]) -> list[str]:
        """The texts the query encoder reads: `query_prefix` + each query."""
        return [self.query_prefix + query for query in queries]

    def _manifest(self, model_fingerprint: str) -> IndexManifest:
        assert self.corpus is not None
        options = index_options(self.config)
        return IndexManifest(
            model_fingerprint=model_fingerprint,
            corpus_fingerprint=self.corpus.fingerprint(),
            dims=self.passage_encoder.dim,
            index_type="factory" if options.factory else options.type,
            num_vectors=len(self.corpus),
            encoder_settings=self._encoder_settings(),
            index_params=options.structure(len(self.corpus)),
            model=self.config.passage_model or self.config.model,
        )

    def _encoder_settings(self) -> dict:
        """What besides the weights decides the stored vectors."""
        settings = {**self.passage_encoder.settings(), "with_title": self.config.with_title}
        if self.passage_prefix:  # manifests without a prefix stay as they were
            settings["passage_prefix"] = self.passage_prefix
        return settings

    def _index_dir(self) -> Path | None:
        return Path(self.config.index_dir).expanduser() if self.config.index_dir else None

    def _require_corpus(self) -> None:
        if self.corpus is None:
            raise LatentragError("dpr retriever: call index(corpus) first")

    def _require_index(self) -> None:
        if self._store is None:
            raise LatentragError("dpr retriever: call index(corpus) before searching or saving")

    # -- search and scoring --------------------------------------------------------------

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        self._require_index()
        size = len(self._texts)
        if not 1 <= k <= size:
            raise LatentragError(f"dpr retriever: k = {k} but the corpus has {size} passages")
        vectors = self.query_encoder.encode(self._query_texts(queries), self.config.batch_size)
        scores, rows = search(self._store.index, vectors.numpy(), k)
        found = rows >= 0  # approximate indexes may return fewer than k
        indices = torch.from_numpy(np.where(found, rows, 0)).long()
        scores = torch.from_numpy(np.where(found, scores, 0.0)).float()
        mask = None if found.all() else torch.from_numpy(found)
        return Candidates(indices, scores, mask)

    def score(self, queries: Sequence[str], passage_rows: Tensor) -> Tensor:
        """q·p for each query and its passages [B,K]: the query encoder is in the graph;
        passages come from the index, or are re-encoded with grad when trained."""
        self._require_index()
        if passage_rows.dim() != 2 or passage_rows.shape[0] != len(queries):
            shape = tuple(passage_rows.shape)
            raise ValueError(f"passage_rows must be [B,K] with B = {len(queries)}, got {shape}")
        query_vectors = self._embed(self.query_encoder, self._query_texts(queries))
        passage_vectors = self._passage_vectors(passage_rows.long().cpu())
        return torch.einsum("bd,bkd->bk", query_vectors, passage_vectors.to(query_vectors.device))

    def _passage_vectors(self, rows: Tensor) -> Tensor:
        if not self.config.train_passage_encoder:  # only the rows asked for leave the map
            return torch.from_numpy(self._store.vectors[rows.numpy()])
        unique, inverse = torch.unique(rows, return_inverse=True)
        texts = [self._texts[row] for row in unique.tolist()]
        return self._embed(self.passage_encoder, texts)[inverse]

    def _embed(self, encoder: SentenceEncoder, texts: list[str]) -> Tensor:
        size = self.config.batch_size
        chunks = [encoder.embed(texts[i : i + size]) for i in range(0, len(texts), size)]
        return torch.cat(chunks)
