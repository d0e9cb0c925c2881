"""``edge-shitu bench``: benchmarks (the ``bench`` extra), registered through the ``edge_shitu.commands``
entry point. ``bench latency`` measures per-stage latency of bundles side by side with the reference
pipeline; ``bench index`` measures gallery size and search speed against faiss, hnswlib and the
reference's files. The harnesses are imported only when a benchmark runs."""

from __future__ import annotations

import argparse
from typing import Any, Dict, TextIO

__all__ = ["register"]


def register(subparsers: Any, groups: Dict[str, Any]) -> None:
    """Add the ``bench`` command group and ``bench latency``; ``groups["bench"]`` holds its subparsers."""
    from edge_shitu.cli.common import missing_extra

    note = missing_extra("bench", ("cv2", "paddle", "faiss", "hnswlib", "matplotlib", "psutil"))
    bench = subparsers.add_parser("bench", help="benchmarks: latency against the reference, index size and speed"
                                  + note)
    sub = bench.add_subparsers(dest="bench_cmd", metavar="BENCHMARK", required=True)
    groups["bench"] = sub

    lat = sub.add_parser(
        "latency", help="per-stage latency (p50/p90/p99) and peak memory of bundles, side by side",
        description="Per-stage latency and peak memory of one or more bundles (and the reference pipeline with "
                    "--reference), each configuration in its own subprocess, beside this CPU's fp32 and int8 GEMM "
                    "rates and the fraction of them each model reaches; writes latency.json, latency.md "
                    "and latency.png into --out.")
    _latency_arguments(lat)
    lat.set_defaults(func=_cmd_latency)

    idx = sub.add_parser(
        "index", help="gallery size, open time and search latency against faiss, hnswlib and the reference",
        description="Bytes per item on disk and in memory, build and open time, and search p50 (one query, a "
                    "batch of 6) of edge-shitu galleries (numpy and faiss search), faiss IndexBinaryFlat, "
                    "hnswlib float (M=32, ef_search 64), exact float search and galleries re-ranked by compact "
                    "features (--rerank), plus the size of the "
                    "reference's gallery files, at each --sizes; writes index.json, index.md and index.png.")
    idx.add_argument("--sizes", default="10000,145000,1000000", help="comma-separated gallery sizes")
    idx.add_argument("--out", default="bench-index", metavar="DIR", help="output folder (default ./bench-index)")
    idx.add_argument("--work", default=None, metavar="DIR", help="folder for the index files (default: temporary)")
    idx.add_argument("--runs", type=int, default=31, help="timed searches per measurement (default 31)")
    idx.add_argument("--warmup", type=int, default=3, help="untimed searches first (default 3)")
    idx.add_argument("--float-max", type=int, default=1_000_000, metavar="N",
                     help="build the float indexes only up to N items (default 1000000)")
    idx.add_argument("--rerank", default="int8,fp16", metavar="FORMATS",
                     help="re-ranked galleries to measure: comma-separated compact formats (int8, fp16) or none "
                          "(default int8,fp16)")
    idx.add_argument("--no-chart", action="store_true", help="do not draw index.png")
    idx.set_defaults(func=_cmd_index)

    kio = sub.add_parser(
        "kiosk", help="load on the kiosk service: N clients posting camera frames on loopback",
        description="Starts `edge-shitu serve` on a free loopback port and, for each client count, posts JPEG "
                    "frames (the photos at 640 px, as the browser UI sends them) from that many clients for at "
                    "most --seconds and --max-requests; prints p50/p99 latency, frames per second, errors and "
                    "the service's resident memory, against the same pipeline called in-process. Writes "
                    "kiosk.json and kiosk.md; exits 1 when any request failed.")
    kio.add_argument("--bundle", required=True, metavar="B", help="the bundle to serve")
    kio.add_argument("--images", required=True, metavar="DIR", help="folder of photos: the first 8 are the frames")
    kio.add_argument("--gallery", default=None, metavar="G.db",
                     help="gallery to serve (default: one built from the frames in a temporary folder)")
    kio.add_argument("--clients", default="1,2,4", help="comma-separated client counts, one row each (default 1,2,4)")
    kio.add_argument("--seconds", type=float, default=20.0, help="longest time of a row (default 20)")
    kio.add_argument("--max-requests", type=int, default=2000, help="most requests of a row (default 2000)")
    kio.add_argument("--threads", type=int, default=None, help="the service's model threads (default: backend's)")
    kio.add_argument("--out", default="bench-kiosk", metavar="DIR", help="output folder (default ./bench-kiosk)")
    kio.set_defaults(func=_cmd_kiosk)


def _latency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", action="append", required=True, metavar="B",
                   help="a bundle folder; repeat for several (the first is the baseline unless --reference)")
    p.add_argument("--reference", action="store_true",
                   help="also run the reference pipeline (Paddle Inference, OpenCV, faiss) as the baseline")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images, used in name order")
    p.add_argument("--threads", default="1", help="comma-separated thread counts, one row each (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up passes over the images, discarded (default 1)")
    p.add_argument("--runs", type=int, default=5, help="timed passes over the images (default 5)")
    p.add_argument("--out", default="bench-latency", metavar="DIR", help="output folder (default ./bench-latency)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="use only the first N images")
    p.add_argument("--gallery", default=None, metavar="G.db", help="gallery to search (default: built in --out)")
    p.add_argument("--gallery-limit", type=int, default=None, metavar="N",
                   help="build the default gallery from the first N drink gallery images (default: all)")
    p.add_argument("--whole-image", choices=["if_none", "always", "never"], default=None,
                   help="edge-shitu's whole-image policy (default: each bundle's)")
    p.add_argument("--search-backend", choices=["auto", "numpy", "faiss"], default="auto",
                   help="edge-shitu's Hamming search backend (default auto: faiss when installed)")
    p.add_argument("--reference-det", default=None, metavar="DIR",
                   help="reference detector Paddle folder (default: the shared official graph; replica without weights)")
    p.add_argument("--reference-rec", default=None, metavar="DIR", help="reference extractor Paddle folder (idem)")
    p.add_argument("--reference-no-mkldnn", action="store_true",
                   help="run the reference's Paddle without MKLDNN (its configuration turns MKLDNN on)")
    p.add_argument("--shared", default=None, metavar="DIR",
                   help="shared data folder (default: ../shared or $EDGE_SHITU_SHARED)")
    p.add_argument("--gemm-runs", type=int, default=5, metavar="N",
                   help="timed runs of each GEMM-rate measurement (fp32 and int8 2048³ in onnxruntime, before and "
                        "after each --threads count's configurations) that model GMAC/s are compared with (default 5; "
                        "0 skips the GEMM rates, model GMAC and fractions)")
    p.add_argument("--session-config", action="append", default=None, metavar="KEY=VALUE",
                   help="an onnxruntime session config entry for the bundles' sessions, over the backend's own "
                        "(repeatable); e.g. session.intra_op.allow_spinning=1 for onnxruntime's default spinning")


def _cmd_latency(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from edge_shitu.cli.common import EXIT_OK, heavy

    latency = heavy("edge_shitu_bench.latency", "bench")
    options = latency.options_from_args(args)

    def progress(line: str) -> None:
        err.write(f"bench: {line}\n")
        err.flush()

    result = latency.run(args.bundle, Path(args.images), Path(args.out), options=options, progress=progress,
                         command=_command_line(args))
    out.write(result.markdown + "\n")
    err.write(f"bench: wrote {result.json_path}, {result.markdown_path}, {result.chart_path}\n")
    return EXIT_OK


def _cmd_index(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from edge_shitu.cli.common import EXIT_OK, heavy
    from edge_shitu.errors import InvalidInputError

    index = heavy("edge_shitu_bench.index", "bench")
    try:
        sizes = tuple(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise InvalidInputError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    from pathlib import Path

    options = index.IndexBenchOptions(sizes=sizes, out=Path(args.out), work=None if args.work is None else Path(args.work),
                                      runs=args.runs, warmup=args.warmup, float_max=args.float_max,
                                      chart=not args.no_chart, rerank=index.parse_rerank(args.rerank))
    result = index.run(options)
    out.write(index.markdown(result) + "\n")
    err.write(f"bench: wrote {Path(args.out) / 'index.json'}, index.md"
              f"{', index.png' if options.chart else ''}\n")
    return EXIT_OK


def _cmd_kiosk(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from edge_shitu.cli.common import EXIT_FAILURE, EXIT_OK, heavy
    from edge_shitu.errors import InvalidInputError

    heavy("starlette", "kiosk")
    load = heavy("edge_shitu_bench.kiosk_load", "bench")
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
    except ValueError:
        raise InvalidInputError(f"--clients must be comma-separated whole numbers, got {args.clients!r}") from None
    options = load.KioskLoadOptions(bundle=Path(args.bundle), images=Path(args.images), out=Path(args.out),
                                    gallery=None if args.gallery is None else Path(args.gallery), clients=clients,
                                    seconds=args.seconds, max_requests=args.max_requests, threads=args.threads)

    def progress(line: str) -> None:
        err.write(f"bench: {line}\n")
        err.flush()

    report = load.run(options, progress=progress)
    out.write(load.markdown(report) + "\n")
    err.write(f"bench: wrote {Path(args.out) / 'kiosk.json'}, kiosk.md\n")
    return EXIT_FAILURE if any(r["errors"] for r in report["rows"]) else EXIT_OK


def _command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from the parsed arguments (recorded in the report)."""
    import shlex

    words = ["edge-shitu", "bench", "latency"]
    for bundle in args.bundle:
        words += ["--bundle", bundle]
    if args.reference:
        words.append("--reference")
    words += ["--images", args.images, "--threads", args.threads, "--warmup", str(args.warmup),
              "--runs", str(args.runs), "--out", args.out]
    if args.search_backend != "auto":
        words += ["--search-backend", args.search_backend]
    for flag in ("max_images", "gallery", "gallery_limit", "whole_image", "reference_det", "reference_rec", "shared"):
        value = getattr(args, flag)
        if value is not None:
            words += ["--" + flag.replace("_", "-"), str(value)]
    if args.reference_no_mkldnn:
        words.append("--reference-no-mkldnn")
    if args.gemm_runs != 5:
        words += ["--gemm-runs", str(args.gemm_runs)]
    for item in args.session_config or ():
        words += ["--session-config", item]
    return " ".join(shlex.quote(str(w)) for w in words)
