"""``edge-shitu quickstart``: models -> bundle -> drink gallery -> recognise the drink test images.

Every artefact is kept under a work folder and reused on the next run when it still verifies, so the
second run only recognises. Official weights are used when they can be fetched (or are cached);
otherwise replicas are built from the shared graphs, and the output says so on every line that could
be mistaken for a recognition result.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, TextIO, Tuple

from edge_shitu_converters.paddle_io import native_output_to
from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH, find_shared
from edge_shitu.bundle import Bundle
from edge_shitu.errors import EdgeShituError, FetchError, InvalidInputError

__all__ = ["run", "default_work_dir"]

log = logging.getLogger(__name__)

# models.lock names of the official archives the quickstart uses.
OFFICIAL = {"detector": "picodet-mainbody", "extractor": "ppshituv2-extractor"}


def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/edge-shitu/quickstart`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-shitu" / "quickstart"


def _official_models(work: Path, mirror: Optional[str]) -> Dict[str, Path]:
    from edge_shitu_converters import fetch

    lock = fetch.load_lock()
    return {role: fetch.fetch(name, cache_dir=work / "models", mirror=mirror, lock=lock, timeout=20).model_dir
            for role, name in OFFICIAL.items()}


def _replica_models(shared: Path, work: Path) -> Dict[str, Path]:
    from edge_shitu_converters.replica import write_replica

    graphs = shared / "models" / "ppshitu-graphs"
    out = {}
    for role, graph in (("detector", DET_GRAPH), ("extractor", REC_GRAPH)):
        dest = work / "replicas" / graph
        if not ((dest / "replica.json").is_file() and (dest / "inference.pdiparams").is_file()):
            write_replica(graphs / graph, dest, seed=0)
        out[role] = dest
    return out


def _bundle(models: Dict[str, Path], dest: Path) -> Bundle:
    from edge_shitu_converters.convert import convert

    if (dest / "manifest.json").is_file():
        try:
            return Bundle.load(dest)
        except EdgeShituError as exc:
            log.info("rebuilding %s: %s", dest, exc)
    return Bundle.load(convert(models["detector"], models["extractor"], dest, precision="fp32"))


def run(*, shared: Optional[str] = None, work: Optional[str] = None, models: str = "auto",
        mirror: Optional[str] = None, threads: Optional[int] = None, limit: Optional[int] = None,
        out: TextIO, err: TextIO) -> int:
    """Run the quickstart and print results and per-stage timings to ``out``.

    Raises:
      MissingFileError: the shared data folder cannot be found.
      FetchError: ``models="official"`` and the official weights cannot be fetched.
      InvalidInputError: an unknown ``models`` choice.
    """
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import build_gallery
    from edge_shitu.gallery import Gallery
    from edge_shitu.labelfile import read_label_file
    from edge_shitu.options import BackendOptions, DetectorOptions, EmbedderOptions, RecognizerOptions
    from edge_shitu.recognizer import STAGES, Recognizer

    if models not in ("auto", "official", "replica"):
        raise InvalidInputError(f"models must be auto, official or replica, got {models!r}")
    shared_dir = find_shared(shared)
    work_dir = Path(work) if work else default_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    out.write(f"[1/4] models (work folder {work_dir})\n")
    kind = "replica"
    log_path = work_dir / "convert.log"
    if models in ("auto", "official"):
        try:
            model_dirs = _official_models(work_dir, mirror)
            kind = "official"
        except (FetchError, OSError) as exc:
            if models == "official":
                raise
            out.write(f"      official weights unavailable ({exc})\n")
    if kind == "replica":
        out.write("      -> using REPLICAS: the official graphs with deterministic random weights.\n"
                  "         Same architecture, cost and code paths; labels below are MEANINGLESS.\n")
        with native_output_to(log_path):
            model_dirs = _replica_models(shared_dir, work_dir)
    for role, d in model_dirs.items():
        out.write(f"      {role}: {d}\n")

    out.write(f"[2/4] bundle (Paddle -> ONNX, detector cut at its raw heads; log: {log_path})\n")
    with native_output_to(log_path):
        bundle = _bundle(model_dirs, work_dir / f"bundle-{kind}-fp32")
    for role, spec in bundle.models.items():
        out.write(f"      {role}: {spec.path.name} {spec.path.stat().st_size / 1e6:.1f} MB sha256 {spec.sha256[:12]}\n")

    out.write("[3/4] gallery from drink_dataset_v1.0/gallery\n")
    drink = shared_dir / "data" / "drink_dataset_v1.0"
    gallery_path = work_dir / f"drink-gallery-{kind}.db"
    entries = read_label_file(drink / "gallery" / "drink_label.txt")
    if limit is not None:
        entries = entries[:limit]
    backend = BackendOptions(threads=threads)
    reuse = False
    if gallery_path.is_file() and limit is None:
        try:
            with Gallery.open(gallery_path, fingerprint=bundle.code_fingerprint, readonly=True) as g:
                reuse = len(g) > 0
                if reuse:
                    out.write(f"      reusing {gallery_path} ({len(g)} items)\n")
        except EdgeShituError as exc:
            log.info("rebuilding %s: %s", gallery_path, exc)
    if not reuse:
        with Embedder.from_bundle(bundle, options=EmbedderOptions(backend=backend)) as emb:
            summary = build_gallery(bundle, drink / "gallery", entries, gallery_path, embedder=emb, overwrite=True,
                                    on_skip=lambda p, why: out.write(f"      skipped: {why}\n"))
        out.write(f"      {gallery_path}: {summary.added} added, {len(summary.skipped)} skipped, "
                  f"{summary.labels} labels\n")

    out.write("[4/4] recognise drink_dataset_v1.0/test_images\n")
    images = sorted(p for p in (drink / "test_images").iterdir() if p.is_file())
    det_opts = DetectorOptions.from_mapping(bundle.detector.defaults, backend=backend)
    options = RecognizerOptions(detector=det_opts, embedder=EmbedderOptions(backend=backend))
    timings: Dict[str, List[float]] = {k: [] for k in STAGES}
    tag = " [replica: meaningless]" if bundle.is_replica else ""
    with Recognizer.from_bundle(bundle, gallery_path, options=options) as rec:
        rec.recognize(images[0])  # warm-up: first-run allocations are not representative
        for img in images:
            res = rec.recognize(img)
            for k in STAGES:
                timings[k].append(res.timings_ms[k])
            found = ", ".join(
                f"{r.label} (d={r.distance}, {'whole image' if r.whole_image else _fmt_box(r.box)})"
                for r in res.recognitions) or "nothing within max_distance"
            out.write(f"      {img.name}: {found}{tag}\n")
    out.write("per-stage time, median over %d images (ms):\n" % len(images))
    out.write("      " + "  ".join(f"{k} {statistics.median(v):.1f}" for k, v in timings.items()) + "\n")
    if bundle.is_replica:
        out.write("NOTE: replica models: the pipeline, formats and timings are real; the labels are not.\n")
    return 0


def _fmt_box(box: Tuple[float, float, float, float]) -> str:
    return "box " + ",".join(str(int(round(v))) for v in box)
