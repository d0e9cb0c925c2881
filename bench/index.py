"""Index size and search benchmark: edge-shitu galleries against faiss, hnswlib and the reference's files.

For each gallery size it measures, on one thread:

- **ours** (the edge-shitu gallery, SQLite file + in-memory :class:`~edge_shitu.search.HammingIndex`),
  once with the pure-numpy search and once with the faiss backend: bytes per item on disk and in
  memory once open, build time (batched ``add``), open time, search p50 for one query and for a
  batch of 6 (top-5), and, at the end, the time to remove 10,000 items and search again;
- **faiss-binary-flat**: ``faiss.IndexBinaryFlat`` on the same codes, the baseline every Hamming speed
  ratio is computed against;
- **the numpy scan's floor**: its first pass alone (the XOR of the query with every code), which
  any numpy scan must make: its time over faiss's is as close as numpy can come to faiss;
- **hnswlib-float**: ``hnswlib`` inner product, M = 32, ef_construction 40 and ef_search 64 (the
  reference's HNSW32 with its efSearch raised from faiss's default 16), with its recall@1 against
  exact search; its graph is built on every core (searches, like all others, on one thread);
- **float-flat**: exact inner-product search of float32 embeddings with one matrix product;
- **ours-rerank-int8**, **ours-rerank-fp16** (``--rerank``): our gallery keeping each item's float
  embedding in that compact form, searched with the query's float feature, so that the Hamming
  top-``shortlist`` (16, the library's default) is re-ranked by inner product: bytes per item on disk and
  in memory, build and open time, search p50, their ratio to the plain Hamming search of the same codes
  (numpy backend) timed alternately with it, and recall@1 against exact float inner product beside the
  plain search's;
- **reference files**: the size of what PaddleClas's ``build_gallery.py`` writes for a binary Flat
  gallery of the same items (``vector.index`` + the pickled id map ``id_map.pkl``; see reference
  §1.7). The pickle is written here only to be measured.

Data: synthetic, deterministic. Embeddings are drawn around ``size / 5`` random centres in 512-d
(unit-normalised, so clusters of about five views of one product, like a real gallery), codes are
their signs packed MSB-first, labels are the drink data set's real product names with a suffix
per centre. Queries are fresh draws around existing centres. Memory is the growth of the resident
set (exact, from ``/proc/self/smaps_rollup`` where there is one) of a fresh child process across
opening the index, after a warm-up search on a one-item index of the same kind, so each measurement
holds only its own data and not the library code a first search loads. The search times of the
Hamming indexes (ours with numpy, ours with faiss, raw faiss, the XOR pass)
are taken in one process that alternates them query by query, so that their ratios do not depend on
when each one ran on a shared machine. Float indexes are built only up to ``--float-max`` items
(hnswlib's build is slow on 2 cores); the re-ranked galleries are built at every size from the same
embeddings, drawn again chunk by chunk (:func:`_item_embeddings`) where they are not held whole, and added
with ``add_batches``, so the build holds the codes and the compact features, not the float ones.

Run ``python -m edge_shitu_bench.index --out DIR`` or ``edge-shitu bench index``; it writes ``index.json``,
``index.md`` and ``index.png``.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu_bench import report
from edge_shitu.compact import COMPACT_FORMATS
from edge_shitu.errors import InvalidInputError
from edge_shitu.gallery import DEFAULT_SHORTLIST

__all__ = ["IndexBenchOptions", "parse_rerank", "run", "markdown", "main"]

DIM = 512
BITS = 512
FP = "be0c0000"
_LABEL_FALLBACK = ("cola", "green tea", "orange juice", "sparkling water", "milk tea")
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_CHUNK_ITEMS = 65536
PLAIN = "ours-numpy"
"""The plain Hamming search the re-ranked galleries are timed against (same codes, same backend)."""


@dataclass(frozen=True)
class IndexBenchOptions:
    """What the index benchmark measures.

    Attributes:
      sizes: gallery sizes (items), each >= 100.
      out: output folder for index.json / index.md / index.png.
      work: folder for the gallery and index files (default: a temporary folder, removed after).
      queries: distinct query codes; single-query timings use one each, in turn.
      runs: timed searches per measurement (after ``warmup`` untimed ones).
      warmup: untimed searches first.
      k: neighbours per query.
      batch: queries in the batched search (all crops of one image).
      float_max: largest size for which the float indexes (hnswlib, exact float) are built.
      add_batch: items per ``add`` transaction when building our gallery.
      remove: items removed from our gallery at the end of each size.
      seed: seed of the synthetic data.
      chart: write index.png (needs matplotlib).
      rerank: compact formats of the re-ranked galleries to measure ("int8", "fp16"); empty for none.
      shortlist: Hamming candidates re-ranked per query.
    """

    sizes: Tuple[int, ...] = (10_000, 145_000, 1_000_000)
    out: Path = Path("bench-out/index")
    work: Optional[Path] = None
    queries: int = 64
    runs: int = 31
    warmup: int = 3
    k: int = 5
    batch: int = 6
    float_max: int = 1_000_000
    add_batch: int = 10_000
    remove: int = 10_000
    seed: int = 0
    chart: bool = True
    rerank: Tuple[str, ...] = COMPACT_FORMATS
    shortlist: int = DEFAULT_SHORTLIST

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 100 for s in self.sizes):
            raise InvalidInputError(f"sizes must be integers >= 100, got {self.sizes!r}")
        for name in ("queries", "runs", "k", "batch", "add_batch", "shortlist"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.batch > self.queries:
            raise InvalidInputError(f"batch ({self.batch}) cannot exceed queries ({self.queries})")
        for name in ("warmup", "float_max", "remove"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if (not isinstance(self.rerank, tuple) or any(f not in COMPACT_FORMATS for f in self.rerank)
                or len(set(self.rerank)) != len(self.rerank)):
            raise InvalidInputError(f"rerank must be a tuple of distinct formats from {', '.join(COMPACT_FORMATS)}, "
                                    f"got {self.rerank!r}")


def parse_rerank(text: str) -> Tuple[str, ...]:
    """The value of ``--rerank``: ``"none"`` or comma-separated distinct compact formats.

    Args:
      text: e.g. ``"int8,fp16"``, ``"fp16"`` or ``"none"``.

    Returns:
      The formats, in the order given; empty for ``"none"``.

    Raises:
      InvalidInputError: an unknown or repeated format, or nothing given.
    """
    words = [w.strip() for w in str(text).split(",") if w.strip()]
    if words == ["none"]:
        return ()
    if not words or any(w not in COMPACT_FORMATS for w in words) or len(set(words)) != len(words):
        raise InvalidInputError(f"--rerank must be 'none' or distinct formats from {','.join(COMPACT_FORMATS)} "
                                f"separated by commas, got {text!r}")
    return tuple(words)


def _drink_labels() -> List[str]:
    """The real product names of the drink data set, when the shared folder is there."""
    try:
        from edge_shitu_converters.shared import find_shared

        path = find_shared() / "data" / "drink_dataset_v1.0" / "gallery" / "drink_label.txt"
        names = sorted({line.split("\t", 1)[1].strip() for line in path.read_text(encoding="utf-8").splitlines()
                        if "\t" in line})
        return names or list(_LABEL_FALLBACK)
    except Exception:  # the labels only make the strings realistic; any failure falls back to fixed names
        return list(_LABEL_FALLBACK)


def _draw_centres(size: int, seed: int) -> Tuple[np.random.Generator, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, size // 5), DIM), dtype=np.float32)
    return rng, centres, rng.integers(0, centres.shape[0], size)


def _draw_items(rng: np.random.Generator, centres: np.ndarray, owner: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, owner.size, _CHUNK_ITEMS):
        stop = min(owner.size, start + _CHUNK_ITEMS)
        x = centres[owner[start:stop]] + 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def _item_embeddings(size: int, seed: int) -> Iterator[np.ndarray]:
    """The items' unit float32 embeddings that :func:`_synthetic` draws for ``(size, seed)``, drawn again in
    item order, ``(m, DIM)`` at a time: the same values without holding all of them."""
    yield from _draw_items(*_draw_centres(size, seed))


def _synthetic(size: int, queries: int, seed: int, want_float: bool):
    """Codes (and embeddings) of ``size`` items around ``size // 5`` centres, plus query draws."""
    rng, centres, owner = _draw_centres(size, seed)
    codes = np.empty((size, BITS // 8), dtype=np.uint8)
    emb = np.empty((size, DIM), dtype=np.float32) if want_float else None
    start = 0
    for x in _draw_items(rng, centres, owner):
        stop = start + x.shape[0]
        codes[start:stop] = np.packbits(x > 0, axis=1)
        if emb is not None:
            emb[start:stop] = x
        start = stop
    q = centres[rng.integers(0, centres.shape[0], queries)] + 0.6 * rng.standard_normal((queries, DIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return owner, codes, emb, q.astype(np.float32), np.packbits(q > 0, axis=1)


def _embedding_chunks(size: int, seed: int, emb: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    """The items' embeddings in order, from ``emb`` when it is held, else drawn again."""
    if emb is None:
        return _item_embeddings(size, seed)
    return (emb[start:start + _CHUNK_ITEMS] for start in range(0, size, _CHUNK_ITEMS))


def _exact_top1(chunks: Iterable[np.ndarray], qfloat: np.ndarray) -> np.ndarray:
    """int64 ``(q,)``: the row of the largest inner product with each query (the first on ties)."""
    best = np.full(qfloat.shape[0], -np.inf, dtype=np.float32)
    top = np.zeros(qfloat.shape[0], dtype=np.int64)
    start = 0
    for x in chunks:
        scores = x @ qfloat.T
        arg = scores.argmax(axis=0)
        value = scores[arg, np.arange(qfloat.shape[0])]
        better = value > best
        best[better], top[better] = value[better], start + arg[better]
        start += x.shape[0]
    return top


def _labels(owner: np.ndarray) -> List[str]:
    names = _drink_labels()
    return [f"{names[o % len(names)]} #{o}" for o in owner.tolist()]


def _timed(fn, runs: int, warmup: int) -> Dict[str, float]:
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e3)
    return report.summarize(samples)


def _rss_bytes() -> int:
    gc.collect()
    # smaps_rollup walks the page tables: exact. statm (and psutil) read per-CPU counters that lag
    # (Linux 6.2+): right after huge pages were collapsed they read 1-2 MB high.
    try:
        with open("/proc/self/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- child measurements


HAMMING_KINDS = ("ours-numpy", "ours-faiss", "faiss-binary-flat")
"""The binary indexes whose search times are taken together by :func:`_interleaved`."""


def _rerank_kind(fmt: str) -> str:
    return f"ours-rerank-{fmt}"


def _alternate(searches: Dict[str, Callable[..., Any]], pick: Callable[[int], tuple], runs: int,
               warmup: int) -> Dict[str, List[float]]:
    """Round ``i`` calls every search once on ``pick(i)``, starting one further along each round.

    Returns:
      For each search, its ``runs`` timed calls in ms; sample ``j`` of each comes from the same round.
    """
    kinds = list(searches)
    samples: Dict[str, List[float]] = {kind: [] for kind in kinds}
    for i in range(warmup + runs):
        args = pick(i)
        for turn in range(len(kinds)):
            kind = kinds[(i + turn) % len(kinds)]
            search = searches[kind]
            t0 = time.perf_counter()
            search(*args)
            if i >= warmup:
                samples[kind].append((time.perf_counter() - t0) * 1e3)
    return samples


def _interleaved(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Times the Hamming indexes of :data:`HAMMING_KINDS` in one process, turn by turn.

    Each round searches the same query (then the same batch) on every index, the order rotating from
    round to round. On a shared machine whose speed drifts from second to second, a slow spell then
    hits all three alike, and their ratios stay meaningful where timings taken one index after the
    other were not (one such run showed raw faiss 40% slower than our wrapper around it).
    """
    import faiss

    from edge_shitu.gallery import Gallery

    faiss.omp_set_num_threads(1)
    runs, warmup, k, batch = (spec[n] for n in ("runs", "warmup", "k", "batch"))
    work = Path(spec["work"])
    qcodes = np.load(work / "queries.npy")
    n = qcodes.shape[0]
    numpy_gallery = Gallery.open(work / "ours.gallery", backend="numpy")
    faiss_gallery = Gallery.open(work / "ours.gallery", backend="faiss")
    raw = faiss.read_index_binary(str(work / "faiss.bindex"))
    searches = {"ours-numpy": lambda q: numpy_gallery.search(q, k),
                "ours-faiss": lambda q: faiss_gallery.search(q, k),
                "faiss-binary-flat": lambda q: raw.search(q, k),
                XOR_PASS: _xor_pass(faiss.vector_to_array(raw.xb).reshape(-1, BITS // 8))}
    out: Dict[str, Any] = {}
    for key, pick, kinds in (
            ("search_1_ms", lambda i: (qcodes[i % n:i % n + 1],), HAMMING_KINDS + (XOR_PASS,)),
            ("search_batch_ms", lambda i: (qcodes[[(i + j) % n for j in range(batch)]],), HAMMING_KINDS)):
        samples = _alternate({kind: searches[kind] for kind in kinds}, pick, runs, warmup)
        for kind in kinds:
            out.setdefault(kind, {})[key] = report.summarize(samples[kind])
    out["ours-numpy"]["xor_pass_ms"] = out.pop(XOR_PASS)["search_1_ms"]
    out["ours-numpy"]["searched_items"] = len(numpy_gallery)
    out["ours-faiss"]["searched_items"] = len(faiss_gallery)
    out["faiss-binary-flat"]["searched_items"] = int(raw.ntotal)
    numpy_gallery.close()
    faiss_gallery.close()
    return out


def _rerank_interleaved(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Times the re-ranked galleries of ``spec["formats"]`` and the plain numpy Hamming search of the same
    codes (:data:`PLAIN`) in one process, turn by turn (as :func:`_interleaved`), then measures the
    recall@1 of each against exact float inner product (``exact_top1.npy``).

    Each re-ranked row gets its p50s, their ratios to the plain search's, the median over rounds of the
    time it adds to the plain search of the same queries (``*_extra_ms``), its recall@1 and the plain
    search's; the plain row gets its recall@1.
    """
    from edge_shitu.gallery import Gallery

    runs, warmup, k, batch, shortlist = (spec[n] for n in ("runs", "warmup", "k", "batch", "shortlist"))
    work = Path(spec["work"])
    qcodes, qfloat = np.load(work / "queries.npy"), np.load(work / "queries_float.npy")
    n = qcodes.shape[0]
    galleries = {PLAIN: Gallery.open(work / "ours.gallery", backend="numpy")}
    for fmt in spec["formats"]:
        galleries[_rerank_kind(fmt)] = Gallery.open(work / f"rerank-{fmt}.gallery", backend="numpy")

    def searcher(kind: str) -> Callable[[np.ndarray, np.ndarray], Any]:
        gallery = galleries[kind]
        if kind == PLAIN:
            return lambda q, f: gallery.search(q, k)
        return lambda q, f: gallery.search(q, k, features=f, shortlist=shortlist)

    searches = {kind: searcher(kind) for kind in galleries}
    out: Dict[str, Any] = {kind: {} for kind in galleries}
    for key, pick in (("search_1", lambda i: (qcodes[i % n:i % n + 1], qfloat[i % n:i % n + 1])),
                      ("search_batch", lambda i: (qcodes[[(i + j) % n for j in range(batch)]],
                                                  qfloat[[(i + j) % n for j in range(batch)]]))):
        samples = _alternate(searches, pick, runs, warmup)
        # The plain search's own row keeps the times of _interleaved; these are only the ratios' base.
        plain = report.summarize(samples[PLAIN])
        for kind in galleries:
            if kind == PLAIN:
                continue
            found = report.summarize(samples[kind])
            out[kind].update({
                f"{key}_ms": found, f"plain_{key}_ms": plain,
                f"{key}_ratio_to_plain": report.ratio(found["p50"], plain["p50"]),
                f"{key}_extra_ms": float(np.median(np.subtract(samples[kind], samples[PLAIN])))})
    exact = np.load(work / "exact_top1.npy")
    for kind, gallery in galleries.items():
        ids = gallery.ids()  # ascending: the items' order of addition, so row i of the data is ids[i]
        top = np.concatenate([searches[kind](qcodes[s:s + batch], qfloat[s:s + batch]).ids[:, 0]
                              for s in range(0, n, batch)])
        out[kind]["recall_at_1"] = float((top == ids[exact]).mean())
        out[kind]["searched_items"] = len(gallery)
    for kind in galleries:
        if kind != PLAIN:
            out[kind].update(plain_recall_at_1=out[PLAIN]["recall_at_1"], shortlist=shortlist)
    for gallery in galleries.values():
        gallery.close()
    return out


XOR_PASS = "numpy-xor-pass"
"""Timed beside the Hamming indexes: the first pass of the numpy scan alone (see :func:`_xor_pass`)."""


def _xor_pass(codes: np.ndarray):
    """The first pass of our numpy scan and nothing else: the XOR of one query with every code, in the
    numpy backend's block layout, into a reused buffer. Every numpy scan reads each code at least
    once like this, so its time over faiss's whole search is the closest numpy can come to faiss.

    Args:
      codes: uint8 ``(m, BITS // 8)``, m >= 1.

    Returns:
      A function of one uint8 ``(1, BITS // 8)`` query that returns the number of codes it XORed.
    """
    from edge_shitu.search import _WordBlocks

    blocks = [block for _, block in _WordBlocks.from_codes(np.ascontiguousarray(codes)).blocks()]
    buf = np.empty(blocks[0].shape, dtype=np.uint64)

    def run(q: np.ndarray) -> int:
        qw = q.view(np.uint64).T
        done = 0
        for block in blocks:
            np.bitwise_xor(block, qw, out=buf[:, :block.shape[1]])
            done += block.shape[1]
        return done

    return run


def _warm_ours(work: Path, backend: str, query: np.ndarray, k: int, compact: Optional[str] = None,
               feature: Optional[np.ndarray] = None) -> None:
    """Creates, searches and deletes a one-item gallery, so that the memory then measured for the real
    one is its own: the code pages of SQLite, faiss and numpy that the first search touches (several
    MB with faiss, as much as 5 bytes per item at 1M) are a cost per process, not per item. With
    ``compact``, the gallery keeps ``feature`` in that form and the search re-ranks with it."""
    from edge_shitu.gallery import Gallery

    path = work / "warm.gallery"
    with Gallery.create(path, fingerprint=FP, bits=BITS, overwrite=True, backend=backend, compact=compact) as g:
        g.add(query, ["warm-up"], features=feature)
        g.search(query, k, features=feature)
    for leftover in work.glob("warm.gallery*"):
        leftover.unlink()


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Opens one index in this (fresh) process: opening time and memory, and its search times unless
    :func:`_interleaved` takes them (the Hamming indexes), and the removal for ours-numpy."""
    kind, size, runs, warmup, k, batch = (spec[n] for n in ("kind", "size", "runs", "warmup", "k", "batch"))
    if kind == "hamming-interleaved":
        return _interleaved(spec)
    if kind == "rerank-interleaved":
        return _rerank_interleaved(spec)
    work = Path(spec["work"])
    qcodes = np.load(work / "queries.npy")
    out: Dict[str, Any] = {}
    if kind in ("ours-numpy", "ours-faiss"):
        from edge_shitu.gallery import Gallery

        backend = kind.split("-")[1]
        if backend == "faiss":
            import faiss

            faiss.omp_set_num_threads(1)
        _warm_ours(work, backend, qcodes[:1], k)
        before = _rss_bytes()
        t0 = time.perf_counter()
        gallery = Gallery.open(work / "ours.gallery", backend=backend)
        out["open_s"] = time.perf_counter() - t0
        out["memory_bytes"] = _rss_bytes() - before
        search = lambda q: gallery.search(q, k)  # noqa: E731
    elif kind in {_rerank_kind(fmt) for fmt in COMPACT_FORMATS}:
        from edge_shitu.gallery import Gallery

        fmt = kind.rsplit("-", 1)[1]
        _warm_ours(work, "numpy", qcodes[:1], k, compact=fmt, feature=np.load(work / "queries_float.npy")[:1])
        before = _rss_bytes()
        t0 = time.perf_counter()
        gallery = Gallery.open(work / f"rerank-{fmt}.gallery", backend="numpy")
        out["open_s"] = time.perf_counter() - t0
        out["memory_bytes"] = _rss_bytes() - before
        gallery.close()
        return out  # its search times come from _rerank_interleaved
    elif kind == "faiss-binary-flat":
        import faiss

        faiss.omp_set_num_threads(1)
        warm = faiss.IndexBinaryFlat(BITS)
        warm.add(qcodes)
        warm.search(qcodes[:1], k)
        del warm
        before = _rss_bytes()
        t0 = time.perf_counter()
        index = faiss.read_index_binary(str(work / "faiss.bindex"))
        out["open_s"] = time.perf_counter() - t0
        out["memory_bytes"] = _rss_bytes() - before
        search = lambda q: index.search(q, k)  # noqa: E731
    elif kind == "hnswlib-float":
        import hnswlib

        qcodes = np.load(work / "queries_float.npy")
        before = _rss_bytes()
        t0 = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=DIM)
        index.load_index(str(work / "hnsw.bin"), max_elements=size)
        index.set_ef(spec["ef_search"])
        index.set_num_threads(1)
        out["open_s"] = time.perf_counter() - t0
        out["memory_bytes"] = _rss_bytes() - before
        search = lambda q: index.knn_query(q, k=k)  # noqa: E731
        labels, _ = index.knn_query(qcodes, k=1)
        exact = np.load(work / "exact_top1.npy")
        out["recall_at_1"] = float((labels[:, 0].astype(np.int64) == exact).mean())
    elif kind == "float-flat":
        qcodes = np.load(work / "queries_float.npy")
        before = _rss_bytes()
        t0 = time.perf_counter()
        emb = np.load(work / "embeddings.npy")
        out["open_s"] = time.perf_counter() - t0
        out["memory_bytes"] = _rss_bytes() - before

        def search(q):
            scores = emb @ q.T
            top = np.argpartition(-scores, k - 1, axis=0)[:k]
            return top
    else:
        raise InvalidInputError(f"unknown benchmark child kind {kind!r}")
    n = qcodes.shape[0]
    if kind not in HAMMING_KINDS:  # those are timed together by _interleaved
        out["search_1_ms"] = _timed(lambda i: search(qcodes[i % n:i % n + 1]), runs, warmup)
        out["search_batch_ms"] = _timed(lambda i: search(qcodes[[(i + j) % n for j in range(batch)]]), runs, warmup)
    if kind in ("ours-numpy", "ours-faiss") and spec.get("remove"):
        ids = gallery.ids()
        gone = np.random.default_rng(1).choice(ids, size=min(spec["remove"], ids.size - 1), replace=False)
        t0 = time.perf_counter()
        gallery.remove(gone)
        out["remove_s"] = time.perf_counter() - t0
        out["removed"] = int(gone.size)
        out["search_1_after_remove_ms"] = _timed(lambda i: search(qcodes[i % n:i % n + 1]), runs, warmup)
        out["file_bytes_after_remove"] = (work / "ours.gallery").stat().st_size
        gallery.close()
    return out


def _run_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    env = {**os.environ, **_THREAD_ENV}
    proc = subprocess.run([sys.executable, "-m", "edge_shitu_bench.index", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise report.BenchmarkError(
            f"index benchmark: {spec['kind']} at {spec['size']} items failed (exit {proc.returncode}): "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- builds (in this process)


def _build_ours(work: Path, codes: np.ndarray, labels: List[str], add_batch: int) -> float:
    from edge_shitu.gallery import Gallery

    path = work / "ours.gallery"
    t0 = time.perf_counter()
    with Gallery.create(path, fingerprint=FP, bits=BITS, overwrite=True, backend="numpy") as g:
        for start in range(0, codes.shape[0], add_batch):
            g.add(codes[start:start + add_batch], labels[start:start + add_batch])
    return time.perf_counter() - t0


def _build_rerank(work: Path, fmt: str, codes: np.ndarray, labels: List[str], features: Iterable[np.ndarray]) -> float:
    """Builds ``rerank-{fmt}.gallery``: the codes and labels of ours.gallery, each item's feature kept in
    ``fmt``, added with ``add_batches`` one chunk of features at a time. Returns the seconds spent in the
    gallery, without the time taken to draw the features again."""
    from edge_shitu.gallery import Gallery, ItemBatch

    drawing = 0.0

    def batches() -> Iterator[ItemBatch]:
        nonlocal drawing
        chunks, start = iter(features), 0
        while True:
            t0 = time.perf_counter()
            x = next(chunks, None)
            drawing += time.perf_counter() - t0
            if x is None:
                return
            stop = start + x.shape[0]
            yield ItemBatch(codes[start:stop], labels[start:stop], features=x)
            start = stop

    t0 = time.perf_counter()
    with Gallery.create(work / f"rerank-{fmt}.gallery", fingerprint=FP, bits=BITS, overwrite=True, backend="numpy",
                        compact=fmt) as g:
        g.add_batches(batches())
    return time.perf_counter() - t0 - drawing


def _build_faiss(work: Path, codes: np.ndarray) -> float:
    import faiss

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    index = faiss.IndexBinaryFlat(BITS)
    index.add(codes)
    faiss.write_index_binary(index, str(work / "faiss.bindex"))
    return time.perf_counter() - t0


def _reference_files_bytes(work: Path, codes: np.ndarray, labels: List[str], owner: np.ndarray) -> int:
    """vector.index (faiss binary Flat) + id_map.pkl ({id: "path<TAB>label"}) as build_gallery.py writes them."""
    import faiss

    ref = work / "reference"
    ref.mkdir(exist_ok=True)
    index = faiss.index_binary_factory(BITS, "BFlat")
    index.add(codes)
    faiss.write_index_binary(index, str(ref / "vector.index"))
    id_map = {int(i): f"gallery/{int(o)}/{int(i)}.jpg\t{lab}" for i, (o, lab) in enumerate(zip(owner, labels))}
    with open(ref / "id_map.pkl", "wb") as fh:
        pickle.dump(id_map, fh)
    total = (ref / "vector.index").stat().st_size + (ref / "id_map.pkl").stat().st_size
    shutil.rmtree(ref)
    return total


def _build_float(work: Path, emb: np.ndarray) -> Dict[str, Any]:
    import hnswlib

    np.save(work / "embeddings.npy", emb)
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=emb.shape[0], M=32, ef_construction=40, random_seed=0)
    # Building a million-item graph on one thread takes many minutes; the build uses every core
    # (and says so in the report), searches are single-threaded like everything else.
    index.set_num_threads(os.cpu_count() or 1)
    index.add_items(emb, np.arange(emb.shape[0]))
    build_s = time.perf_counter() - t0
    index.save_index(str(work / "hnsw.bin"))
    return {"build_s": build_s, "build_threads": os.cpu_count() or 1, "file_bytes": (work / "hnsw.bin").stat().st_size}


# ---------------------------------------------------------------- the run


def _measure_rerank(size: int, o: IndexBenchOptions, work: Path, base: Dict[str, Any], codes: np.ndarray,
                    labels: List[str], emb: Optional[np.ndarray]) -> Dict[str, Dict[str, Any]]:
    """The re-ranked galleries' rows (and, under :data:`PLAIN`, the plain search's recall@1). Runs before
    the removal from ours.gallery, whose codes the plain search reads."""
    rows: Dict[str, Dict[str, Any]] = {}
    for fmt in o.rerank:
        build_s = _build_rerank(work, fmt, codes, labels, _embedding_chunks(size, o.seed, emb))
        kind = _rerank_kind(fmt)
        rows[kind] = {"build_s": build_s, "file_bytes": (work / f"rerank-{fmt}.gallery").stat().st_size,
                      **_run_child({**base, "kind": kind})}
    timings = _run_child({**base, "kind": "rerank-interleaved", "formats": list(o.rerank), "shortlist": o.shortlist})
    for kind, found in timings.items():
        rows.setdefault(kind, {}).update(found)
    return rows


def _measure_size(size: int, o: IndexBenchOptions, work: Path) -> Dict[str, Any]:
    want_float = size <= o.float_max
    owner, codes, emb, qfloat, qcodes = _synthetic(size, o.queries, o.seed, want_float)
    labels = _labels(owner)
    np.save(work / "queries.npy", qcodes)
    np.save(work / "queries_float.npy", qfloat)
    np.save(work / "exact_top1.npy", _exact_top1(_embedding_chunks(size, o.seed, emb), qfloat))
    base = {"size": size, "runs": o.runs, "warmup": o.warmup, "k": o.k, "batch": o.batch, "work": str(work)}
    rows: Dict[str, Dict[str, Any]] = {}

    build_s = _build_ours(work, codes, labels, o.add_batch)
    disk = (work / "ours.gallery").stat().st_size
    faiss_build = _build_faiss(work, codes)
    rows["faiss-binary-flat"] = {"build_s": faiss_build, "file_bytes": (work / "faiss.bindex").stat().st_size,
                                 **_run_child({**base, "kind": "faiss-binary-flat"})}
    rows["ours-faiss"] = {"build_s": build_s, "file_bytes": disk, **_run_child({**base, "kind": "ours-faiss"})}
    # Opening, memory and removal come from each index's own process; search times from one process
    # that alternates the three (see _interleaved). The removal changes the gallery file: it runs last.
    timings = _run_child({**base, "kind": "hamming-interleaved"})
    reranked = _measure_rerank(size, o, work, base, codes, labels, emb) if o.rerank else {}
    rows["ours-numpy"] = {"build_s": build_s, "file_bytes": disk,
                          **_run_child({**base, "kind": "ours-numpy", "remove": o.remove})}
    for kind, found in timings.items():
        rows[kind].update(found)
    if reranked:
        rows[PLAIN]["recall_at_1"] = reranked.pop(PLAIN)["recall_at_1"]
    rows = {**{kind: rows[kind] for kind in HAMMING_KINDS}, **reranked}
    rows["reference-files"] = {"file_bytes": _reference_files_bytes(work, codes, labels, owner)}
    if want_float:
        built = _build_float(work, emb)
        rows["hnswlib-float"] = {**built, **_run_child({**base, "kind": "hnswlib-float", "ef_search": 64})}
        rows["float-flat"] = {"build_s": 0.0, "file_bytes": (work / "embeddings.npy").stat().st_size,
                              **_run_child({**base, "kind": "float-flat"})}
    for name in os.listdir(work):
        (work / name).unlink()

    baseline = rows["faiss-binary-flat"]
    for row in rows.values():
        for key in ("file_bytes", "memory_bytes"):
            if key in row:
                row[key.replace("_bytes", "_bytes_per_item")] = row[key] / size
        for key in ("search_1_ms", "search_batch_ms"):
            if key in row:
                row[key.replace("_ms", "_ratio_to_faiss")] = report.ratio(row[key]["p50"], baseline[key]["p50"])
        if "xor_pass_ms" in row:
            row["xor_pass_ratio_to_faiss"] = report.ratio(row["xor_pass_ms"]["p50"], baseline["search_1_ms"]["p50"])
        if "search_1_ms" in row:
            row["batch_over_single"] = report.ratio(row["search_batch_ms"]["p50"], row["search_1_ms"]["p50"])
    return {"size": size, "float_built": want_float, "indexes": rows}


def markdown(result: Dict[str, Any]) -> str:
    """The report as Markdown: one table row per (size, index), then the numpy scan's floor, the re-ranked
    galleries against the plain search and the removal timings."""
    headers = ["size", "index", "disk B/item", "memory B/item", "build s", "open s", "1 query p50 ms",
               "× faiss", f"batch of {result['options']['batch']} p50 ms", "× faiss", "batch / 1", "recall@1"]
    rows = []
    for entry in result["sizes"]:
        for name, r in entry["indexes"].items():
            f = lambda v, d=1: None if v is None else f"{v:.{d}f}"  # noqa: E731
            rows.append([f"{entry['size']:,}", name, f(r.get("file_bytes_per_item")),
                         f(r.get("memory_bytes_per_item")), f(r.get("build_s"), 2), f(r.get("open_s"), 3),
                         f(r.get("search_1_ms", {}).get("p50"), 2), f(r.get("search_1_ratio_to_faiss"), 2),
                         f(r.get("search_batch_ms", {}).get("p50"), 2), f(r.get("search_batch_ratio_to_faiss"), 2),
                         f(r.get("batch_over_single"), 2), f(r.get("recall_at_1"), 3)])
    lines = [f"# Index benchmark ({result['created']})", "",
             f"Machine: {result['machine'].get('cpu_model')}, {result['machine'].get('logical_cpus')} logical CPUs; "
             f"one search thread; top-{result['options']['k']}; synthetic clustered 512-d data (see bench/index.py).",
             "", report.markdown_table(headers, rows), ""]
    floors = [(e["size"], e["indexes"]["ours-numpy"]) for e in result["sizes"]
              if "xor_pass_ms" in e["indexes"]["ours-numpy"]]
    if floors:
        lines += ["The numpy scan's floor: its first pass alone (the XOR of the query with every code, no "
                  "popcount, no top-k), against raw faiss's whole one-query search:", "",
                  report.markdown_table(["size", "XOR pass p50 ms", "× faiss", "whole numpy search × faiss"],
                                        [[f"{s:,}", f"{r['xor_pass_ms']['p50']:.2f}",
                                          f"{r['xor_pass_ratio_to_faiss']:.2f}",
                                          f"{r['search_1_ratio_to_faiss']:.2f}"] for s, r in floors]), ""]
    reranked = [(e["size"], name, r) for e in result["sizes"] for name, r in e["indexes"].items()
                if "search_1_ratio_to_plain" in r]
    if reranked:
        f = lambda v, d: f"{v:.{d}f}"  # noqa: E731
        shortlist = result["options"].get("shortlist", DEFAULT_SHORTLIST)
        lines += [f"Re-ranked galleries: the Hamming top-{shortlist} re-ranked by inner product with each item's "
                  "compact feature, timed alternately with the plain search of the same codes (ours-numpy) in one process; "
                  "\"+ ms\" is the median over rounds of the time re-ranking added to the plain search of the same "
                  "queries; recall@1 against exact float inner product:", "",
                  report.markdown_table(
                      ["size", "index", "disk B/item", "memory B/item", "open s", "1 query p50 ms", "× plain", "+ ms",
                       f"batch of {result['options']['batch']} p50 ms", "× plain", "+ ms", "recall@1",
                       "plain recall@1"],
                      [[f"{s:,}", name, f(r["file_bytes_per_item"], 1), f(r["memory_bytes_per_item"], 1),
                        f(r["open_s"], 3), f(r["search_1_ms"]["p50"], 3), f(r["search_1_ratio_to_plain"], 2),
                        f(r["search_1_extra_ms"], 3), f(r["search_batch_ms"]["p50"], 3),
                        f(r["search_batch_ratio_to_plain"], 2), f(r["search_batch_extra_ms"], 3),
                        f(r["recall_at_1"], 3), f(r["plain_recall_at_1"], 3)] for s, name, r in reranked]), ""]
    removes = [(e["size"], e["indexes"]["ours-numpy"]) for e in result["sizes"] if "remove_s" in e["indexes"]["ours-numpy"]]
    if removes:
        lines += ["Our gallery after removing items (one transaction):", "",
                  report.markdown_table(["size", "removed", "remove s", "1 query p50 ms after"],
                                        [[f"{s:,}", r["removed"], f"{r['remove_s']:.2f}",
                                          f"{r['search_1_after_remove_ms']['p50']:.2f}"] for s, r in removes]), ""]
    return "\n".join(lines)


def _chart(result: Dict[str, Any], path: Path) -> Path:
    mpl = report.require_matplotlib()
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({n for e in result["sizes"] for n in e["indexes"]})
    # One colour per index in both panels: its 1-query and batch lines would otherwise outrun the 10-colour cycle.
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for number, name in enumerate(names):
        colour = colours(number % colours.N)
        sizes = [e["size"] for e in result["sizes"] if name in e["indexes"]]
        rows = [e["indexes"][name] for e in result["sizes"] if name in e["indexes"]]
        per_item = [r.get("file_bytes_per_item") for r in rows]
        ax1.plot(sizes, per_item, marker="o", color=colour, label=name)
        if all("search_1_ms" in r for r in rows):
            ax2.plot(sizes, [r["search_1_ms"]["p50"] for r in rows], marker="o", color=colour,
                     label=f"{name} (1 query)")
            ax2.plot(sizes, [r["search_batch_ms"]["p50"] for r in rows], marker="x", linestyle="--", color=colour,
                     label=f"{name} (batch of {result['options']['batch']})")
    for ax, title, ylabel in ((ax1, "Size on disk", "bytes per item"), (ax2, "Search latency, p50, 1 thread", "ms")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size (items)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(options: IndexBenchOptions) -> Dict[str, Any]:
    """Runs the benchmark and writes index.json, index.md and (with ``chart``) index.png.

    Args:
      options: what to measure.

    Returns:
      The report (as written to index.json).

    Raises:
      BackendUnavailableError: faiss-cpu, hnswlib or (for the chart) matplotlib is missing.
      BenchmarkError: a measurement process failed.
    """
    for module, what in (("faiss", "faiss-cpu"), ("hnswlib", "hnswlib")):
        try:
            __import__(module)
        except ImportError:
            from edge_shitu.errors import BackendUnavailableError

            raise BackendUnavailableError(f"the index benchmark needs {what}: {report.BENCH_EXTRA_HINT}") from None
    if options.chart:
        report.require_matplotlib()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = options.work is None
    work = Path(tempfile.mkdtemp(prefix="edge-shitu-index-")) if own_work else Path(options.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        sizes = [_measure_size(size, options, work) for size in options.sizes]
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "index",
        "created": report.utc_now(),
        "machine": report.machine_info(),
        "versions": report.package_versions(["numpy", "faiss-cpu", "hnswlib", "edge-shitu"]),
        "threads": 1,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "baseline": "faiss-binary-flat",
        "sizes": sizes,
    }
    report.write_json(out / "index.json", result)
    report.write_text(out / "index.md", markdown(result))
    if options.chart:
        _chart(result, out / "index.png")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m edge_shitu_bench.index [options]``: the same as ``edge-shitu bench index [options]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"] and len(args) == 2:
        print(json.dumps(_child(json.loads(args[1]))))
        return 0
    from edge_shitu.cli import main as cli_main

    return cli_main(["bench", "index", *args])


if __name__ == "__main__":
    sys.exit(main())
