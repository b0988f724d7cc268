"""Inner-product faiss indexes over passage vectors written once, to a memory-mapped file.

A store is a folder:

- the vectors, float32 [N, D] in corpus order, written a chunk at a time. For a flat index
  they are the faiss index itself: ``index.faiss`` is a 45-byte faiss header followed by
  the vectors, which faiss maps into memory (``IO_FLAG_MMAP_IFC``) and `score()` reads
  through a numpy memory map of the same file, so the vectors are held once, by the OS page
  cache. For the other indexes (faiss factory strings: ``"IVF1024,PQ32"``, ``"HNSW32"``...)
  they are ``vectors.f32`` and ``index.faiss`` is built from them (trained on a sample);
- ``ids.txt``: the passage id of each row (faiss label i is line i);
- ``build.json`` while a build is under way: the rows already encoded. A build killed half
  way resumes from there when run again for the same corpus, weights and settings, and
  gives the same files as an uninterrupted one;
- ``manifest.json``, written last: what the vectors were made from (passage encoder
  fingerprint and settings, corpus fingerprint) and how the index was built, so that a
  stale index is refused, never searched.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from latentrag.core.errors import LatentragError, StaleIndexError
from latentrag.io.atomic import atomic_file, atomic_write_bytes
from latentrag.plugins.dpr import IndexType

FORMAT_VERSION = 2
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.f32"
IDS_FILE = "ids.txt"
PROGRESS_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
REBUILD_HINT = "rebuild it with `latentrag index build CONFIG`"

#: encode(start, end) -> float32 vectors [end - start, D] of those corpus rows
Encode = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class IndexOptions:
    """How to build and search the index. `factory` (a faiss factory string) overrides
    `type`; nlist, hnsw_m and ef_construction shape the structure (recorded in the
    manifest); nprobe and ef_search only affect search; train_sample: vectors an index
    that needs training (IVF, PQ) is trained on; chunk: rows encoded per resumable step."""

    type: IndexType = "flat"
    nlist: int = 100
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    factory: str | None = None
    train_sample: int = 100_000
    chunk: int = 8192

    def factory_string(self, num_vectors: int) -> str:
        """The faiss factory string of the index built over `num_vectors` vectors."""
        if self.factory:
            return self.factory
        if self.type == "ivf":
            return f"IVF{effective_nlist(self.nlist, num_vectors)},Flat"
        if self.type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        return "Flat"

    def structure(self, num_vectors: int) -> dict:
        factory = self.factory_string(num_vectors)
        params: dict = {"factory": factory}
        if factory.startswith("HNSW") or ",HNSW" in factory:
            params["ef_construction"] = self.ef_construction
        if factory != "Flat" and _needs_training(factory):
            params["train_sample"] = min(self.train_sample, num_vectors)
        return params


def _needs_training(factory: str) -> bool:
    return any(part in factory for part in ("IVF", "PQ", "SQ", "LSH", "OPQ", "RR", "PCA"))


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


def effective_nlist(nlist: int, num_vectors: int) -> int:
    """IVF lists actually used: faiss wants >= 39 training points per list."""
    return max(1, min(nlist, num_vectors // 39))


# -- the flat index file ------------------------------------------------------------------


def flat_header(dims: int, num_vectors: int) -> bytes:
    """The bytes faiss writes before the vectors of an inner-product flat index."""
    one = faiss.IndexFlatIP(dims)
    one.add(np.zeros((1, dims), dtype=np.float32))
    blob = faiss.serialize_index(one).tobytes()
    header = bytearray(blob[: len(blob) - 4 * dims])
    # after the fourcc and d: ntotal (int64); the header ends with the float count (uint64)
    known = struct.unpack_from("<q", header, 8)[0] == 1
    if not known or struct.unpack_from("<Q", header, len(header) - 8)[0] != dims:
        raise LatentragError(f"faiss {faiss.__version__}: unknown flat index file layout")
    struct.pack_into("<q", header, 8, num_vectors)
    struct.pack_into("<Q", header, len(header) - 8, num_vectors * dims)
    return bytes(header)


def _vector_file(directory: Path, factory: str, dims: int) -> tuple[Path, int]:
    """Where the vectors live and at which byte offset."""
    if factory == "Flat":
        return directory / INDEX_FILE, len(flat_header(dims, 0))
    return directory / VECTORS_FILE, 0


# -- building -------------------------------------------------------------------------------


@dataclass
class VectorStore:
    """An opened store: the vectors (a read-only view of the memory map) and the index."""

    directory: Path
    vectors: np.ndarray
    index: faiss.Index
    manifest: IndexManifest


def _progress(directory: Path) -> dict | None:
    try:
        return json.loads((directory / PROGRESS_FILE).read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _start(directory: Path, manifest: IndexManifest, plan: dict, ids: list[str]) -> int:
    """Rows already encoded by an interrupted build of the same plan (0 for a fresh one,
    whose vector file is created full size)."""
    factory = manifest.index_params["factory"]
    path, offset = _vector_file(directory, factory, manifest.dims)
    size = offset + 4 * manifest.num_vectors * manifest.dims
    saved = _progress(directory)
    same_plan = saved is not None and saved.get("plan") == plan
    if same_plan and path.is_file() and path.stat().st_size == size:
        return int(saved["rows_done"])
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for name in (INDEX_FILE, VECTORS_FILE, IDS_FILE, PROGRESS_FILE):
        (directory / name).unlink(missing_ok=True)
    with open(path, "wb") as handle:
        if factory == "Flat":
            handle.write(flat_header(manifest.dims, manifest.num_vectors))
        handle.truncate(size)
    with atomic_file(directory / IDS_FILE) as handle:
        for ident in ids:
            handle.write(ident.encode("utf-8") + b"\n")
    _save_progress(directory, plan, 0)
    return 0


def _save_progress(directory: Path, plan: dict, rows_done: int) -> None:
    document = {"plan": plan, "rows_done": rows_done}
    atomic_write_bytes(directory / PROGRESS_FILE, json.dumps(document, indent=2).encode())


def build_store(
    directory: Path,
    encode: Encode,
    ids: list[str],
    manifest: IndexManifest,
    options: IndexOptions,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> VectorStore:
    """Encode every row into the store in `directory`, build the index and write the
    manifest; resume an interrupted build of the same plan. `on_chunk(rows_done)` is called
    after each chunk is on disk."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = {"manifest": asdict(manifest), "chunk": options.chunk}
    done = _start(directory, manifest, plan, ids)
    n, dims = manifest.num_vectors, manifest.dims
    factory = manifest.index_params["factory"]
    path, offset = _vector_file(directory, factory, dims)
    vectors = np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=(n, dims))
    starts = range(done, n, options.chunk)
    for start in tqdm(starts, desc="encoding", unit="chunk", disable=not progress):
        end = min(start + options.chunk, n)
        vectors[start:end] = encode(start, end)
        vectors.flush()
        _save_progress(directory, plan, end)
        if on_chunk is not None:
            on_chunk(end)
    del vectors
    if factory != "Flat":
        _write_index(directory, manifest, options)
    (directory / PROGRESS_FILE).unlink(missing_ok=True)
    atomic_write_bytes(directory / MANIFEST_FILE, manifest.to_json().encode("utf-8"))
    return open_store(directory, manifest, options)


def _write_index(directory: Path, manifest: IndexManifest, options: IndexOptions) -> None:
    """Train (on a fixed sample) and fill the factory's index from vectors.f32, by chunks."""
    n, dims = manifest.num_vectors, manifest.dims
    factory = manifest.index_params["factory"]
    vectors = np.memmap(directory / VECTORS_FILE, dtype=np.float32, mode="r", shape=(n, dims))
    try:
        index = faiss.index_factory(dims, factory, faiss.METRIC_INNER_PRODUCT)
        _set_construction(index, options)
        if not index.is_trained:
            sample = min(options.train_sample, n)
            rows = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))
            index.train(np.ascontiguousarray(vectors[rows]))
        for start in range(0, n, options.chunk):
            index.add(np.ascontiguousarray(vectors[start : start + options.chunk]))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise LatentragError(f"faiss cannot build {factory!r} over {n} vectors: {reason}") from None
    atomic_write_bytes(directory / INDEX_FILE, faiss.serialize_index(index).tobytes())


def _set_construction(index: faiss.Index, options: IndexOptions) -> None:
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = options.ef_construction


def _hnsw(index: faiss.Index):
    for candidate in (index, getattr(faiss.try_extract_index_ivf(index), "quantizer", None)):
        if candidate is not None and isinstance(faiss.downcast_index(candidate), faiss.IndexHNSW):
            return faiss.downcast_index(candidate)
    return None


def configure_search(index: faiss.Index, options: IndexOptions) -> None:
    """Apply the search-time parameters (they are not part of the saved structure)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(options.nprobe, ivf.nlist)
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = options.ef_search


# -- opening, searching, copying ------------------------------------------------------------


def has_index(directory: Path) -> bool:
    return (directory / MANIFEST_FILE).is_file() and (directory / INDEX_FILE).is_file()


def open_store(directory: Path, expected: IndexManifest, options: IndexOptions) -> VectorStore:
    """The saved store, after checking its manifest against `expected`; StaleIndexError
    (one line: what differs and how to rebuild) when it does not match."""
    manifest = IndexManifest.read(directory / MANIFEST_FILE)
    difference = manifest.difference(expected)
    if difference is not None:
        raise StaleIndexError(f"index in {directory} was built from {difference}; {REBUILD_HINT}")
    n, dims = manifest.num_vectors, manifest.dims
    factory = manifest.index_params.get("factory", "")
    path, offset = _vector_file(directory, factory, dims)
    flags = faiss.IO_FLAG_MMAP_IFC if factory == "Flat" else 0
    try:
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
    except RuntimeError:  # faiss reports a truncated file in a multi-line C++ message
        raise StaleIndexError(
            f"{directory / INDEX_FILE}: unreadable faiss index (truncated?); {REBUILD_HINT}"
        ) from None
    try:
        # copy-on-write: torch can wrap it; nothing writes to it, so no page is ever copied
        vectors = np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=(n, dims))
    except (ValueError, OSError):
        raise StaleIndexError(
            f"{path}: unreadable vector file (truncated?); {REBUILD_HINT}"
        ) from None
    if index.ntotal != n or index.d != dims:
        raise StaleIndexError(f"index in {directory} does not match its manifest; {REBUILD_HINT}")
    configure_search(index, options)
    return VectorStore(directory, vectors, index, manifest)


def copy_store(store: VectorStore, target: Path, manifest: IndexManifest) -> None:
    """Copy the store's files to `target` (the manifest last, rewritten as `manifest`)."""
    target.mkdir(parents=True, exist_ok=True)
    if target.resolve() == store.directory.resolve():
        atomic_write_bytes(target / MANIFEST_FILE, manifest.to_json().encode("utf-8"))
        return
    (target / MANIFEST_FILE).unlink(missing_ok=True)
    for name in (INDEX_FILE, VECTORS_FILE, IDS_FILE):
        source = store.directory / name
        if source.is_file():
            with atomic_file(target / name) as handle, open(source, "rb") as read:
                shutil.copyfileobj(read, handle, 1 << 20)
    atomic_write_bytes(target / MANIFEST_FILE, manifest.to_json().encode("utf-8"))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows [B,k]; rows are -1 where an approximate index found fewer than k."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
