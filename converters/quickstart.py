"""``edge-shitu quickstart``: models -> bundle -> drink gallery -> recognise the drink test images.

Every artefact is kept under a work folder and reused on the next run when it still verifies, so the
second run only recognises and makes no network access.

Data: ``--shared DIR`` or ``$EDGE_SHITU_SHARED`` when given (nothing else is tried), else ``../shared``
when it holds the data set, else the official ``drink_dataset_v1.0.tar`` pinned in ``models.lock``,
from the cache or fetched (from ``--mirror`` when given). Models: a ready bundle (``--bundle``), or
the official archives converted here (needs the ``convert`` extra); when the official weights cannot
be had, replicas (the official graphs with random weights), and the output says so on every line
that could be mistaken for a recognition result.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional, TextIO, Tuple

from edge_shitu_converters.paddle_io import INSTALL_HINT, native_output_to
from edge_shitu_converters.shared import DET_GRAPH, DRINK, GRAPHS, REC_GRAPH, SHARED_ENV_VAR, find_shared
from edge_shitu.bundle import Bundle
from edge_shitu.errors import BackendUnavailableError, EdgeShituError, FetchError, InvalidInputError, MissingFileError

__all__ = ["run", "default_work_dir", "OFFICIAL", "DATASET"]

log = logging.getLogger(__name__)

OFFICIAL = {"detector": "picodet-mainbody", "extractor": "ppshituv2-extractor"}
"""models.lock names of the official model archives the quickstart uses, by role."""

DATASET = "drink-dataset-v1"
"""models.lock name of the demo data set the quickstart uses."""

# What converting the official models needs beyond the runtime.
_CONVERT_MODULES = ("paddle", "paddle2onnx", "onnx")


def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/edge-shitu/quickstart`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-shitu" / "quickstart"


def _explicit_shared(shared: Optional[str]) -> bool:
    return shared is not None or bool(os.environ.get(SHARED_ENV_VAR))


def _shared_folder(shared: Optional[str], need: str) -> Optional[Path]:
    """The shared folder holding ``need``: one named explicitly must hold it; ``../shared`` only when present."""
    if _explicit_shared(shared):
        return find_shared(shared, needs=(need,))
    try:
        return find_shared(needs=(need,))
    except MissingFileError:
        return None


def _where_to_get_it(mirror: Optional[str]) -> str:
    if mirror is None:
        return (f"pass --mirror DIR (a folder laid out as <host>/<url path> holding the official archives) "
                f"or set {SHARED_ENV_VAR} to a folder holding {DRINK} and {GRAPHS}")
    return f"check the mirror, or set {SHARED_ENV_VAR} to a folder holding {DRINK} and {GRAPHS}"


def _drink_data(shared: Optional[str], work: Path, mirror: Optional[str], out: TextIO) -> Path:
    root = _shared_folder(shared, DRINK)
    if root is not None:
        out.write(f"      data: {root / DRINK} (shared folder)\n")
        return root / DRINK
    from edge_shitu_converters import fetch

    try:
        report = fetch.fetch(DATASET, cache_dir=work / "data", mirror=mirror)
    except FetchError as exc:
        raise FetchError(f"the drink demo data set is in no shared folder nor in the cache, and fetching it "
                         f"failed: {exc}; {_where_to_get_it(mirror)}") from exc
    state = "cached, verified" if report.cached else f"fetched from {report.source}, verified"
    out.write(f"      data: {report.model_dir} ({state})\n")
    return report.model_dir


def _official_models(work: Path, mirror: Optional[str]) -> Dict[str, Path]:
    from edge_shitu_converters import fetch

    lock = fetch.load_lock()
    return {role: fetch.fetch(name, cache_dir=work / "models", mirror=mirror, lock=lock).model_dir
            for role, name in OFFICIAL.items()}


def _replica_graphs(shared: Optional[str], work: Path, mirror: Optional[str], *, try_fetch: bool) -> Dict[str, Path]:
    """Folders holding the official programs: the shared graphs, else the official archives (their
    ``inference.pdmodel`` is pinned in models.lock; their weights are not used)."""
    root = _shared_folder(shared, GRAPHS)
    if root is not None:
        return {"detector": root / GRAPHS / DET_GRAPH, "extractor": root / GRAPHS / REC_GRAPH}
    if try_fetch:
        try:
            return _official_models(work, mirror)
        except FetchError as exc:
            raise FetchError(f"replicas need the official graphs, which are in no shared folder, and fetching the "
                             f"official archives failed: {exc}; {_where_to_get_it(mirror)}") from exc
    raise FetchError(f"replicas need the official graphs, which are in no shared folder, and the official archives "
                     f"could not be fetched; {_where_to_get_it(mirror)}")


def _replica_models(graphs: Dict[str, Path], work: Path) -> Dict[str, Path]:
    from edge_shitu_converters.replica import write_replica

    out = {}
    for role, graph_dir in graphs.items():
        dest = work / "replicas" / graph_dir.name
        if not ((dest / "replica.json").is_file() and (dest / "inference.pdiparams").is_file()):
            write_replica(graph_dir, dest, seed=0)
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


def run(*, shared: Optional[str] = None, work: Optional[str] = None, models: Optional[str] = None,
        bundle: Optional[str] = None, mirror: Optional[str] = None, threads: Optional[int] = None,
        limit: Optional[int] = None, out: TextIO, err: TextIO) -> int:
    """Run the quickstart and print results and per-stage timings to ``out``.

    Args:
      shared: the shared data folder; default ``$EDGE_SHITU_SHARED``, else ``../shared`` when present.
      work: where artefacts are kept; default :func:`default_work_dir`.
      models: ``"auto"`` (the default: official weights when they can be had, else replicas),
        ``"official"`` or ``"replica"``.
      bundle: a ready bundle to use instead of converting models (excludes ``models``).
      mirror: a mirror of the official hosts (see :func:`edge_shitu_converters.fetch.fetch`).
      threads: inference threads per model.
      limit: use only the first ``limit`` gallery images.
      out: where progress and results go.
      err: where warnings go.

    Returns:
      0.

    Raises:
      MissingFileError: the shared folder given (or in ``$EDGE_SHITU_SHARED``) lacks what is needed.
      FetchError: the data set is in no shared folder nor the cache and cannot be fetched; or the
        models cannot be had (official weights with ``models="official"``; graphs for replicas).
        The message says what to pass (``--mirror DIR`` or ``EDGE_SHITU_SHARED``).
      BackendUnavailableError: no ``bundle`` and the ``convert`` extra is not installed.
      InvalidInputError: an unknown ``models`` choice, or both ``models`` and ``bundle``.
    """
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import build_gallery
    from edge_shitu.gallery import Gallery
    from edge_shitu.labelfile import read_label_file
    from edge_shitu.options import BackendOptions, DetectorOptions, EmbedderOptions, RecognizerOptions
    from edge_shitu.recognizer import STAGES, Recognizer

    if models not in (None, "auto", "official", "replica"):
        raise InvalidInputError(f"models must be auto, official or replica, got {models!r}")
    if bundle is not None and models is not None:
        raise InvalidInputError(f"give either a bundle or models={models!r}, not both: the bundle holds the models")
    missing = [m for m in _CONVERT_MODULES if importlib.util.find_spec(m) is None]
    if bundle is None and missing:
        raise BackendUnavailableError(
            f"converting the official models needs the 'convert' extra (missing: {', '.join(missing)}); "
            f"run: {INSTALL_HINT}, or pass --bundle DIR (a bundle made with `edge-shitu convert`)"
        )
    models = models or "auto"
    work_dir = Path(work) if work else default_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "convert.log"
    out.write(f"[1/4] data and models (work folder {work_dir})\n")
    drink = _drink_data(shared, work_dir, mirror, out)
    if bundle is not None:
        out.write(f"      models: the given bundle\n[2/4] bundle {bundle}\n")
        loaded = Bundle.load(bundle)
        kind = "given"
    else:
        kind = "replica"
        if models in ("auto", "official"):
            try:
                model_dirs = _official_models(work_dir, mirror)
                kind = "official"
            except FetchError as exc:
                if models == "official":
                    raise FetchError(f"{exc}; {_where_to_get_it(mirror)}") from exc
                out.write(f"      official weights unavailable ({exc})\n")
        if kind == "replica":
            graphs = _replica_graphs(shared, work_dir, mirror, try_fetch=models == "replica")
            out.write("      -> using REPLICAS: the official graphs with deterministic random weights.\n"
                      "         Same architecture, cost and code paths; labels below are MEANINGLESS.\n")
            with native_output_to(log_path):
                model_dirs = _replica_models(graphs, work_dir)
        for role, d in model_dirs.items():
            out.write(f"      {role}: {d}\n")

        out.write(f"[2/4] bundle (Paddle -> ONNX, detector cut at its raw heads; log: {log_path})\n")
        with native_output_to(log_path):
            loaded = _bundle(model_dirs, work_dir / f"bundle-{kind}-fp32")
    for role, spec in loaded.models.items():
        out.write(f"      {role}: {spec.path.name} {spec.path.stat().st_size / 1e6:.1f} MB sha256 {spec.sha256[:12]}\n")

    out.write("[3/4] gallery from drink_dataset_v1.0/gallery\n")
    gallery_path = work_dir / f"drink-gallery-{kind}.db"
    entries = read_label_file(drink / "gallery" / "drink_label.txt")
    if limit is not None:
        entries = entries[:limit]
    backend = BackendOptions(threads=threads)
    reuse = False
    if gallery_path.is_file() and limit is None:
        try:
            with Gallery.open(gallery_path, fingerprint=loaded.code_fingerprint, readonly=True) as g:
                reuse = len(g) > 0
                if reuse:
                    out.write(f"      reusing {gallery_path} ({len(g)} items)\n")
        except EdgeShituError as exc:
            log.info("rebuilding %s: %s", gallery_path, exc)
    if not reuse:
        with Embedder.from_bundle(loaded, options=EmbedderOptions(backend=backend)) as emb:
            summary = build_gallery(loaded, drink / "gallery", entries, gallery_path, embedder=emb, overwrite=True,
                                    on_skip=lambda p, why: out.write(f"      skipped: {why}\n"))
        out.write(f"      {gallery_path}: {summary.added} added, {len(summary.skipped)} skipped, "
                  f"{summary.labels} labels\n")

    out.write("[4/4] recognise drink_dataset_v1.0/test_images\n")
    images = sorted(p for p in (drink / "test_images").iterdir() if p.is_file())
    det_opts = DetectorOptions.from_mapping(loaded.detector.defaults, backend=backend)
    options = RecognizerOptions(detector=det_opts, embedder=EmbedderOptions(backend=backend))
    timings: Dict[str, List[float]] = {k: [] for k in STAGES}
    tag = " [replica: meaningless]" if loaded.is_replica else ""
    with Recognizer.from_bundle(loaded, gallery_path, options=options) as rec:
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
    if loaded.is_replica:
        out.write("NOTE: replica models: the pipeline, formats and timings are real; the labels are not.\n")
    return 0


def _fmt_box(box: Tuple[float, float, float, float]) -> str:
    return "box " + ",".join(str(int(round(v))) for v in box)
