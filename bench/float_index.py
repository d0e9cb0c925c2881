"""Float index benchmark: recall and latency of the HNSW settings of :mod:`edge_shitu.float_index`.

For each gallery size it builds an hnswlib graph the way :class:`~edge_shitu.float_index.FloatIndex`
does (inner product on L2-normalised float32 vectors, ``M`` and ``ef_construction`` from
:class:`~edge_shitu.float_index.FloatIndexOptions`, labels = item ids) and measures:

- build time (on ``--build-threads`` threads, 1 by default) and the index file's size per item
  (what ``<gallery>.hnsw`` takes on disk; hnswlib holds the same bytes in memory once loaded);
- for every efSearch in ``--efs`` (16, faiss's default that the PaddleClas reference keeps, up to 512):
  recall@1 and recall@5 against exact search (a numpy matrix product, in chunks), and the latency
  of one query (k = 5) on one thread, p50/p90/p99 over all queries after a warm-up;
- the smallest efSearch whose recall@1 reaches ``--target-recall``.

It measures hnswlib with FloatIndex's settings, not the gallery around it: reading embeddings from
SQLite and the wrapper's checks (a few microseconds per query) are not included.

Data: synthetic and deterministic. ``--centres`` random centres in ``--dim`` dimensions; each item and
each query is a centre plus Gaussian noise (``--noise`` per coordinate, against unit-variance
centres), L2-normalised. With the default noise an item is at cosine ~0.73 from the other items of
its cluster and ~0 from the rest, so the exact nearest neighbour is one of many near-equidistant
cluster members: a harder case than a real gallery, whose few views of one product are much closer.

Run ``python -m edge_shitu_bench.float_index --sizes 10000,145000 --out DIR``; it writes
``float_index.json`` and ``float_index.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.errors import BackendUnavailableError, EdgeShituError, InvalidInputError
from edge_shitu.float_index import FloatIndexOptions
from edge_shitu_bench import report

__all__ = ["FloatIndexBenchOptions", "run", "markdown", "main"]

_K = 5
_CHUNK = 65536


@dataclass(frozen=True)
class FloatIndexBenchOptions:
    """What the float index benchmark measures.

    Attributes:
      sizes: gallery sizes (items), each >= 100.
      out: output folder for float_index.json / float_index.md.
      dim: embedding dimension (512 for PP-LCNetV2).
      queries: query vectors; recall is averaged and latency taken over all of them.
      efs: efSearch values to measure, each >= 5 (the k of the measurement).
      target_recall: recall@1 the reported efSearch must reach, in (0, 1].
      centres: clusters of the synthetic data.
      noise: standard deviation of the per-coordinate noise around a centre.
      m: hnswlib M (FloatIndex's default).
      ef_construction: hnswlib ef_construction (FloatIndex's default).
      build_threads: threads that build the graph (searches always run on one).
      warmup: untimed queries before the timed ones, per efSearch.
      seed: seed of the synthetic data.
    """

    sizes: Tuple[int, ...] = (10_000, 145_000, 1_000_000)
    out: Path = Path("bench-out/float_index")
    dim: int = 512
    queries: int = 200
    efs: Tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    target_recall: float = 0.99
    centres: int = 1000
    noise: float = 0.6
    m: int = FloatIndexOptions.m
    ef_construction: int = FloatIndexOptions.ef_construction
    build_threads: int = 1
    warmup: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 100 for s in self.sizes):
            raise InvalidInputError(f"sizes must be integers >= 100, got {self.sizes!r}")
        if not self.efs or any(isinstance(e, bool) or not isinstance(e, int) or e < _K for e in self.efs):
            raise InvalidInputError(f"efs must be integers >= {_K} (the k measured), got {self.efs!r}")
        for name in ("dim", "queries", "centres", "build_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InvalidInputError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidInputError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if not self.noise >= 0.0:
            raise InvalidInputError(f"noise must be >= 0, got {self.noise!r}")
        # The same checks as the index itself (m range, ef_construction >= m).
        FloatIndexOptions(m=self.m, ef_construction=self.ef_construction)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _synthetic(size: int, options: FloatIndexBenchOptions) -> Tuple[np.ndarray, np.ndarray]:
    """Items float32 ``(size, dim)`` and queries float32 ``(queries, dim)``, unit rows."""
    rng = np.random.default_rng(options.seed)
    centres = rng.standard_normal((options.centres, options.dim), dtype=np.float32)
    items = np.empty((size, options.dim), dtype=np.float32)
    for start in range(0, size, _CHUNK):
        stop = min(size, start + _CHUNK)
        owner = rng.integers(0, options.centres, stop - start)
        items[start:stop] = centres[owner] + options.noise * rng.standard_normal((stop - start, options.dim),
                                                                                 dtype=np.float32)
        _unit_rows(items[start:stop])
    owner = rng.integers(0, options.centres, options.queries)
    queries = centres[owner] + options.noise * rng.standard_normal((options.queries, options.dim), dtype=np.float32)
    return items, _unit_rows(queries)


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k by a matrix product over chunks of items.

    Args:
      queries: float32 ``(q, d)``.
      items: float32 ``(n, d)``; row i has id i.
      k: neighbours, <= n.

    Returns:
      int64 ``(q, k)`` ids by decreasing similarity (ties by ascending id).
    """
    best_sims = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, items.shape[0], _CHUNK):
        sims = queries @ items[start:start + _CHUNK].T
        ids = np.broadcast_to(np.arange(start, start + sims.shape[1], dtype=np.int64), sims.shape)
        sims = np.concatenate([best_sims, sims], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        order = np.lexsort((ids, -sims), axis=-1)[:, :k]
        best_sims, best_ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
    return best_ids


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = [len(set(f[:k]) & set(t[:k])) for f, t in zip(found.tolist(), truth.tolist())]
    return float(np.mean(hits)) / k


def _measure_size(hnswlib: Any, size: int, options: FloatIndexBenchOptions, work: Path) -> Dict[str, Any]:
    items, queries = _synthetic(size, options)
    t0 = time.perf_counter()
    truth = exact_top_k(queries, items, _K)
    exact_s = time.perf_counter() - t0

    index = hnswlib.Index(space="ip", dim=options.dim)
    t0 = time.perf_counter()
    index.init_index(max_elements=size, M=options.m, ef_construction=options.ef_construction)
    index.set_num_threads(options.build_threads)
    for start in range(0, size, _CHUNK):
        stop = min(size, start + _CHUNK)
        index.add_items(items[start:stop], np.arange(start, stop, dtype=np.uint64), num_threads=options.build_threads)
    build_s = time.perf_counter() - t0
    path = work / f"float-{size}.hnsw"
    index.save_index(str(path))
    file_bytes = path.stat().st_size
    path.unlink()
    del items

    index.set_num_threads(1)
    by_ef: List[Dict[str, Any]] = []
    for ef in options.efs:
        index.set_ef(ef)
        found, _ = index.knn_query(queries, k=_K, num_threads=1)
        found = found.astype(np.int64)
        for i in range(min(options.warmup, options.queries)):
            index.knn_query(queries[i:i + 1], k=_K, num_threads=1)
        samples = []
        for i in range(options.queries):
            t = time.perf_counter()
            index.knn_query(queries[i:i + 1], k=_K, num_threads=1)
            samples.append((time.perf_counter() - t) * 1e3)
        by_ef.append({"ef_search": ef, "recall_at_1": _recall(found, truth, 1), "recall_at_5": _recall(found, truth, 5),
                      "query_ms": report.summarize(samples)})
    reaching = [row["ef_search"] for row in by_ef if row["recall_at_1"] >= options.target_recall]
    return {
        "size": size,
        "build_s": build_s,
        "build_threads": options.build_threads,
        "file_bytes": file_bytes,
        "file_bytes_per_item": file_bytes / size,
        "exact_search_s": exact_s,
        "by_ef": by_ef,
        "smallest_ef_reaching_target": min(reaching) if reaching else None,
    }


def markdown(result: Dict[str, Any]) -> str:
    """The report as Markdown: one table of every size and efSearch, then the efSearch needed per size.

    Args:
      result: what :func:`run` returns.

    Returns:
      Markdown text.
    """
    o = result["options"]
    lines = [
        "# Float index (hnswlib) benchmark",
        "",
        f"hnswlib inner product on L2-normalised float32, M={o['m']}, ef_construction={o['ef_construction']}, "
        f"dim {o['dim']}; {o['queries']} queries, k={_K}; synthetic data: {o['centres']} centres + noise "
        f"{o['noise']}, seed {o['seed']}. Build on {o['build_threads']} thread(s); every query on 1 thread, "
        f"one at a time. Recall against exact inner-product search. Created {result['created']}.",
        "",
    ]
    rows = []
    for entry in result["sizes"]:
        for row in entry["by_ef"]:
            rows.append([entry["size"], f"{entry['build_s']:.1f}", f"{entry['file_bytes_per_item']:.0f}",
                         row["ef_search"], f"{row['recall_at_1']:.3f}", f"{row['recall_at_5']:.3f}",
                         f"{row['query_ms']['p50']:.3f}", f"{row['query_ms']['p99']:.3f}"])
    lines.append(report.markdown_table(
        ["items", "build s", "file bytes/item", "efSearch", "recall@1", "recall@5", "p50 ms", "p99 ms"], rows))
    lines += ["", f"Smallest efSearch reaching recall@1 >= {o['target_recall']}:", ""]
    lines.append(report.markdown_table(
        ["items", "efSearch"],
        [[e["size"], e["smallest_ef_reaching_target"] if e["smallest_ef_reaching_target"] is not None
          else f"none of {', '.join(map(str, o['efs']))}"] for e in result["sizes"]]))
    return "\n".join(lines)


def run(options: FloatIndexBenchOptions) -> Dict[str, Any]:
    """Runs the benchmark and writes float_index.json and float_index.md.

    Args:
      options: what to measure.

    Returns:
      The report (as written to float_index.json).

    Raises:
      BackendUnavailableError: hnswlib is not installed.
      OSError: the output folder cannot be written.
    """
    try:
        import hnswlib
    except ImportError:
        raise BackendUnavailableError(f"the float index benchmark needs hnswlib: {report.BENCH_EXTRA_HINT}") from None
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-shitu-float-index-") as work:
        sizes = [_measure_size(hnswlib, size, options, Path(work)) for size in options.sizes]
    result = {
        "benchmark": "float_index",
        "created": report.utc_now(),
        "machine": report.machine_info(),
        "versions": report.package_versions(["numpy", "hnswlib", "edge-shitu"]),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "k": _K,
        "sizes": sizes,
    }
    report.write_json(out / "float_index.json", result)
    report.write_text(out / "float_index.md", markdown(result))
    return result


def _ints(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m edge_shitu_bench.float_index [options]``.

    Returns:
      0 on success, 1 when the benchmark could not run (the reason is printed to stderr).
    """
    d = FloatIndexBenchOptions()
    parser = argparse.ArgumentParser(prog="python -m edge_shitu_bench.float_index",
                                     description="Recall and latency of hnswlib float search per efSearch.")
    parser.add_argument("--sizes", type=_ints, default=d.sizes, help="comma-separated gallery sizes")
    parser.add_argument("--dim", type=int, default=d.dim)
    parser.add_argument("--queries", type=int, default=d.queries)
    parser.add_argument("--efs", type=_ints, default=d.efs, help="comma-separated efSearch values")
    parser.add_argument("--target-recall", type=float, default=d.target_recall)
    parser.add_argument("--centres", type=int, default=d.centres)
    parser.add_argument("--noise", type=float, default=d.noise)
    parser.add_argument("--m", type=int, default=d.m)
    parser.add_argument("--ef-construction", type=int, default=d.ef_construction)
    parser.add_argument("--build-threads", type=int, default=d.build_threads)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", type=Path, default=d.out)
    args = parser.parse_args(argv)
    try:
        options = FloatIndexBenchOptions(
            sizes=args.sizes, out=args.out, dim=args.dim, queries=args.queries, efs=args.efs,
            target_recall=args.target_recall, centres=args.centres, noise=args.noise, m=args.m,
            ef_construction=args.ef_construction, build_threads=args.build_threads, warmup=args.warmup,
            seed=args.seed)
        result = run(options)
    except (EdgeShituError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
