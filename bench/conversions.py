"""Bundle sizes, agreement and model latency for every conversion path, as a Markdown table.

    python -m edge_shitu_bench.conversions [--work DIR] [--calib DIR] [--images DIR] [--runs N] [--out FILE]

Builds seed-0 replicas of the official graphs, converts them to every (format, precision) this machine can
build, verifies each against Paddle Inference on real photos (``convert --verify``: x86-runnable bundles
are compared, arm bundles are recorded as unverifiable here), and times the raw model calls of the bundles
that run here (median over ``--runs`` after a warm-up, one thread, the same pre-processed photo).

Replica weights are random: the agreement figures measure conversion fidelity, never recognition
accuracy, and the replica detector is unusually sensitive to quantisation (its class scores are nearly a
sign test, see converters/replica.py), so its INT8 agreement is a worst case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH, find_shared
from edge_shitu.bundle import Bundle
from edge_shitu.errors import EdgeShituError

# (format, precision, models): x86 Lite INT8 detectors are refused by the converter (Paddle-Lite's x86
# INT8 kernels compute that network wrongly), so that bundle holds the extractor only.
PLAN = [
    ("onnx", "fp32", ("detector", "extractor")),
    ("onnx", "int8", ("detector", "extractor")),
    ("lite-x86", "fp32", ("detector", "extractor")),
    ("lite-x86", "int8", ("extractor",)),
    ("lite-arm", "fp32", ("detector", "extractor")),
    ("lite-arm", "int8", ("detector", "extractor")),
]


def _time_model(spec, session, runs: int) -> float:
    batch = 1 if spec.input.shape[0] == -1 else spec.input.shape[0]
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(spec.input.shape[1:])).astype(np.float32)
    feeds = {spec.input.name: x}
    session.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _latency(bundle: Bundle, runs: int, lite_python: Optional[Path]) -> Dict[str, Optional[float]]:
    from edge_shitu.backends import create_session
    from edge_shitu.backends.paddlelite import machine_target

    out: Dict[str, Optional[float]] = {}
    for role, spec in bundle.models.items():
        if spec.backend == "paddlelite":
            if spec.target != machine_target() or lite_python is None:
                out[role] = None
                continue
            from edge_shitu_converters.lite_worker import SideEnvSession

            session = SideEnvSession(spec, python=lite_python)
        else:
            session = create_session(spec, threads=1)
        try:
            out[role] = _time_model(spec, session, runs)
        finally:
            session.close()
    return out


def run(work: Path, calib: Path, images: Path, runs: int) -> List[dict]:
    """Build, verify and time every bundle of :data:`PLAN`; return one row per bundle."""
    from edge_shitu_converters.convert import convert
    from edge_shitu_converters.replica import write_replica

    shared = find_shared()
    graphs = shared / "models" / "ppshitu-graphs"
    replicas = {}
    for role, graph in (("detector", DET_GRAPH), ("extractor", REC_GRAPH)):
        dest = work / "replicas" / graph
        if not (dest / "replica.json").is_file():
            write_replica(graphs / graph, dest, seed=0)
        replicas[role] = dest
    try:
        from edge_shitu_converters.lite_worker import find_lite_python

        lite_python: Optional[Path] = find_lite_python()
    except EdgeShituError:
        lite_python = None
    rows = []
    for fmt, precision, roles in PLAN:
        out = work / f"{fmt}-{precision}"
        failed = work / f"{out.name}.verify-failed.json"
        if not (out / "manifest.json").is_file():
            kwargs = {"calib_dir": calib} if precision == "int8" else {}
            if fmt.startswith("lite") and lite_python is not None:
                kwargs["lite_python"] = lite_python
            try:
                convert(replicas["detector"] if "detector" in roles else None, replicas["extractor"], out,
                        format=fmt, precision=precision, verify=True, verify_images=images, **kwargs)
            except EdgeShituError as exc:
                if not failed.is_file():
                    raise
                # Below the thresholds: keep the figures, build the bundle without --verify for its size.
                print(f"{fmt} {precision}: {exc}", file=sys.stderr)
                convert(replicas["detector"] if "detector" in roles else None, replicas["extractor"], out,
                        format=fmt, precision=precision, **kwargs)
                (out / "verify.json").write_bytes(failed.read_bytes())
        bundle = Bundle.load(out)
        rows.append({
            "format": fmt, "precision": precision,
            "bytes": {r: m.path.stat().st_size for r, m in bundle.models.items()},
            "verification": bundle.verification,
            "latency_ms": _latency(bundle, runs, lite_python),
        })
    return rows


def markdown(rows: List[dict]) -> str:
    """The README tables: sizes and latency, then agreement."""
    mb = lambda b: f"{b / 1e6:.1f}" if b is not None else "—"
    ms = lambda v: f"{v:.1f}" if v is not None else "n/a"
    lines = ["| format | precision | detector MB | extractor MB | total MB | detector ms | extractor ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["bytes"], r["latency_ms"]
        total = sum(b.values())
        lines.append(f"| {r['format']} | {r['precision']} | {mb(b.get('detector'))} | {mb(b.get('extractor'))} | "
                     f"{total / 1e6:.1f} | {ms(t.get('detector'))} | {ms(t.get('extractor'))} |")
    lines += ["", "| format | precision | verified | extractor: min cosine / mean bits equal / min bits equal | "
                  "detector: boxes matched (IoU ≥ 0.9) / max score diff |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["verification"] or {}
        if v.get("passed") is None:
            lines.append(f"| {r['format']} | {r['precision']} | not here ({v.get('unverifiable', 'never')[:40]}…) | | |")
            continue
        e, d = v.get("extractor"), v.get("detector")
        ext = f"{e['min_cosine']:.5f} / {e['mean_bit_agreement']:.4f} / {e['min_bit_agreement']:.4f}" if e else "—"
        det = f"{d['match_rate']:.3f} / {d['max_score_diff']:.3g}" if d else "—"
        lines.append(f"| {r['format']} | {r['precision']} | {'pass' if v['passed'] else 'FAIL'} | {ext} | {det} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    shared = find_shared()
    drink = shared / "data" / "drink_dataset_v1.0"
    p = argparse.ArgumentParser(prog="python -m edge_shitu_bench.conversions", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="conversions-out", help="where replicas and bundles are kept (reused)")
    p.add_argument("--calib", default=str(drink / "gallery"), help="calibration photos for int8")
    p.add_argument("--images", default=str(drink / "test_images"), help="photos for verification")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    from edge_shitu_converters.paddle_io import native_output_to

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # Paddle and paddle2onnx print from native code; keep the table on stdout clean.
    with native_output_to(work / "conversions.log"):
        rows = run(work, Path(args.calib), Path(args.images), args.runs)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
