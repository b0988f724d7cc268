"""Inner-product faiss indexes (flat, IVF, HNSW) persisted with a JSON manifest.

A saved index is two files in a directory: `index.faiss` and `manifest.json`. The manifest
records what the vectors were made from (passage encoder fingerprint and settings, corpus
fingerprint) and how the index was built, so that a stale index is refused, never searched.
Writes are atomic (temporary file + os.replace), and the manifest is removed before and
written after the index, so an interrupted save leaves no manifest and is rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from latentrag.core.errors import StaleIndexError
from latentrag.io.atomic import atomic_write_bytes
from latentrag.plugins.dpr import IndexType

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
REBUILD_HINT = "rebuild it with `latentrag index build CONFIG`"


@dataclass(frozen=True)
class IndexOptions:
    """How to build and search the index. nlist, hnsw_m and ef_construction shape the
    structure (recorded in the manifest); nprobe and ef_search only affect search."""

    type: IndexType = "flat"
    nlist: int = 100
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def structure(self) -> dict:
        if self.type == "ivf":
            return {"type": "ivf", "nlist": self.nlist}
        if self.type == "hnsw":
            return {"type": "hnsw", "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction}
        return {"type": "flat"}


@dataclass
class IndexManifest:
    """What a saved index was built from. Two manifests match when every field but
    `model` (a display name) is equal."""

    model_fingerprint: str
    corpus_fingerprint: str
    dims: int
    index_type: str
    num_vectors: int
    encoder_settings: dict = field(default_factory=dict)
    index_params: dict = field(default_factory=dict)
    model: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> IndexManifest:
        try:
            data = json.loads(path.read_text("utf-8"))
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise StaleIndexError(
                f"{path}: unreadable index manifest ({exc}); {REBUILD_HINT}"
            ) from None

    def difference(self, current: IndexManifest) -> str | None:
        """What differs between this (saved) manifest and the current one, or None."""
        checks = [
            ("format_version", "index format version"),
            ("corpus_fingerprint", "corpus"),
            ("model_fingerprint", "passage encoder weights"),
            ("encoder_settings", "passage encoder settings"),
            ("dims", "vector size"),
            ("index_type", "index type"),
            ("index_params", "index parameters"),
            ("num_vectors", "number of vectors"),
        ]
        for key, label in checks:
            saved, now = getattr(self, key), getattr(current, key)
            if saved != now:
                return f"a different {label} (saved {_short(saved)}, current {_short(now)})"
        return None


def _short(value: object) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256 hex digest
        return value[:12]
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


# -- building and searching ----------------------------------------------------------------


def effective_nlist(nlist: int, num_vectors: int) -> int:
    """IVF lists actually used: faiss wants >= 39 training points per list."""
    return max(1, min(nlist, num_vectors // 39))


def build_index(vectors: np.ndarray, options: IndexOptions) -> faiss.Index:
    """An inner-product index over `vectors` [N,D] (float32)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dims = vectors.shape[1]
    if options.type == "ivf":
        quantizer = faiss.IndexFlatIP(dims)
        nlist = effective_nlist(options.nlist, len(vectors))
        index = faiss.IndexIVFFlat(quantizer, dims, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    elif options.type == "hnsw":
        index = faiss.IndexHNSWFlat(dims, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
    else:
        index = faiss.IndexFlatIP(dims)
    index.add(vectors)
    configure_search(index, options)
    return index


def configure_search(index: faiss.Index, options: IndexOptions) -> None:
    """Apply the search-time parameters (they are not part of the saved structure)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(options.nprobe, index.nlist)
        index.make_direct_map()  # lets `stored_vectors` reconstruct rows
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = options.ef_search


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """The [N,D] vectors an index holds, in insertion order (all three types store them)."""
    return index.reconstruct_n(0, index.ntotal)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [B,k]; rows are -1 where an approximate index found fewer than k."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


# -- persistence -----------------------------------------------------------------------------


def save_index(directory: Path, index: faiss.Index, manifest: IndexManifest) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    atomic_write_bytes(directory / INDEX_FILE, faiss.serialize_index(index).tobytes())
    atomic_write_bytes(directory / MANIFEST_FILE, manifest.to_json().encode("utf-8"))


def has_index(directory: Path) -> bool:
    return (directory / MANIFEST_FILE).is_file() and (directory / INDEX_FILE).is_file()


def load_index(directory: Path, expected: IndexManifest, options: IndexOptions) -> faiss.Index:
    """The saved index, after checking its manifest against `expected`; StaleIndexError
    (one line: what differs and how to rebuild) when it does not match."""
    manifest = IndexManifest.read(directory / MANIFEST_FILE)
    difference = manifest.difference(expected)
    if difference is not None:
        raise StaleIndexError(f"index in {directory} was built from {difference}; {REBUILD_HINT}")
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError:  # faiss reports a truncated file in a multi-line C++ message
        raise StaleIndexError(
            f"{directory / INDEX_FILE}: unreadable faiss index (truncated?); {REBUILD_HINT}"
        ) from None
    if index.ntotal != manifest.num_vectors or index.d != manifest.dims:
        raise StaleIndexError(f"index in {directory} does not match its manifest; {REBUILD_HINT}")
    configure_search(index, options)
    return index
