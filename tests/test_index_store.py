"""The dense index store: vectors written once (the flat index file is the vector file),
faiss factory strings with a training sample, ids stored with the index, and a build that
resumes where it stopped and gives the same files as an uninterrupted one.

The 200k-passage figures (peak RSS, a SIGKILLed build resumed) come from
benchmarks/index_scale.py; these tests check the same properties on 600 passages.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from latentrag.core.errors import LatentragError
from latentrag.core.types import Corpus, Passage
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.faiss_index import INDEX_FILE, PROGRESS_FILE, VECTORS_FILE
from latentrag.plugins.dpr.retriever import DPRRetriever

WORDS = ["river", "city", "war", "capital", "state", "year", "king", "music", "film", "church"]
QUESTIONS = ["which river runs by the city", "the king and the war", "music film school"]


def corpus_of(size: int) -> Corpus:
    rng = np.random.default_rng(1)
    texts = (" ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) for _ in range(size))
    return Corpus(Passage(f"p{i}", text) for i, text in enumerate(texts))


def tiny(directory, **options) -> DPRRetriever:
    config = DPRConfig(model="tiny-random", index_dir=str(directory), encode_chunk=100, **options)
    return DPRRetriever(config)


class Killed(Exception):
    """Stands for the process dying after a chunk reached the disk."""


def kill_after(rows: int):
    def on_chunk(done: int) -> None:
        if done >= rows:
            raise Killed(done)

    return on_chunk


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return corpus_of(600)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.mark.parametrize("options", [{}, {"index_factory": "IVF4,PQ8x4", "train_sample": 300}])
def test_a_killed_build_resumes_and_gives_the_same_index(tmp_path, corpus, options):
    whole = tiny(tmp_path / "whole", **options)
    whole.index(corpus)

    killed = tiny(tmp_path / "resumed", **options)
    killed.on_chunk = kill_after(300)
    with pytest.raises(Killed):
        killed.index(corpus)
    assert (tmp_path / "resumed" / PROGRESS_FILE).is_file()  # no manifest: not an index yet

    resumed = tiny(tmp_path / "resumed", **options)
    encoded: list[int] = []
    encode = resumed.passage_encoder.encode
    resumed.passage_encoder.encode = lambda texts, *a, **k: (
        encoded.append(len(texts)) or encode(texts, *a, **k)
    )
    resumed.on_chunk = encoded.append
    resumed.index(corpus)
    assert encoded == [100, 400, 100, 500, 100, 600]  # chunks 4-6 only, then their ends
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    found, expected = resumed.retrieve(QUESTIONS, 5), whole.retrieve(QUESTIONS, 5)
    assert torch.equal(found.indices, expected.indices)


def test_flat_index_file_is_the_vector_file(tmp_path, corpus):
    retriever = tiny(tmp_path)
    retriever.index(corpus)
    vectors = retriever.passage_encoder.encode(corpus.texts()[:100]).numpy()
    assert np.array_equal(retriever._vectors[:100].numpy(), vectors)  # chunk 1, same bytes
    reference = faiss.IndexFlatIP(vectors.shape[1])
    reference.add(retriever._vectors.numpy())
    written = (tmp_path / INDEX_FILE).read_bytes()
    assert written == faiss.serialize_index(reference).tobytes()  # a plain faiss file
    assert not (tmp_path / VECTORS_FILE).exists()  # no second copy of the vectors
    assert (tmp_path / "ids.txt").read_text().splitlines() == corpus.ids


def test_factory_string_with_a_training_sample(tmp_path, corpus):
    exact = tiny(tmp_path / "flat")
    exact.index(corpus)
    hnsw = tiny(tmp_path / "hnsw", index_factory="HNSW16", ef_search=128)
    hnsw.index(corpus)
    assert isinstance(hnsw._index, faiss.IndexHNSWFlat)
    ivfpq = tiny(tmp_path / "ivfpq", index_factory="IVF8,PQ8x4", train_sample=400, nprobe=8)
    ivfpq.index(corpus)
    assert isinstance(ivfpq._index, faiss.IndexIVFPQ) and ivfpq._index.nprobe == 8
    top = exact.retrieve(QUESTIONS, 10).indices.tolist()
    found = hnsw.retrieve(QUESTIONS, 10).indices.tolist()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, found)]) >= 0.8
    # 4-bit codes of the tiny encoder's near-identical vectors rank loosely: only the shape
    coded = ivfpq.retrieve(QUESTIONS, 10)
    assert coded.valid().all() and all(len(set(r)) == 10 for r in coded.indices.tolist())
    manifest = (tmp_path / "ivfpq" / "manifest.json").read_text()
    assert '"factory": "IVF8,PQ8x4"' in manifest and '"train_sample": 400' in manifest
    # score() reads the exact vectors, not the PQ codes
    rows = torch.tensor([[0, 1, 2]] * len(QUESTIONS))
    assert torch.allclose(ivfpq.score(QUESTIONS, rows), exact.score(QUESTIONS, rows))


def test_a_factory_faiss_cannot_build_is_one_line(tmp_path):
    with pytest.raises(LatentragError, match=r"faiss cannot build 'IVF4096,Flat' over 50") as err:
        tiny(tmp_path, index_factory="IVF4096,Flat").index(corpus_of(50))
    assert "\n" not in str(err.value)
