"""Per-stage latency of edge-shitu bundles, side by side with the reference pipeline.

    edge-shitu bench latency --bundle B [--bundle B2 ...] [--reference] --images DIR [--threads 1,2]
                             [--warmup N] [--runs N] [--out DIR] [--gallery G.db | --gallery-limit N]
                             [--gemm-runs N] [--session-config KEY=VALUE ...]

Every configuration (a bundle, or the reference pipeline of ``edge_shitu_bench.reference``) runs in a fresh
subprocess per thread count, on the same images in the same (name) order: ``--warmup`` passes over the
images are discarded, then ``--runs`` passes are timed, image by image. Each stage (decode, detector
pre-process / inference / post-process, crops + extractor pre-process, extractor inference, binarisation,
search, final NMS, total) is reported as p50 / p90 / p99 in ms, with the peak resident memory of that
subprocess (``VmHWM`` on Linux, see ``edge_shitu_bench.report.peak_rss_mb``; imports and model loading included).
Ratios are each configuration's p50 divided by the first configuration's p50 at the same thread count;
with ``--reference`` the reference is that first configuration, the baseline.

Gallery: ``--gallery G.db``, or by default one built in the out dir from the drink gallery
(``drink_label.txt``, the first ``--gallery-limit`` images) with the first bundle. Bundles whose
extractor differs get a gallery holding the same codes and labels under their own fingerprint (search
cost does not depend on the code values). The reference searches its own faiss ``IndexBinaryFlat``:
built from the same gallery images with its own pre-processing and Paddle extractor, or, with
``--gallery``, from that gallery's codes.

The reference's models: ``--reference-det/--reference-rec`` folders, else the official graphs in the
shared folder; without their weights, replicas with the first bundle's replica seed are written into the
out dir (a replica costs what the real model costs).

Against the machine (``edge_shitu_bench.machine``): in the same run, this CPU's GEMM rates are measured with
onnxruntime (an fp32 ``MatMul`` and a u8 × s8 ``MatMulInteger`` of 2048³, ``--gemm-runs`` timed runs each,
median) at each ``--threads`` count just before and just after that count's configurations (and at one thread
first when 1 is not among them), and each ONNX model's MACs are counted from its graph (the detector at its
fixed input, the extractor per crop). Each configuration then reports per model its GMAC/s and the fraction
of the rate of its precision at its thread count, the mean of the two bracketing measurements (fp32 models
against the fp32 rate, int8 models against the int8 rate), and the fraction of the mixed limit (its float
MACs at the fp32 rate, its integer MACs at the int8 rate). ``--gemm-runs 0`` skips all of this.

``--session-config KEY=VALUE`` (repeatable) changes an onnxruntime session config entry of the bundles' sessions
in the measured subprocesses, over the backend's own (``edge_shitu.backends.onnxruntime.SESSION_CONFIG``): e.g.
``session.intra_op.allow_spinning=1`` measures onnxruntime's default spinning against the backend's.

Output in ``--out``: ``latency.json`` (machine, versions, threads, image count, every sample),
``latency.md`` and ``latency.png`` (stage medians stacked per configuration). Also ``python -m
edge_shitu_bench.latency`` with the same arguments; ``python -m edge_shitu_bench.latency --worker JOB.json`` is the
subprocess entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from edge_shitu_bench import report
from edge_shitu_bench.report import BenchmarkError
import edge_shitu
from edge_shitu.errors import BackendUnavailableError, EdgeShituError, InvalidInputError, MissingFileError
from edge_shitu.recognizer import STAGES
from edge_shitu.options import check_threads

__all__ = ["LatencyOptions", "LatencyRun", "STAGE_TITLES", "IMAGE_SUFFIXES", "parse_threads", "parse_session_config",
           "list_images", "run", "summarize_configuration", "model_fractions", "markdown", "chart", "options_from_args",
           "main"]

STAGE_TITLES = {
    "decode": "decode",
    "det_pre": "detector pre-process",
    "det_infer": "detector inference",
    "det_post": "detector post-process",
    "rec_pre": "crops + extractor pre-process",
    "rec_infer": "extractor inference",
    "rec_post": "L2 + binarise",
    "search": "search",
    "nms": "final NMS",
    "total": "total",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REFERENCE_LABEL = "reference"
_VERSIONED = ("edge-shitu", "numpy", "pillow", "onnxruntime", "onnx", "paddlepaddle",
              ("opencv-python-headless", "opencv-python"), "faiss-cpu", "matplotlib")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class LatencyOptions:
    """How the latency benchmark runs.

    Attributes:
      threads: thread counts; every configuration runs once per count (inference threads of each model,
        and OpenMP/BLAS/OpenCV threads of its process).
      warmup: passes over the images run first and discarded, >= 0.
      runs: timed passes over the images, >= 1.
      max_images: use only the first N images (name order); ``None`` for all.
      whole_image: edge-shitu's whole-image policy (``if_none``, ``always``, ``never``); ``None`` takes each
        bundle's default. The reference always adds the whole image.
      search_backend: edge-shitu's Hamming search backend (``auto``, ``numpy``, ``faiss``).
      gallery: an existing gallery to search; ``None`` builds one from the drink gallery.
      gallery_limit: when building, use the first N images of ``drink_label.txt``; ``None`` for all.
      reference: also run the reference pipeline, as the first configuration (the baseline).
      reference_det: the reference detector's Paddle folder; ``None``: the shared official graph.
      reference_rec: the reference extractor's Paddle folder; ``None``: the shared official graph.
      reference_mkldnn: run the reference's Paddle with MKLDNN, as its configuration does.
      shared: the shared data folder (default: ``edge_shitu_converters.shared.find_shared()``).
      gemm_runs: timed runs of each GEMM-rate measurement (one warm-up run before them), >= 0; ``0`` skips
        the comparison with the machine (GEMM rates, model MACs and fractions).
      session_config: onnxruntime session config entries (key, value) set over the backend's own for the
        bundles' sessions and the GEMM runs (see ``edge_shitu.backends.onnxruntime.SESSION_CONFIG``); empty: the
        backend's.
    """

    threads: Tuple[int, ...] = (1,)
    warmup: int = 1
    runs: int = 5
    max_images: Optional[int] = None
    whole_image: Optional[str] = None
    search_backend: str = "auto"
    gallery: Optional[Path] = None
    gallery_limit: Optional[int] = None
    reference: bool = False
    reference_det: Optional[Path] = None
    reference_rec: Optional[Path] = None
    reference_mkldnn: bool = True
    shared: Optional[Path] = None
    gemm_runs: int = 5
    session_config: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        threads = tuple(self.threads)
        if not threads:
            raise InvalidInputError("threads must be one or more thread counts")
        for t in threads:
            check_threads(t, name="--threads")
        if len(set(threads)) != len(threads):
            raise InvalidInputError(f"threads repeat a value: {list(threads)}")
        object.__setattr__(self, "threads", threads)
        for name, low in (("warmup", 0), ("runs", 1), ("gemm_runs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("max_images", "gallery_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be an int >= 1, got {value!r}")
        if self.search_backend not in ("auto", "numpy", "faiss"):
            raise InvalidInputError(f"search_backend must be auto, numpy or faiss, got {self.search_backend!r}")
        if self.whole_image not in (None, "if_none", "always", "never"):
            raise InvalidInputError(f"whole_image must be if_none, always or never, got {self.whole_image!r}")
        if self.gallery is not None and self.gallery_limit is not None:
            raise InvalidInputError("give either a gallery or gallery_limit (for the gallery built here), not both")
        config = tuple(tuple(item) if isinstance(item, (tuple, list)) else (item,) for item in self.session_config)
        if any(len(item) != 2 or not all(isinstance(x, str) and x for x in item) for item in config):
            raise InvalidInputError(f"session_config must be (key, value) pairs of non-empty strings, "
                                    f"got {list(self.session_config)!r}")
        keys = [key for key, _ in config]
        if len(set(keys)) != len(keys):
            raise InvalidInputError(f"session_config repeats a key: {keys}")
        object.__setattr__(self, "session_config", config)
        if not self.reference and (self.reference_det is not None or self.reference_rec is not None):
            raise InvalidInputError("reference model folders were given without reference=True (--reference)")


@dataclass
class LatencyRun:
    """What :func:`run` produced.

    Attributes:
      report: the JSON-ready report (also written to ``json_path``).
      markdown: the Markdown report (also written to ``markdown_path``).
      json_path, markdown_path, chart_path: the files written.
    """

    report: Dict[str, Any]
    markdown: str
    json_path: Path
    markdown_path: Path
    chart_path: Path


def parse_threads(text: str) -> Tuple[int, ...]:
    """Parse ``"1,2"`` into ``(1, 2)``.

    Raises:
      InvalidInputError: empty, not integers, < 1 or repeated.
    """
    try:
        values = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise InvalidInputError(f"--threads takes comma-separated integers such as 1,2; got {text!r}") from None
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise InvalidInputError(f"--threads takes distinct integers >= 1, got {text!r}")
    return values


def parse_session_config(items: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
    """Parse ``["session.intra_op.allow_spinning=1", ...]`` into ``(("session.intra_op.allow_spinning", "1"), ...)``.

    Raises:
      InvalidInputError: an item is not ``KEY=VALUE`` with a non-empty key and value.
    """
    parsed = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidInputError(f"--session-config takes KEY=VALUE (an onnxruntime session config entry), "
                                    f"got {item!r}")
        parsed.append((key.strip(), value.strip()))
    return tuple(parsed)


def list_images(images_dir: Path, max_images: Optional[int] = None) -> List[Path]:
    """The image files of a folder (not recursive), in name order, each checked to decode.

    Raises:
      MissingFileError: the folder does not exist.
      InvalidInputError: it holds no image file.
      ImageDecodeError: an image cannot be decoded.
    """
    from edge_shitu.image import load_image

    folder = Path(images_dir)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InvalidInputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) to benchmark with")
    paths = paths[:max_images] if max_images is not None else paths
    for p in paths:
        load_image(p)
    return paths


@dataclass
class _Config:
    label: str
    kind: str  # "bundle" or "reference"
    bundle: Optional[Path] = None
    gallery: Optional[Path] = None
    details: Dict[str, Any] = field(default_factory=dict)


def _labels(bundles: Sequence[Any]) -> List[str]:
    labels, seen = [], {}
    for b in bundles:
        name = b.path.name
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    if REFERENCE_LABEL in labels:
        labels = [f"{x} (bundle)" if x == REFERENCE_LABEL else x for x in labels]
    return labels


def _shared(options: LatencyOptions) -> Path:
    from edge_shitu_converters.shared import find_shared

    return find_shared(options.shared)


def _drink_entries(options: LatencyOptions) -> Tuple[Path, List[Any]]:
    from edge_shitu.labelfile import read_label_file

    try:
        root = _shared(options) / "data" / "drink_dataset_v1.0" / "gallery"
    except MissingFileError as exc:
        raise MissingFileError(f"{exc}; or give --gallery G.db") from None
    entries = [e for e in read_label_file(root / "drink_label.txt") if (root / e.path).is_file()]
    if options.gallery_limit is not None:
        entries = entries[:options.gallery_limit]
    return root, entries


def _copy_gallery(source: Path, dest: Path, fingerprint: str) -> None:
    from edge_shitu.gallery import Gallery

    with Gallery.open(source, readonly=True) as src:
        ids, codes = src.codes()
        labels = src.labels_of(ids)
        bits = src.bits
    with Gallery.create(dest, fingerprint=fingerprint, bits=bits, overwrite=True) as g:
        g.add(codes, labels, sources=[f"{source.name}#{int(i)}" for i in ids])


def _prepare_galleries(bundles: Sequence[Any], labels: Sequence[str], options: LatencyOptions, out: Path,
                       say: Progress) -> Tuple[Dict[str, Path], Dict[str, Any], Optional[Tuple[Path, List[Any]]]]:
    """Galleries per bundle label, a description, and the (root, entries) the default gallery came from."""
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import build_gallery
    from edge_shitu.gallery import Gallery
    from edge_shitu.options import BackendOptions, EmbedderOptions

    folder = out / "galleries"
    folder.mkdir(parents=True, exist_ok=True)
    first = bundles[0]
    source: Optional[Tuple[Path, List[Any]]] = None
    if options.gallery is not None:
        base = Path(options.gallery)
        if not base.is_file():
            raise MissingFileError(f"{base}: gallery not found")
        with Gallery.open(base, readonly=True) as g:
            count, fingerprint = len(g), g.fingerprint
        described = {"source": str(base), "built_here": False}
    else:
        root, entries = _drink_entries(options)
        if not entries:
            raise InvalidInputError(f"{root}: no gallery images to build a gallery from")
        source = (root, entries)
        fingerprint = first.code_fingerprint
        base = folder / f"drink-n{len(entries)}-{fingerprint[:12]}.db"
        reused = False
        if base.is_file():
            try:
                with Gallery.open(base, fingerprint=fingerprint, readonly=True) as g:
                    reused = len(g) > 0
            except EdgeShituError:
                reused = False
        if not reused:
            say(f"building the gallery {base.name} from {len(entries)} drink images with {labels[0]}")
            opts = EmbedderOptions(backend=BackendOptions(threads=max(options.threads)))
            with Embedder.from_bundle(first, options=opts) as emb:
                build_gallery(first, root, entries, base, embedder=emb, overwrite=True)
        with Gallery.open(base, readonly=True) as g:
            count = len(g)
        described = {"source": f"{root} (drink_label.txt, first {len(entries)} images)", "built_here": True,
                     "built_with": labels[0], "reused": reused}
    if count == 0:
        raise InvalidInputError(f"{base}: the gallery is empty; nothing to search")
    galleries: Dict[str, Path] = {}
    copies = []
    for bundle, label in zip(bundles, labels):
        if bundle.code_fingerprint == fingerprint:
            galleries[label] = base
            continue
        dest = folder / f"{base.stem}-as-{bundle.code_fingerprint[:12]}.db"
        _copy_gallery(base, dest, bundle.code_fingerprint)
        galleries[label] = dest
        copies.append(label)
    described.update(path=str(base), items=count, fingerprint=fingerprint,
                     same_codes_copied_for=copies)
    return galleries, described, source


def _reference_models(options: LatencyOptions, first: Any, out: Path, say: Progress) -> Tuple[Path, Path, Dict[str, Any]]:
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH

    chosen: Dict[str, Path] = {}
    info: Dict[str, Any] = {}
    for role, given, graph in (("detector", options.reference_det, DET_GRAPH), ("extractor", options.reference_rec, REC_GRAPH)):
        if given is not None:
            files = paddle_io.find_model_files(given)
            chosen[role] = files.directory
            info[role] = {"dir": str(files.directory), "weights": "given"}
            continue
        graph_dir = _shared(options) / "models" / "ppshitu-graphs" / graph
        files = paddle_io.find_model_files(graph_dir, need_params=False)
        if files.params.is_file():
            chosen[role] = files.directory
            info[role] = {"dir": str(files.directory), "weights": "official (found beside the graph)"}
            continue
        spec = first.models.get(role)
        seed = int(spec.source.get("seed", 0)) if spec is not None and spec.is_replica else 0
        dest = out / "reference-models" / graph
        stamp = dest / "replica.json"
        current = None
        if stamp.is_file():
            with contextlib.suppress(ValueError, OSError):
                current = json.loads(stamp.read_text(encoding="utf-8")).get("seed")
        if current != seed or not (dest / paddle_io.PDIPARAMS).is_file():
            from edge_shitu_converters.replica import write_replica

            say(f"writing a replica of the official {role} (seed {seed}) for the reference: {dest}")
            (out / "jobs").mkdir(parents=True, exist_ok=True)
            # Paddle logs from native code on import; keep the benchmark's own output readable.
            with paddle_io.native_output_to(out / "jobs" / "reference-models.log"):
                write_replica(graph_dir, dest, seed=seed)
        chosen[role] = dest
        info[role] = {"dir": str(dest), "weights": f"replica seed {seed} (official weights absent)"}
    from edge_shitu.bundle import sha256_file

    for role in chosen:
        info[role]["params_sha256"] = sha256_file(paddle_io.find_model_files(chosen[role]).params)
        spec = first.models.get(role)
        if spec is not None:
            info[role]["same_weights_as_first_bundle"] = spec.source.get("params_sha256") == info[role]["params_sha256"]
    return chosen["detector"], chosen["extractor"], info


def _check_reference_deps() -> None:
    missing = [m for m in ("cv2", "faiss", "paddle") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"--reference needs {', '.join(missing)} (the 'bench' extra): "
                                      f"{report.BENCH_EXTRA_HINT}")


def _child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["FLAGS_enable_pir_api"] = "0"
    env.setdefault("GLOG_minloglevel", "2")
    # The worker must run the edge_shitu this process imported (a checkout on PYTHONPATH, say, to time
    # another version), not whichever one sits beside this file.
    root = os.path.dirname(os.path.abspath(next(iter(edge_shitu.__path__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(job: Dict[str, Any], name: str, out: Path, threads: int) -> Dict[str, Any]:
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = jobs / f"{name}.json", jobs / f"{name}.result.json", jobs / f"{name}.log"
    result_path.unlink(missing_ok=True)
    job = dict(job, result=str(result_path))
    report.write_json(job_path, job)
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "edge_shitu_bench.latency", "--worker", str(job_path)],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads))
    result = None
    if result_path.is_file():
        with contextlib.suppress(ValueError):
            result = json.loads(result_path.read_text(encoding="utf-8"))
    if result is None or not result.get("ok"):
        if result is not None and "error" in result:
            why = result["error"]
            raise BenchmarkError(f"{name}: {why['type']}: {why['message']} (log: {log_path})")
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise BenchmarkError(f"{name}: the subprocess exited with code {proc.returncode} and no result "
                             f"(log: {log_path}): {' / '.join(tail)}")
    return result


def _measure(once: Callable[[str], Tuple[Dict[str, float], int, int]], images: Sequence[str], warmup: int,
             runs: int) -> Dict[str, Any]:
    for _ in range(warmup):
        for p in images:
            once(p)
    samples: Dict[str, List[float]] = {s: [] for s in STAGES}
    crops, found = [], []
    for _ in range(runs):
        for p in images:
            timings, n_crops, n_found = once(p)
            for s in STAGES:
                samples[s].append(float(timings[s]))
            crops.append(n_crops)
            found.append(n_found)
    return {"samples_ms": samples, "crops": crops, "results": found}


class _CountingEmbedder:
    """Forwards to an Embedder and counts the crops it pre-processes (one attribute write per call)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.crops = 0

    def preprocess(self, crops):
        self.crops += len(crops)
        return self._inner.preprocess(crops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _work_bundle(job: Dict[str, Any]) -> Dict[str, Any]:
    from edge_shitu.bundle import Bundle
    from edge_shitu.options import BackendOptions, DetectorOptions, EmbedderOptions, RecognizerOptions
    from edge_shitu.recognizer import Recognizer

    started = time.perf_counter()
    threads = int(job["threads"])
    ort_backend = _apply_session_config(job)
    bundle = Bundle.load(job["bundle"])
    backend = BackendOptions(threads=threads)
    options = RecognizerOptions(
        whole_image=job.get("whole_image"), embedder=EmbedderOptions(backend=backend),
        search_backend=job.get("search_backend") or "auto", detector=DetectorOptions(backend=backend))
    with Recognizer.from_bundle(bundle, job["gallery"], options=options) as recognizer:
        load_ms = (time.perf_counter() - started) * 1000.0
        counter = _CountingEmbedder(recognizer.embedder)
        recognizer.embedder = counter

        def once(path: str):
            counter.crops = 0
            result = recognizer.recognize(path)
            return result.timings_ms, counter.crops, len(result.recognitions)

        measured = _measure(once, job["images"], job["warmup"], job["runs"])
        measured["details"] = {
            "whole_image": recognizer.options.whole_image.value, "gallery_items": len(recognizer.gallery),
            "gallery_backend": getattr(recognizer.gallery, "backend", None),
            "backends": {r: m.backend for r, m in bundle.models.items()},
            "onnxruntime_session_config": dict(ort_backend.SESSION_CONFIG),
            "precision": {r: m.precision for r, m in bundle.models.items()},
            "replica": bundle.is_replica,
        }
    measured["load_ms"] = load_ms
    return measured


def _work_reference(job: Dict[str, Any]) -> Dict[str, Any]:
    import cv2

    from edge_shitu_bench.reference import ReferenceIndex, ReferenceOptions, ReferencePipeline

    started = time.perf_counter()
    threads = int(job["threads"])
    cv2.setNumThreads(threads)
    options = ReferenceOptions(threads=threads, mkldnn=bool(job["mkldnn"]))
    pipeline = ReferencePipeline.from_models(job["det"], job["rec"], ReferenceIndex.load(job["index"]), options=options)
    load_ms = (time.perf_counter() - started) * 1000.0
    empty = []

    def once(path: str):
        result = pipeline.recognize(path)
        empty.append(result.empty_crops)
        return result.timings_ms, result.crops, len(result.results)

    measured = _measure(once, job["images"], job["warmup"], job["runs"])
    measured["load_ms"] = load_ms
    measured["details"] = {"mkldnn": options.mkldnn, "gallery_items": len(pipeline.index),
                           "empty_crops_skipped": int(sum(empty[job["warmup"] * len(job["images"]):])),
                           "opencv_threads": cv2.getNumThreads()}
    return measured


def _work_reference_index(job: Dict[str, Any]) -> Dict[str, Any]:
    from edge_shitu_bench.reference import ReferenceIndex, ReferenceOptions

    if job.get("from_gallery"):
        from edge_shitu.gallery import Gallery

        with Gallery.open(job["from_gallery"], readonly=True) as g:
            ids, codes = g.codes()
            labels = g.labels_of(ids)
        name = Path(job["from_gallery"]).name
        index = ReferenceIndex.from_codes(codes, [f"{name}#{int(i)}\t{lab}" for i, lab in zip(ids, labels)])
    else:
        options = ReferenceOptions(threads=int(job["threads"]), mkldnn=bool(job["mkldnn"]))
        index = ReferenceIndex.build(job["rec"], job["images"], job["docs"], options=options)
    index.save(job["out"])
    return {"items": len(index)}


def _apply_session_config(job: Dict[str, Any]) -> Any:
    """The onnxruntime backend module, with the job's what-if session entries applied. Each job runs in its own
    subprocess that only measures, so the entries replace the backend's before any session exists there."""
    from edge_shitu.backends import onnxruntime as ort_backend

    ort_backend.SESSION_CONFIG.update(job.get("session_config") or {})
    return ort_backend


def _work_gemm(job: Dict[str, Any]) -> Dict[str, Any]:
    from edge_shitu_bench import machine

    _apply_session_config(job)
    rate = machine.measure_gemm_rate(job["precision"], size=int(job["size"]), threads=int(job["threads"]),
                                     runs=int(job["runs"]))
    return {"gemm": rate.to_json()}


def _worker(job_path: Path) -> int:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    result_path = Path(job["result"])
    kinds = {"bundle": _work_bundle, "reference": _work_reference, "reference_index": _work_reference_index,
             "gemm": _work_gemm}
    try:
        result = kinds[job["kind"]](job)
        result.update(ok=True, peak_rss_mb=report.peak_rss_mb(), versions=report.package_versions(_VERSIONED))
        report.write_json(result_path, result)
        return 0
    except Exception as exc:  # reported to the parent, which raises it as a BenchmarkError
        report.write_json(result_path, {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}})
        raise


def summarize_configuration(result: Dict[str, Any], baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Per-stage statistics of one configuration's samples, and its ratios to a baseline.

    Args:
      result: a worker result with ``samples_ms`` (stage -> list of ms), ``crops``, ``results`` and
        ``peak_rss_mb``.
      baseline: the summarised first configuration at the same thread count (``None``: this one is the
        baseline, all its ratios are 1 where defined).

    Returns:
      ``{"stages": {stage: {p50, p90, p99, mean, min, max, n}}, "ratios_p50": {stage: float | None},
      "peak_rss_mb", "peak_rss_ratio", "crops_per_image", "results_per_image"}``.

    Raises:
      InvalidInputError: a stage has no samples.
    """
    samples = result["samples_ms"]
    missing = [s for s in STAGES if not samples.get(s)]
    if missing:
        raise InvalidInputError(f"no samples for stage(s) {', '.join(missing)}")
    stages = {s: report.summarize(samples[s]) for s in STAGES}
    base_stages = (baseline or {"stages": stages})["stages"]
    ratios = {s: report.ratio(stages[s]["p50"], base_stages[s]["p50"]) for s in STAGES}
    rss = float(result["peak_rss_mb"])
    base_rss = baseline["peak_rss_mb"] if baseline is not None else rss
    crops, found = result.get("crops") or [0], result.get("results") or [0]
    return {
        "stages": stages,
        "ratios_p50": ratios,
        "peak_rss_mb": rss,
        "peak_rss_ratio": report.ratio(rss, base_rss),
        "crops_per_image": sum(crops) / len(crops),
        "results_per_image": sum(found) / len(found),
    }


def _ms(v: Optional[float]) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def _x(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(rep: Dict[str, Any]) -> str:
    """The Markdown report: setup lines, then one side-by-side table per thread count.

    Raises:
      InvalidInputError: the report holds no configuration.
    """
    configs = rep["configurations"]
    if not configs:
        raise InvalidInputError("the report holds no configuration")
    m, v = rep["machine"], rep["versions"]
    lines = [
        "# Per-stage latency",
        "",
        f"- machine: {m.get('cpu_model')}, {m.get('usable_cpus')} usable of {m.get('logical_cpus')} logical CPUs "
        f"({' '.join(m.get('cpu_flags') or []) or 'no flags read'}), {m.get('system')} {m.get('machine')}, "
        f"Python {m.get('python')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- images: {rep['images']['count']} from `{rep['images']['dir']}`, same order for every configuration; "
        f"{rep['warmup_passes']} warm-up pass(es) discarded, {rep['timed_passes']} timed pass(es) = "
        f"{rep['images']['count'] * rep['timed_passes']} samples per stage",
        f"- gallery: {rep['gallery']['items']} items ({rep['gallery']['source']})",
    ]
    searches = sorted({str(c["details"].get("gallery_backend")) for c in configs
                       if c.get("kind") == "bundle" and c.get("details")})
    if searches:
        lines.append(f"- edge-shitu Hamming search backend: {', '.join(searches)}")
    sessions = sorted({json.dumps(c["details"]["onnxruntime_session_config"], sort_keys=True) for c in configs
                       if c.get("kind") == "bundle" and (c.get("details") or {}).get("onnxruntime_session_config")})
    if sessions:
        lines.append(f"- onnxruntime session config of the bundles' sessions: {'; '.join(sessions)}")
    if rep.get("reference"):
        ref = rep["reference"]
        lines.append(f"- reference index: {ref['index']['items']} codes, {ref['index']['source']}")
        lines.append(f"- reference models: detector {ref['models']['detector']['weights']}, extractor "
                     f"{ref['models']['extractor']['weights']}; MKLDNN {'on' if ref['mkldnn'] else 'off'}")
    lines.append(f"- baseline: **{rep['baseline']}**; ratio = p50 ÷ baseline p50 at the same thread count "
                 "(below 1 = faster)")
    against = rep.get("against_machine")
    if against:
        lines += _machine_lines(against)
    lines.append("")
    for threads in rep["threads"]:
        rows_cfg = [c for c in configs if c["threads"] == threads]
        headers = ["stage (ms: p50 / p90 / p99)"]
        for i, c in enumerate(rows_cfg):
            headers.append(c["label"])
            if i:
                headers.append(f"÷ {rows_cfg[0]['label']}")
        rows = []
        for s in STAGES:
            row = [STAGE_TITLES[s] if s != "total" else "**total**"]
            for i, c in enumerate(rows_cfg):
                st = c["stages"][s]
                row.append(f"{_ms(st['p50'])} / {_ms(st['p90'])} / {_ms(st['p99'])}")
                if i:
                    row.append(_x(c["ratios_p50"][s]))
            rows.append(row)
        rss = ["peak RSS (MiB)"]
        crops = ["crops per image"]
        found = ["results per image"]
        for i, c in enumerate(rows_cfg):
            rss.append(f"{c['peak_rss_mb']:.0f}")
            crops.append(f"{c['crops_per_image']:.2f}")
            found.append(f"{c['results_per_image']:.2f}")
            if i:
                rss.append(_x(c["peak_rss_ratio"]))
                crops.append("")
                found.append("")
        rows += [rss, crops, found]
        if against:
            rows += _fraction_rows(rows_cfg)
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "", report.markdown_table(headers, rows), ""]
    if rep.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines)


def _machine_lines(against: Dict[str, Any]) -> List[str]:
    parts = []
    for threads in sorted({int(g["threads"]) for g in against["gemm"]}):
        rates = []
        for precision in ("fp32", "int8"):
            gs = [g for g in against["gemm"] if int(g["threads"]) == threads and g["precision"] == precision]
            if not gs:
                continue
            used = against["rates"].get(str(threads), {}).get(precision)
            text = f"{precision} {used:.1f}" if used is not None else precision
            text += " (" + ", ".join(f"{g['when']} {g['gmac_per_s']:.1f}" for g in gs)
            cpu = [g["gmac_per_cpu_s"] for g in gs if g.get("gmac_per_cpu_s")]
            if cpu:
                text += "; per CPU-second " + ", ".join(f"{v:.1f}" for v in cpu)
            rates.append(text + ")")
        parts.append(f"{threads} thread{'s' if threads > 1 else ''}: " + ", ".join(rates))
    size = against["gemm_size"]
    lines = [f"- this CPU, GMAC/s (onnxruntime GEMM {size}×{size}×{size}: fp32 MatMul, u8 × s8 MatMulInteger; "
             f"median of {against['gemm_runs']} run(s), measured before and after each thread count's "
             "configurations): "
             + "; ".join(parts) + ". Before and after far apart, or at one thread a wall rate far below the "
             "per-CPU-second rate: other work shared the cores"]
    for label, models in against["models"].items():
        items = []
        for role, m in models.items():
            if "skipped" in m:
                items.append(f"{role} not counted ({m['skipped']})")
                continue
            shape = "×".join(str(d) for d in next(iter(m["input_shapes"].values())))
            share = f", {m['int8_share']:.0%} of it on integer kernels" if m["precision"] == "int8" else ""
            items.append(f"{role} {m['gmac']:.3g} GMAC per {m['per']} ({shape}, {m['precision']}{share})")
        lines.append(f"- model work of {label} (from the ONNX graph): " + "; ".join(items))
    lines.append("- 'GMAC/s' rows: model GMAC ÷ inference p50 (the extractor per crop), then the fraction of the GEMM "
                 "rate of its precision at the same thread count; 'mixed' (int8 models) counts float layers at the "
                 "fp32 rate")
    return lines


def _fraction_rows(configs: Sequence[Dict[str, Any]]) -> List[List[str]]:
    roles: List[str] = []
    for c in configs:
        for role in (c.get("models") or {}):
            if role not in roles:
                roles.append(role)
    rows = []
    for role in roles:
        row = [f"{role} GMAC/s (of the GEMM rate)"]
        for i, c in enumerate(configs):
            m = (c.get("models") or {}).get(role)
            if not m or m["gmac_per_s"] is None:
                row.append("—")
            else:
                cell = f"{m['gmac_per_s']:.1f} ({_pct(m['fraction_of_rate'])} of {m['rate']})"
                if m["precision"] == "int8" and m["int8_share"] < 1.0:
                    cell += f", mixed {_pct(m['fraction_of_mixed_limit'])}"
                row.append(cell)
            if i:
                row.append("")
        rows.append(row)
    return rows


def _pct(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.0%}"


def chart(rep: Dict[str, Any], path: Path) -> Path:
    """Stacked stage medians (p50) per configuration and thread count, the total p50 printed above.

    Raises:
      BackendUnavailableError: matplotlib is not installed.
    """
    configs = rep["configurations"]
    bars = [f"{c['label']}\n{c['threads']} thread{'s' if c['threads'] > 1 else ''}" for c in configs]
    stacks = {STAGE_TITLES[s]: [c["stages"][s]["p50"] for c in configs] for s in STAGES if s != "total"}
    totals = [c["stages"]["total"]["p50"] for c in configs]
    passes = rep["timed_passes"]
    title = (f"Per-stage latency, p50 ms ({rep['images']['count']} images × {passes} pass{'es' if passes > 1 else ''}); "
             f"number = total p50")
    return report.stacked_bar_chart(path, bars, stacks, title=title, ylabel="ms per image (stage medians)",
                                     totals=totals)


def run(bundles: Sequence[Any], images_dir: Path, out_dir: Path, *, options: Optional[LatencyOptions] = None,
        progress: Optional[Progress] = None, command: Optional[str] = None) -> LatencyRun:
    """Measure every configuration, write ``latency.json``, ``latency.md`` and ``latency.png`` into ``out_dir``.

    Args:
      bundles: bundle folders (or loaded bundles), at least one.
      images_dir: a folder of images (not searched recursively).
      out_dir: where outputs, galleries, reference models and subprocess logs go (created).
      options: see :class:`LatencyOptions`.
      progress: called with one line of text per step.
      command: the command line to record in the report.

    Raises:
      MissingFileError: a bundle, the image folder, the gallery or a reference model is missing.
      BundleError, IntegrityError: a bundle is malformed or damaged.
      InvalidInputError: no bundle, no images, an empty gallery, bad options.
      ImageDecodeError: an image cannot be decoded.
      BackendUnavailableError: matplotlib (or, with the reference, paddle/OpenCV/faiss) is not installed.
      BenchmarkError: a configuration failed in its subprocess (the message names its log file).
    """
    from edge_shitu.bundle import Bundle

    options = options or LatencyOptions()
    say = progress or (lambda _line: None)
    if not bundles:
        raise InvalidInputError("give at least one bundle (--bundle B)")
    loaded = [Bundle.load(b) for b in bundles]
    for b in loaded:
        b.require("extractor")
    images = list_images(Path(images_dir), options.max_images)
    report.require_matplotlib()
    if options.gemm_runs:
        from edge_shitu_bench.machine import require_onnx

        require_onnx()
    if options.reference:
        _check_reference_deps()
        from edge_shitu_converters import paddle_io

        for given in (options.reference_det, options.reference_rec):
            if given is not None:
                paddle_io.find_model_files(given)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(loaded)
    galleries, gallery_info, source = _prepare_galleries(loaded, labels, options, out, say)

    configs: List[_Config] = []
    ref_info: Optional[Dict[str, Any]] = None
    if options.reference:
        det_dir, rec_dir, models = _reference_models(options, loaded[0], out, say)
        index_dir, index_info = _reference_index(options, rec_dir, models, Path(gallery_info["path"]), source, out, say)
        ref_info = {"models": models, "index": index_info, "mkldnn": options.reference_mkldnn,
                    "configuration": "inference_general.yaml models and predictor + inference_general_binary.yaml "
                                     "post-process and index (Binarize sign, IndexBinaryFlat, Hamming radius 100)"}
        configs.append(_Config(REFERENCE_LABEL, "reference",
                               details={"det": str(det_dir), "rec": str(rec_dir), "index": str(index_dir)}))
    for bundle, label in zip(loaded, labels):
        configs.append(_Config(label, "bundle", bundle=bundle.path, gallery=galleries[label]))

    by_label = dict(zip(labels, loaded))
    macs: Dict[str, Dict[str, Any]] = {}
    against: Optional[Dict[str, Any]] = None
    if options.gemm_runs:
        from edge_shitu_bench.machine import GEMM_SIZE

        macs, described = _model_work(loaded, labels)
        against = {
            "gemm_size": GEMM_SIZE, "gemm_runs": options.gemm_runs, "gemm": [],
            "when": "each thread count's configurations are bracketed by GEMM-rate measurements at that thread count "
                    "(before and after, each GEMM in its own subprocess); the fractions use the mean of the two",
            "rates": {},
            "models": described,
            "fraction_of_rate": "model GMAC ÷ (inference p50 × the GEMM rate of its manifest precision at its thread "
                                "count): fp32 models against the fp32 rate, int8 models against the int8 rate",
            "fraction_of_mixed_limit": "(float MACs ÷ fp32 rate + integer MACs ÷ int8 rate) ÷ inference p50",
        }
        if 1 not in options.threads:
            against["gemm"] += _gemm_rates(1, "start", options, out, say)
            against["rates"]["1"] = _bracketed_rates(against["gemm"], 1)

    image_names = [str(p) for p in images]
    summaries: List[Dict[str, Any]] = []
    for threads in options.threads:
        baseline = None
        block: List[Tuple[Dict[str, Any], Dict[str, Any], _Config]] = []
        if against is not None:
            against["gemm"] += _gemm_rates(threads, "before", options, out, say)
        for cfg in configs:
            say(f"measuring {cfg.label} with {threads} thread(s): {len(images)} images, "
                f"{options.warmup} warm-up + {options.runs} timed pass(es)")
            job = {"kind": cfg.kind, "threads": threads, "images": image_names, "warmup": options.warmup,
                   "runs": options.runs}
            if cfg.kind == "bundle":
                job.update(bundle=str(cfg.bundle), gallery=str(cfg.gallery), whole_image=options.whole_image,
                           session_config=dict(options.session_config),
                           search_backend=options.search_backend)
            else:
                job.update(det=cfg.details["det"], rec=cfg.details["rec"], index=cfg.details["index"],
                           mkldnn=options.reference_mkldnn)
            name = f"{_slug(cfg.label)}-t{threads}"
            result = _run_child(job, name, out, threads)
            summary = summarize_configuration(result, baseline)
            summary.update(label=cfg.label, kind=cfg.kind, threads=threads, load_ms=result["load_ms"],
                           details=result.get("details", {}), versions=result.get("versions", {}),
                           bundle=str(cfg.bundle) if cfg.bundle else None,
                           gallery=str(cfg.gallery) if cfg.gallery else None,
                           samples_ms=result["samples_ms"], crops=result["crops"], results=result["results"],
                           log=str(out / "jobs" / f"{name}.log"))
            summary["models"] = None
            block.append((summary, result, cfg))
            if baseline is None:
                baseline = summary
            summaries.append(summary)
        if against is not None:
            against["gemm"] += _gemm_rates(threads, "after", options, out, say)
            rates = _bracketed_rates(against["gemm"], threads)
            against["rates"][str(threads)] = rates
            for summary, result, cfg in block:
                if cfg.kind == "bundle":
                    bundle = by_label[cfg.label]
                    summary["models"] = model_fractions(
                        result, macs[cfg.label], {r: m.precision for r, m in bundle.models.items()}, rates)

    rep: Dict[str, Any] = {
        "benchmark": "latency",
        "created": report.utc_now(),
        "command": command,
        "machine": report.machine_info(),
        "versions": report.package_versions(_VERSIONED),
        "threads": list(options.threads),
        "images": {"dir": str(Path(images_dir)), "count": len(images), "names": [p.name for p in images]},
        "warmup_passes": options.warmup,
        "timed_passes": options.runs,
        "stages": list(STAGES),
        "stage_titles": STAGE_TITLES,
        "baseline": configs[0].label,
        "ratio": "p50 of the configuration / p50 of the baseline (the first configuration) at the same thread count",
        "gallery": gallery_info,
        "reference": ref_info,
        "against_machine": against,
        "configurations": summaries,
        "notes": _notes(loaded, options, ref_info),
    }
    text = markdown(rep)
    json_path = report.write_json(out / "latency.json", rep)
    md_path = report.write_text(out / "latency.md", text)
    png_path = chart(rep, out / "latency.png")
    return LatencyRun(rep, text, json_path, md_path, png_path)


def _model_work(bundles: Sequence[Any], labels: Sequence[str]) -> Tuple[Dict[str, Dict[str, Any]],
                                                                        Dict[str, Dict[str, Any]]]:
    """Every ONNX model's MACs: label -> role -> ModelMacs (or None), and the same described for the report."""
    from edge_shitu_bench import machine

    macs: Dict[str, Dict[str, Any]] = {}
    described: Dict[str, Dict[str, Any]] = {}
    for bundle, label in zip(bundles, labels):
        macs[label], described[label] = {}, {}
        for role, spec in bundle.models.items():
            counted = machine.bundle_model_macs(spec)
            macs[label][role] = counted
            described[label][role] = ({"skipped": f"{spec.backend} model: no ONNX graph to count"} if counted is None
                                      else dict(counted.to_json(), precision=spec.precision,
                                                rate=machine.rate_for(spec.precision),
                                                per="crop" if role == "extractor" else "image"))
    return macs, described


def _gemm_rates(threads: int, when: str, options: LatencyOptions, out: Path, say: Progress) -> List[Dict[str, Any]]:
    """The fp32 and int8 GEMM rates at ``threads``, each measured in its own subprocess."""
    from edge_shitu_bench import machine

    measured = []
    for precision in machine.PRECISIONS:
        say(f"measuring this CPU's {precision} GEMM rate ({machine.GEMM_SIZE}³, {threads} thread(s), "
            f"{options.gemm_runs} run(s), {when})")
        job = {"kind": "gemm", "precision": precision, "size": machine.GEMM_SIZE, "threads": threads,
               "runs": options.gemm_runs, "session_config": dict(options.session_config)}
        rate = _run_child(job, f"gemm-{precision}-t{threads}-{when}", out, threads)["gemm"]
        measured.append(dict(rate, when=when))
    return measured


def _bracketed_rates(measured: Sequence[Dict[str, Any]], threads: int) -> Dict[str, float]:
    """Per precision, the mean of the rates measured before and after the configurations at ``threads``."""
    from edge_shitu_bench import machine

    rates: Dict[str, float] = {}
    for precision in machine.PRECISIONS:
        values = [g["gmac_per_s"] for g in measured if g["precision"] == precision and g["threads"] == threads]
        if values:
            rates[precision] = sum(values) / len(values)
    return rates


def model_fractions(result: Dict[str, Any], macs: Dict[str, Any], precisions: Dict[str, str],
                    rates: Dict[str, float]) -> Dict[str, Optional[Dict[str, Any]]]:
    """Each model's speed against the machine in one configuration.

    The detector runs once per image: its time is the p50 of ``det_infer``. The extractor is counted per
    crop: its time is the p50 over images of ``rec_infer`` ÷ crops of that image (images without a crop
    are left out).

    Args:
      result: a worker result: ``samples_ms`` (stage -> list of ms) and ``crops`` (per sample).
      macs: role -> :class:`edge_shitu_bench.machine.ModelMacs`, or ``None`` for a model not counted.
      precisions: role -> the manifest precision (``"fp32"``, ``"fp16"``, ``"int8"``).
      rates: ``{"fp32": GMAC/s, "int8": GMAC/s}`` measured at the configuration's thread count.

    Returns:
      role -> ``None`` (not counted) or ``{"per", "gmac", "int8_share", "precision", "rate", "rate_gmac_per_s",
      "ms_p50", "gmac_per_s", "fraction_of_rate", "fraction_of_mixed_limit"}``; time-derived values are
      ``None`` without samples.

    Raises:
      InvalidInputError: a role in ``macs`` has no precision, or the samples and crops differ in length.
    """
    from edge_shitu_bench import machine

    stage = {"detector": "det_infer", "extractor": "rec_infer"}
    out: Dict[str, Optional[Dict[str, Any]]] = {}
    for role, counted in macs.items():
        if counted is None:
            out[role] = None
            continue
        if role not in precisions:
            raise InvalidInputError(f"no precision for the {role}")
        samples = result["samples_ms"].get(stage.get(role, ""), [])
        if role == "extractor":
            crops = result.get("crops") or []
            if len(crops) != len(samples):
                raise InvalidInputError(f"{len(samples)} extractor samples but {len(crops)} crop counts")
            samples = [ms / n for ms, n in zip(samples, crops) if n > 0]
        ms = report.percentiles(samples)["p50"] if samples else None
        rate_name = machine.rate_for(precisions[role])
        rate = rates.get(rate_name)
        out[role] = {
            "per": "crop" if role == "extractor" else "image",
            "gmac": counted.gmac,
            "int8_share": counted.int8_share,
            "precision": precisions[role],
            "rate": rate_name,
            "rate_gmac_per_s": rate,
            "ms_p50": ms,
            "gmac_per_s": counted.gmac / (ms / 1000.0) if ms else None,
            "fraction_of_rate": machine.fraction_of_rate(counted.gmac, ms, rate),
            "fraction_of_mixed_limit": machine.mixed_limit_fraction(counted, ms, rates),
        }
    return out


def _reference_index(options: LatencyOptions, rec_dir: Path, models: Dict[str, Any], first_gallery: Path,
                     source: Optional[Tuple[Path, List[Any]]], out: Path, say: Progress) -> Tuple[Path, Dict[str, Any]]:
    from edge_shitu.bundle import sha256_file

    if source is not None:
        root, entries = source
        key = {"from": "images", "root": str(root), "count": len(entries),
               "rec_params_sha256": models["extractor"]["params_sha256"], "mkldnn": options.reference_mkldnn}
        described = (f"built by the reference (OpenCV pre-processing, Paddle extractor, batches of 32) from the same "
                     f"{len(entries)} gallery images")
    else:
        key = {"from": "gallery", "gallery_sha256": sha256_file(first_gallery)}
        described = f"the codes of {first_gallery} (same codes as edge-shitu's gallery)"
    index_dir = out / "reference-index"
    stamp = index_dir / "built-from.json"
    reused = False
    if stamp.is_file():
        with contextlib.suppress(ValueError, OSError):
            reused = json.loads(stamp.read_text(encoding="utf-8")) == key and (index_dir / "vector.index").is_file()
    if not reused:
        say(f"building the reference index ({described})")
        job: Dict[str, Any] = {"kind": "reference_index", "threads": max(options.threads), "out": str(index_dir),
                               "mkldnn": options.reference_mkldnn}
        if source is not None:
            job.update(rec=str(rec_dir), images=[str(root / e.path) for e in entries],
                       docs=[f"{e.path}\t{e.label}" for e in entries])
        else:
            job.update(from_gallery=str(first_gallery))
        items = _run_child(job, "reference-index", out, max(options.threads))["items"]
        report.write_json(stamp, key)
    else:
        from edge_shitu_bench.reference import ID_MAP_FILE

        items = len(json.loads((index_dir / ID_MAP_FILE).read_text(encoding="utf-8")))
    return index_dir, {"dir": str(index_dir), "items": items, "source": described, "reused": reused}


def _notes(bundles: Sequence[Any], options: LatencyOptions, ref: Optional[Dict[str, Any]]) -> List[str]:
    notes = ["edge-shitu's detector inference is the raw PicoDet heads; its decode + NMS (numpy) is in "
             "'detector post-process'. The reference's detector inference includes the official graph's "
             "in-graph decode + multiclass_nms3; its post-process is only the top-5 / score cut and the whole image.",
             "'crops + extractor pre-process', 'extractor inference', 'L2 + binarise' and 'search' are summed over "
             "the regions of an image: the reference runs one extractor call per region, edge-shitu one call for all.",
             "Peak RSS is the high-water mark of each configuration's own subprocess (VmHWM), imports and model loading included."]
    if ref is not None:
        notes.append("The reference always adds the whole image as a region; edge-shitu follows each bundle's "
                     f"whole-image policy ({options.whole_image or 'bundle default'}), so 'crops per image' differ.")
        if any(not m.get("same_weights_as_first_bundle", True) for m in ref["models"].values()):
            notes.append("The reference models do not have the first bundle's weights: detection counts may differ.")
    if any(b.is_replica for b in bundles):
        notes.append("REPLICA models (official graphs, random weights): timings and memory are real, "
                     "boxes and labels are meaningless.")
    return notes


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def options_from_args(args: argparse.Namespace) -> LatencyOptions:
    """Turn the parsed arguments of ``edge-shitu bench latency`` into :class:`LatencyOptions`.

    Raises:
      InvalidInputError: a bad value.
    """
    path = lambda v: Path(v) if v is not None else None
    return LatencyOptions(
        threads=parse_threads(args.threads), warmup=args.warmup, runs=args.runs, max_images=args.max_images,
        gemm_runs=args.gemm_runs, session_config=parse_session_config(args.session_config or ()),
        whole_image=args.whole_image, search_backend=args.search_backend, gallery=path(args.gallery), gallery_limit=args.gallery_limit,
        reference=args.reference, reference_det=path(args.reference_det), reference_rec=path(args.reference_rec),
        reference_mkldnn=not args.reference_no_mkldnn, shared=path(args.shared))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m edge_shitu_bench.latency``: the same as ``edge-shitu bench latency``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--worker":
        return _worker(Path(argv[1]))
    from edge_shitu.cli import main as cli_main

    return cli_main(["bench", "latency", *argv])


if __name__ == "__main__":
    sys.exit(main())
