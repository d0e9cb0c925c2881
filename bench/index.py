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
(hnswlib's build is slow on 2 cores).

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu_bench import report
from edge_shitu.errors import InvalidInputError

__all__ = ["IndexBenchOptions", "run", "markdown", "main"]

DIM = 512
BITS = 512
FP = "be0c0000"
_LABEL_FALLBACK = ("cola", "green tea", "orange juice", "sparkling water", "milk tea")
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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

    def __post_init__(self) -> None:
        if not self.sizes or any(not isinstance(s, int) or s < 100 for s in self.sizes):
            raise InvalidInputError(f"sizes must be integers >= 100, got {self.sizes!r}")
        for name in ("queries", "runs", "k", "batch", "add_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.batch > self.queries:
            raise InvalidInputError(f"batch ({self.batch}) cannot exceed queries ({self.queries})")
        for name in ("warmup", "float_max", "remove"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")


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


def _synthetic(size: int, queries: int, seed: int, want_float: bool):
    """Codes (and embeddings) of ``size`` items around ``size // 5`` centres, plus query draws."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, size // 5), DIM), dtype=np.float32)
    owner = rng.integers(0, centres.shape[0], size)
    codes = np.empty((size, BITS // 8), dtype=np.uint8)
    emb = np.empty((size, DIM), dtype=np.float32) if want_float else None
    for start in range(0, size, 65536):
        stop = min(size, start + 65536)
        x = centres[owner[start:stop]] + 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        codes[start:stop] = np.packbits(x > 0, axis=1)
        if emb is not None:
            emb[start:stop] = x
    q = centres[rng.integers(0, centres.shape[0], queries)] + 0.6 * rng.standard_normal((queries, DIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return owner, codes, emb, q.astype(np.float32), np.packbits(q > 0, axis=1)


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
            ("search_1_ms", lambda i: qcodes[i % n:i % n + 1], HAMMING_KINDS + (XOR_PASS,)),
            ("search_batch_ms", lambda i: qcodes[[(i + j) % n for j in range(batch)]], HAMMING_KINDS)):
        samples: Dict[str, List[float]] = {kind: [] for kind in kinds}
        for i in range(warmup + runs):
            q = pick(i)
            for turn in range(len(kinds)):
                kind = kinds[(i + turn) % len(kinds)]
                t0 = time.perf_counter()
                searches[kind](q)
                if i >= warmup:
                    samples[kind].append((time.perf_counter() - t0) * 1e3)
        for kind in kinds:
            out.setdefault(kind, {})[key] = report.summarize(samples[kind])
    out["ours-numpy"]["xor_pass_ms"] = out.pop(XOR_PASS)["search_1_ms"]
    out["ours-numpy"]["searched_items"] = len(numpy_gallery)
    out["ours-faiss"]["searched_items"] = len(faiss_gallery)
    out["faiss-binary-flat"]["searched_items"] = int(raw.ntotal)
    numpy_gallery.close()
    faiss_gallery.close()
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


def _warm_ours(work: Path, backend: str, query: np.ndarray, k: int) -> None:
    """Creates, searches and deletes a one-item gallery, so that the memory then measured for the real
    one is its own: the code pages of SQLite, faiss and numpy that the first search touches (several
    MB with faiss, as much as 5 bytes per item at 1M) are a cost per process, not per item."""
    from edge_shitu.gallery import Gallery

    path = work / "warm.gallery"
    with Gallery.create(path, fingerprint=FP, bits=BITS, overwrite=True, backend=backend) as g:
        g.add(query, ["warm-up"])
        g.search(query, k)
    for leftover in work.glob("warm.gallery*"):
        leftover.unlink()


def _child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Opens one index in this (fresh) process: opening time and memory, and its search times unless
    :func:`_interleaved` takes them (the Hamming indexes), and the removal for ours-numpy."""
    kind, size, runs, warmup, k, batch = (spec[n] for n in ("kind", "size", "runs", "warmup", "k", "batch"))
    if kind == "hamming-interleaved":
        return _interleaved(spec)
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


def _build_float(work: Path, emb: np.ndarray, qfloat: np.ndarray) -> Dict[str, Any]:
    import hnswlib

    np.save(work / "embeddings.npy", emb)
    np.save(work / "queries_float.npy", qfloat)
    np.save(work / "exact_top1.npy", np.argmax(qfloat @ emb.T, axis=1).astype(np.int64))
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


def _measure_size(size: int, o: IndexBenchOptions, work: Path) -> Dict[str, Any]:
    want_float = size <= o.float_max
    owner, codes, emb, qfloat, qcodes = _synthetic(size, o.queries, o.seed, want_float)
    labels = _labels(owner)
    np.save(work / "queries.npy", qcodes)
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
    rows["ours-numpy"] = {"build_s": build_s, "file_bytes": disk,
                          **_run_child({**base, "kind": "ours-numpy", "remove": o.remove})}
    for kind, found in timings.items():
        rows[kind].update(found)
    rows = {kind: rows[kind] for kind in HAMMING_KINDS}
    rows["reference-files"] = {"file_bytes": _reference_files_bytes(work, codes, labels, owner)}
    if want_float:
        built = _build_float(work, emb, qfloat)
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
    """The report as Markdown: one table row per (size, index), then the removal timings."""
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
    for name in names:
        sizes = [e["size"] for e in result["sizes"] if name in e["indexes"]]
        rows = [e["indexes"][name] for e in result["sizes"] if name in e["indexes"]]
        per_item = [r.get("file_bytes_per_item") for r in rows]
        ax1.plot(sizes, per_item, marker="o", label=name)
        if all("search_1_ms" in r for r in rows):
            ax2.plot(sizes, [r["search_1_ms"]["p50"] for r in rows], marker="o", label=f"{name} (1 query)")
            ax2.plot(sizes, [r["search_batch_ms"]["p50"] for r in rows], marker="x", linestyle="--",
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
