"""The ``edge-shitu`` command. ``main(argv) -> int`` is the entry point and is tested in-process.

Heavy subcommands (models, replicate, convert, quickstart) import the ``converters`` package lazily and
name the extra to install when it is missing. Errors: one line on stderr naming the file and the
problem, exit code 2 for bad input, 1 for other failures; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

from edge_shitu import __version__
from edge_shitu.errors import (
    BackendUnavailableError,
    EdgeShituError,
    ImageDecodeError,
    InvalidInputError,
    MissingFileError,
)

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

# Modules of this package that each add commands: ``register(subparsers, groups)`` where
# ``groups["gallery"]`` is the ``gallery`` command's own subparsers.
_EXTENSIONS: Tuple[str, ...] = ("calibrate", "hashing", "bench")


class _Progress:
    """A one-line progress bar on stderr (only redrawn on a terminal; a summary line otherwise)."""

    def __init__(self, what: str, total: int, stream: TextIO) -> None:
        self.what, self.total, self.stream = what, total, stream
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and (now - self._last > 0.1 or done == self.total):
            self._last = now
            width = 30
            filled = int(width * done / max(self.total, 1))
            self.stream.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def _heavy(module: str, extra: str = "convert"):
    """Import a converters module, or explain which extra is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"this command needs the '{extra}' extra ({exc}); run: pip install \"edge-shitu[{extra}]\""
        ) from None


def _thread_count(text: str) -> int:
    """argparse type of ``--threads``: a whole number from 1 to this machine's core count."""
    from edge_shitu.options import check_threads

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text[:40]!r}") from None
    try:
        return check_threads(value, name="a thread count")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _embedder_options(args):
    from edge_shitu.options import BackendOptions, EmbedderOptions

    return EmbedderOptions(backend=BackendOptions(threads=args.threads), max_pixels=args.max_pixels)


def _pixel_count(text: str) -> int:
    """argparse type of ``--max-pixels``: a positive whole number, e.g. 12000000 or 12e6."""
    from edge_shitu.options import MAX_PIXELS

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value.is_integer() and 1 <= value <= MAX_PIXELS):
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels from 1 to {MAX_PIXELS}, got {text[:40]!r}")
    return int(value)


def _box(box) -> List[float]:
    return [round(float(v), 2) for v in box]


# ---------------------------------------------------------------- detect / embed / recognize


# Errors that concern one input image: a batch command reports them and goes on with the next image.
_IMAGE_ERRORS = (MissingFileError, ImageDecodeError, InvalidInputError)


def _per_image(images: Sequence[str], work: Callable[[str], dict], err: TextIO, *,
               debug: bool = False) -> Tuple[List[dict], int]:
    """Runs ``work`` on each image; a bad image is reported on stderr and recorded as ``{"image", "error"}``.

    Returns the records in input order and the exit code (2 when some image failed).
    """
    records, failed = [], 0
    for img in images:
        try:
            records.append(work(img))
        except _IMAGE_ERRORS as exc:
            failed += 1
            if debug:
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
            err.write(f"edge-shitu: error: {_one_line(exc)}\n")
            records.append({"image": img, "error": _one_line(exc)})
    if failed and len(images) > 1:
        err.write(f"edge-shitu: {failed} of {len(images)} image(s) failed\n")
    return records, EXIT_BAD_INPUT if failed else EXIT_OK


def _write_json(records, out: TextIO) -> None:
    json.dump(records, out, ensure_ascii=False, indent=2)
    out.write("\n")


def _cmd_detect(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.detector import Detector
    from edge_shitu.options import BackendOptions, DetectorOptions
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    spec = bundle.require("detector")
    overrides = {}
    if args.min_score is not None:
        overrides["min_score"] = args.min_score
    if args.max_detections is not None:
        overrides["max_detections"] = args.max_detections
    opts = DetectorOptions.from_mapping(spec.defaults, backend=BackendOptions(threads=args.threads),
                                        max_pixels=args.max_pixels, **overrides)
    with Detector.from_bundle(bundle, options=opts) as det:
        def work(img: str) -> dict:
            dets = det.detect(img)
            if not args.json:
                out.write(f"{img}: {len(dets)} box(es)\n")
                for d in dets:
                    out.write(f"  {_box(d.box)} score {d.score:.3f}\n")
            return {"image": img, "boxes": [{"box": _box(d.box), "score": round(d.score, 4)} for d in dets]}

        records, code = _per_image(args.images, work, err, debug=args.debug)
    if args.json:
        _write_json(records, out)
    _replica_note(bundle, err)
    return code


def _cmd_embed(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.codes import codes_to_hex
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import embed_files
    from edge_shitu.options import BackendOptions, EmbedderOptions

    bundle = Bundle.load(args.bundle)
    records: List[dict] = [{"image": img} for img in args.images]

    def skip(i: int, why: str) -> None:
        err.write(f"edge-shitu: error: {_one_line(why)}\n")
        records[i]["error"] = _one_line(why)

    with Embedder.from_bundle(bundle, options=_embedder_options(args)) as emb:
        for idx, codes, _ in embed_files(emb, list(args.images), batch=emb.options.max_batch, on_skip=skip):
            for i, code in zip(idx, codes_to_hex(codes)):
                records[i]["code"] = code
    failed = sum(1 for r in records if "error" in r)
    if failed and len(records) > 1:
        err.write(f"edge-shitu: {failed} of {len(records)} image(s) failed\n")
    if args.json:
        _write_json(records, out)
    else:
        for r in records:
            if "code" in r:
                out.write(f"{r['image']}\t{r['code']}\n")
    _replica_note(bundle, err)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def _cmd_recognize(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.options import BackendOptions, EmbedderOptions, RecognizerOptions
    from edge_shitu.recognizer import STAGES, Recognizer

    bundle = Bundle.load(args.bundle)
    rec = bundle.recognition
    opts = RecognizerOptions(
        max_distance=args.max_distance,
        top_k=args.top_k if args.top_k is not None else rec.top_k,
        whole_image=args.whole_image or rec.whole_image,
        final_nms_iou=rec.final_nms_iou,
        embedder=_embedder_options(args),
        include_unknown=args.include_unknown,
        search_backend=args.search_backend,
        max_pixels=args.max_pixels,
    )
    if bundle.detector is not None and args.threads is not None:
        from edge_shitu.options import DetectorOptions

        opts = _replace(opts, detector=DetectorOptions.from_mapping(
            bundle.detector.defaults, backend=BackendOptions(threads=args.threads)))
    with Recognizer.from_bundle(bundle, args.gallery, options=opts) as recognizer:
        def work(img: str) -> dict:
            res = recognizer.recognize(img)
            items = [{"box": _box(r.box), "label": r.label, "distance": r.distance,
                      "similarity": None if r.similarity is None else round(r.similarity, 4)}
                     for r in res.recognitions]
            record = {"image": img, "results": items}
            if args.json or args.timings:
                record["timings_ms"] = {k: round(v, 2) for k, v in res.timings_ms.items()}
            if not args.json:
                out.write(f"{img}: {len(items)} result(s)\n")
                for r in res.recognitions:
                    where = "whole image" if r.whole_image else f"box {_box(r.box)}"
                    label = r.label if r.label is not None else "(unknown)"
                    out.write(f"  {label}  distance {r.distance}  similarity {r.similarity:.3f}  {where}\n")
                if args.timings:
                    out.write("  timings ms: " + ", ".join(f"{k} {res.timings_ms[k]:.1f}" for k in STAGES) + "\n")
            return record

        records, code = _per_image(args.images, work, err, debug=args.debug)
    if args.json:
        _write_json(records, out)
    _replica_note(bundle, err)
    return code


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _replica_note(bundle, err: TextIO) -> None:
    if bundle.is_replica:
        err.write(f"note: {bundle.path.name} holds REPLICA models (official graphs, random weights): "
                  "boxes, codes and labels are meaningless, only the mechanics are real\n")


# ---------------------------------------------------------------- gallery


def _cmd_gallery_build(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import build_gallery
    from edge_shitu.labelfile import read_label_file
    from edge_shitu.options import BackendOptions, EmbedderOptions

    bundle = Bundle.load(args.bundle)
    entries = read_label_file(args.labels)
    progress = _Progress("embedding", len(entries), err)
    with Embedder.from_bundle(bundle, options=_embedder_options(args)) as emb:
        summary = build_gallery(bundle, Path(args.images), entries, Path(args.out), embedder=emb,
                                keep_embeddings=args.keep_embeddings, overwrite=args.overwrite,
                                on_skip=lambda p, why: err.write(f"skipped: {_one_line(why)}\n"),
                                on_progress=lambda done, total: progress.update(done))
    out.write(f"gallery {args.out}: {summary.added} image(s) added, {len(summary.skipped)} skipped, "
              f"{summary.labels} label(s)\n")
    _replica_note(bundle, err)
    return EXIT_OK


def _cmd_gallery_add(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import enrol
    from edge_shitu.gallery import Gallery
    from edge_shitu.labelfile import read_label_file
    from edge_shitu.options import BackendOptions, EmbedderOptions

    from edge_shitu.labelfile import check_label

    args.gallery, args.images = args.paths[0], args.paths[1:]
    if args.label is not None:
        check_label(args.label, "--label")
    bundle = Bundle.load(args.bundle)
    if args.labels:
        if args.label or args.images:
            raise InvalidInputError("give either --labels FILE or --label L with image paths, not both")
        root = Path(args.images_root or ".")
        entries = read_label_file(args.labels)
        paths, labels, sources = [root / e.path for e in entries], [e.label for e in entries], [e.path for e in entries]
    else:
        if not args.label or not args.images:
            raise InvalidInputError("give --label L and one or more image paths (or --labels FILE)")
        paths, labels, sources = [Path(p) for p in args.images], [args.label] * len(args.images), list(args.images)
    opts = _embedder_options(args)
    with Gallery.open(args.gallery, fingerprint=bundle.code_fingerprint) as gallery, \
            Embedder.from_bundle(bundle, options=opts) as emb:
        summary = enrol(gallery, emb, paths, labels, sources=sources, keep_embeddings=args.keep_embeddings,
                        embedding_fingerprint=bundle.embedding_fingerprint,
                        on_skip=lambda p, why: err.write(f"skipped: {_one_line(why)}\n"))
    out.write(f"added {summary.added} item(s) (ids {_ranges(summary.ids)}), skipped {len(summary.skipped)}\n")
    return EXIT_OK if summary.added or not summary.skipped else EXIT_BAD_INPUT


def _ranges(ids: Sequence[int]) -> str:
    if not ids:
        return "none"
    ids = sorted(ids)
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _cmd_gallery_remove(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    if bool(args.ids) == bool(args.label):
        raise InvalidInputError("give either --id N [N ...] or --label L")
    with Gallery.open(args.gallery) as gallery:
        n = gallery.remove(args.ids) if args.ids else gallery.remove_label(args.label)
    out.write(f"removed {n} item(s)\n")
    return EXIT_OK


def _cmd_gallery_relabel(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    with Gallery.open(args.gallery) as gallery:
        n = gallery.relabel(args.ids, args.label)
    out.write(f"relabelled {n} item(s) as {args.label!r}\n")
    return EXIT_OK


def _cmd_gallery_list(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    with Gallery.open(args.gallery, readonly=True) as gallery:
        items = gallery.items(label=args.label, limit=args.limit)
    if args.json:
        json.dump([{"id": it.id, "label": it.label, "source": it.source} for it in items], out,
                  ensure_ascii=False, indent=2)
        out.write("\n")
    else:
        for it in items:
            out.write(f"{it.id}\t{it.label}\t{it.source or ''}\n")
    return EXIT_OK


def _cmd_gallery_info(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    with Gallery.open(args.gallery, readonly=True) as gallery:
        info = gallery.info()
        counts = gallery.label_counts()
    record = {
        "path": str(info.path), "items": info.count, "labels": len(counts), "bits": info.bits,
        "fingerprint": info.fingerprint, "format_version": info.format_version,
        "max_distance": info.max_distance, "file_bytes": info.file_size,
    }
    if args.json:
        json.dump(record, out, indent=2)
        out.write("\n")
    else:
        for k, v in record.items():
            out.write(f"{k}: {v}\n")
    return EXIT_OK


def _cmd_gallery_check(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery, check_gallery

    problems = check_gallery(args.gallery)
    info = None
    if not problems:
        with Gallery.open(args.gallery, readonly=True) as gallery:
            info = gallery.info()
            if args.bundle:
                from edge_shitu.bundle import Bundle
                from edge_shitu.hashing import encoder_for

                bundle = Bundle.load(args.bundle)
                problems = gallery.check_model(encoder_for(bundle.load_hash_head()),
                                               fingerprint=bundle.code_fingerprint,
                                               embedding_fingerprint=bundle.embedding_fingerprint)
    if args.json:
        record = {"path": str(args.gallery), "ok": not problems, "problems": problems}
        if info is not None:
            record.update(items=info.count, labels=info.label_count, bits=info.bits, fingerprint=info.fingerprint)
        json.dump(record, out, indent=2)
        out.write("\n")
    elif problems:
        out.write(f"{args.gallery}: {len(problems)} problem(s)\n")
        for p in problems:
            out.write(f"  {p}\n")
    else:
        out.write(f"{args.gallery}: ok ({info.count} items, {info.label_count} labels, {info.bits}-bit codes, "
                  f"fingerprint {info.fingerprint})\n")
    return EXIT_OK if not problems else EXIT_FAILURE


def _cmd_gallery_upgrade(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import FORMAT_VERSION, upgrade_gallery

    backup = upgrade_gallery(args.gallery)
    out.write(f"{args.gallery}: upgraded to format {FORMAT_VERSION}; the old file is kept as {backup}\n")
    return EXIT_OK


# ---------------------------------------------------------------- models / replicate / convert


def _cmd_models_list(args, out: TextIO, err: TextIO) -> int:
    fetch = _heavy("converters.fetch")
    lock = fetch.load_lock(args.lock)
    for row in fetch.list_models(lock, cache_dir=Path(args.cache) if args.cache else None):
        cached = "" if row.cached is None else ("\tcached" if row.cached else "\tnot cached")
        out.write(f"{row.name}\t{row.role}\tfiles pinned {row.pinned}/{row.pinned + row.unpinned}"
                  f"{cached}\t{row.url}\n")
    return EXIT_OK


def _cmd_models_fetch(args, out: TextIO, err: TextIO) -> int:
    fetch = _heavy("converters.fetch")
    lock = fetch.load_lock(args.lock)
    cache = Path(args.cache) if args.cache else fetch.default_cache_dir()
    bar = {}

    def progress(done: int, total: Optional[int]) -> None:
        if total:
            bar.setdefault("p", _Progress("downloading", total, err)).update(done)

    report = fetch.fetch(args.name, cache_dir=cache, mirror=args.mirror, lock=lock, force=args.force,
                         progress=progress)
    state = "already cached, verified" if report.cached else f"fetched from {report.source}"
    out.write(f"{args.name}: {report.model_dir} ({state})\n")
    out.write(f"  archive sha256 {report.archive_sha256}\n")
    for f in report.files:
        out.write(f"  {f.path}: sha256 {f.sha256} ({f.status})\n")
    return EXIT_OK


def _cmd_replicate(args, out: TextIO, err: TextIO) -> int:
    replica = _heavy("converters.replica")
    path = replica.write_replica(Path(args.graph_dir), Path(args.out_dir), seed=args.seed)
    out.write(f"replica written to {path} (seed {args.seed}; random weights: outputs are meaningless)\n")
    return EXIT_OK


def _cmd_convert(args, out: TextIO, err: TextIO) -> int:
    convert = _heavy("converters.convert")
    if not args.det and not args.rec:
        raise InvalidInputError("give --det DIR, --rec DIR or both")
    verify_images = args.verify_images
    if args.verify and verify_images is None:
        verify_images = _default_verify_images()
    quant = {}
    if args.precision == "int8" or args.calib is not None:
        quant = {"calib_dir": args.calib, "calib_count": args.calib_count}
    if args.format == "onnx":
        onnx_quant = {"calib_method": args.calib_method, "quant_mode": args.quant_mode}
        quant.update({k: v for k, v in onnx_quant.items() if v is not None})
    else:
        quant.update({"lite_algo": args.lite_algo, "lite_opt": args.lite_opt, "lite_python": args.lite_python})
    path = convert.convert(Path(args.det) if args.det else None, Path(args.rec) if args.rec else None,
                           Path(args.out), format=args.format, precision=args.precision, verify=args.verify,
                           verify_images=verify_images, hash_head=args.hash_head, **quant)
    out.write(f"bundle written to {path}\n")
    if args.verify:
        from edge_shitu.bundle import Bundle

        _print_verification(Bundle.load(path).verification, out)
    return EXIT_OK


def _default_verify_images() -> str:
    shared = _heavy("converters.shared")
    try:
        root = shared.find_shared()
    except EdgeShituError:
        raise InvalidInputError("--verify needs real photos: give --verify-images DIR") from None
    return str(root / "data" / "drink_dataset_v1.0" / "test_images")


def _print_verification(report, out: TextIO) -> None:
    if report is None:
        out.write("verification: never verified (convert --verify)\n")
        return
    if report.get("passed") is None:
        out.write(f"verification: NOT VERIFIED: {report.get('unverifiable')}\n")
        return
    state = "PASSED" if report.get("passed") else "FAILED"
    out.write(f"verification ({report.get('precision')}, {len(report.get('images', []))} photos): {state}"
              + (" [replica: conversion fidelity, not accuracy]" if report.get("replica") else "") + "\n")
    ext = report.get("extractor")
    if ext:
        out.write(f"  extractor: {ext['crops']} crops, max abs diff {ext['max_abs_diff']:.3g}, cosine mean "
                  f"{ext['mean_cosine']:.5f} min {ext['min_cosine']:.5f}, code bits equal mean "
                  f"{ext['mean_bit_agreement']:.4f} min {ext['min_bit_agreement']:.4f}\n")
    det = report.get("detector")
    if det:
        out.write(f"  detector: {det['boxes']} boxes, matched (IoU >= {report.get('match_iou')}) "
                  f"{det['match_rate']:.4f}, max score diff {det['max_score_diff']:.3g}\n")
    for failure in report.get("failures", []):
        out.write(f"  failed: {failure}\n")


def _cmd_bundle_info(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    if args.json:
        json.dump({"manifest": bundle.manifest, "sizes": {r: m.path.stat().st_size for r, m in bundle.models.items()},
                   "verification": bundle.verification}, out, ensure_ascii=False, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"bundle {bundle.name} ({bundle.path})\n")
    total = 0
    for role, m in bundle.models.items():
        size = m.path.stat().st_size
        total += size
        src = m.source
        origin = (f"replica seed {src.get('seed')}" if m.is_replica else
                  f"official {src.get('archive', {}).get('name', src.get('model_dir_name'))}")
        out.write(f"  {role}: {m.path.name} {size / 1e6:.2f} MB, {m.backend} {m.precision} target {m.target}, "
                  f"input {m.input.name} {list(m.input.shape)} {m.input.interpolation}, {origin}\n")
    out.write(f"  total {total / 1e6:.2f} MB; codes {bundle.codes.bits} bits ({bundle.codes.method}, "
              f"{bundle.codes.bit_order}-endian bits); fingerprint {bundle.code_fingerprint if bundle.extractor else '-'}\n")
    if bundle.hash is not None:
        out.write(f"  hash head: {bundle.hash.path.name} [{bundle.hash.bits}, {bundle.hash.dim}] "
                  f"sha256 {bundle.hash.sha256[:16]}...\n")
    out.write("  tools: " + ", ".join(f"{k} {v}" for k, v in sorted(bundle.tools.items())) + "\n")
    _print_verification(bundle.verification, out)
    return EXIT_OK


def _cmd_quickstart(args, out: TextIO, err: TextIO) -> int:
    quickstart = _heavy("converters.quickstart")
    return quickstart.run(shared=args.shared, work=args.work, models=args.models, mirror=args.mirror,
                          threads=args.threads, limit=args.limit, out=out, err=err)


# ---------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-shitu", description="PP-ShiTu recognition on edge devices.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def threads(sp):
        sp.add_argument("--threads", type=_thread_count, default=None,
                        help="inference threads per model, 1 to the number of CPU cores (default: the backend's)")

    def image_limit(sp):
        from edge_shitu.image import DEFAULT_MAX_PIXELS

        sp.add_argument("--max-pixels", type=_pixel_count, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"refuse larger images before decoding them; decoding takes about 7 bytes per pixel "
                             f"(16 for WebP) (default {DEFAULT_MAX_PIXELS}, about 350 MB)")

    d = sub.add_parser("detect", help="detect main objects")
    d.add_argument("--bundle", required=True)
    d.add_argument("images", nargs="+", metavar="IMG")
    d.add_argument("--json", action="store_true")
    d.add_argument("--min-score", type=float, default=None)
    d.add_argument("--max-detections", type=int, default=None)
    threads(d)
    image_limit(d)
    d.set_defaults(func=_cmd_detect)

    e = sub.add_parser("embed", help="512-bit code of whole images (128 hex chars)")
    e.add_argument("--bundle", required=True)
    e.add_argument("images", nargs="+", metavar="IMG")
    e.add_argument("--json", action="store_true")
    threads(e)
    image_limit(e)
    e.set_defaults(func=_cmd_embed)

    r = sub.add_parser("recognize", help="detect, embed and search a gallery")
    r.add_argument("--bundle", required=True)
    r.add_argument("--gallery", required=True)
    r.add_argument("images", nargs="+", metavar="IMG")
    r.add_argument("--json", action="store_true")
    r.add_argument("--timings", action="store_true", help="per-stage timings in ms")
    r.add_argument("--max-distance", type=int, default=None, help="accept matches within this many bits")
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--whole-image", choices=["if_none", "always", "never"], default=None)
    r.add_argument("--include-unknown", action="store_true", help="also list regions with no accepted match")
    r.add_argument("--search-backend", choices=["auto", "numpy", "faiss"], default="auto",
                   help="Hamming search: faiss when installed (auto), or pure numpy")
    threads(r)
    image_limit(r)
    r.set_defaults(func=_cmd_recognize)

    g = sub.add_parser("gallery", help="build and edit galleries").add_subparsers(dest="gallery_cmd", metavar="ACTION", required=True)
    gb = g.add_parser("build", help="build a gallery from a label file")
    gb.add_argument("--bundle", required=True)
    gb.add_argument("--images", required=True, help="image root the label file's paths are relative to")
    gb.add_argument("--labels", required=True, help="label file: relative/path<TAB>label per line")
    gb.add_argument("--out", required=True)
    gb.add_argument("--overwrite", action="store_true")
    gb.add_argument("--keep-embeddings", action="store_true", help="also store float features (allows re-hashing)")
    threads(gb)
    image_limit(gb)
    gb.set_defaults(func=_cmd_gallery_build)

    ga = g.add_parser("add", help="add images to a gallery", usage="%(prog)s G.db --bundle B (--label L IMG... | --labels FILE)")
    # One positional list (gallery first): argparse cannot split two adjacent positionals around options.
    ga.add_argument("paths", nargs="+", metavar="G.db [IMG ...]")
    ga.add_argument("--bundle", required=True)
    ga.add_argument("--label", help="label of the images given on the command line")
    ga.add_argument("--labels", help="label file instead of --label and IMG")
    ga.add_argument("--images-root", help="root of the label file's relative paths")
    ga.add_argument("--keep-embeddings", action="store_true")
    threads(ga)
    image_limit(ga)
    ga.set_defaults(func=_cmd_gallery_add)

    gr = g.add_parser("remove", help="remove items by id or label")
    gr.add_argument("gallery")
    gr.add_argument("--id", dest="ids", type=int, nargs="+")
    gr.add_argument("--label")
    gr.set_defaults(func=_cmd_gallery_remove)

    gl = g.add_parser("relabel", help="give items a new label")
    gl.add_argument("gallery")
    gl.add_argument("--id", dest="ids", type=int, nargs="+", required=True)
    gl.add_argument("--label", required=True)
    gl.set_defaults(func=_cmd_gallery_relabel)

    gs = g.add_parser("list", help="list items")
    gs.add_argument("gallery")
    gs.add_argument("--label")
    gs.add_argument("--limit", type=int)
    gs.add_argument("--json", action="store_true")
    gs.set_defaults(func=_cmd_gallery_list)

    gi = g.add_parser("info", help="gallery summary")
    gi.add_argument("gallery")
    gi.add_argument("--json", action="store_true")
    gi.set_defaults(func=_cmd_gallery_info)

    gc = g.add_parser("check", help="integrity: SQLite check, counts, code lengths, fingerprint (exit 1 on damage)")
    gc.add_argument("gallery")
    gc.add_argument("--bundle", help="also check that the codes are this bundle's: fingerprints, and codes "
                                     "recomputed from stored embeddings (a sample of 1000)")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=_cmd_gallery_check)

    gu = g.add_parser("upgrade", help="rewrite a format-1 gallery in the current format (keeps a .v1.bak)")
    gu.add_argument("gallery")
    gu.set_defaults(func=_cmd_gallery_upgrade)

    m = sub.add_parser("models", help="official model archives pinned in models.lock").add_subparsers(dest="models_cmd", metavar="ACTION", required=True)
    ml = m.add_parser("list")
    ml.add_argument("--lock", help="models.lock to read (default: the project's)")
    ml.add_argument("--cache", help="cache directory to report on")
    ml.set_defaults(func=_cmd_models_list)
    mf = m.add_parser("fetch")
    mf.add_argument("name")
    mf.add_argument("--mirror", help="local directory (or http(s) URL) laid out like the official hosts")
    mf.add_argument("--cache", help="where models are unpacked (default: ~/.cache/edge-shitu/models)")
    mf.add_argument("--lock")
    mf.add_argument("--force", action="store_true", help="fetch again even when cached")
    mf.set_defaults(func=_cmd_models_fetch)

    rp = sub.add_parser("replicate", help="official graph + deterministic random weights (a replica)")
    rp.add_argument("graph_dir")
    rp.add_argument("out_dir")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=_cmd_replicate)

    cv = sub.add_parser("convert", help="Paddle inference models -> bundle")
    cv.add_argument("--det", help="detector model folder")
    cv.add_argument("--rec", help="extractor model folder")
    cv.add_argument("--out", required=True)
    cv.add_argument("--hash-head", metavar="HEAD.npz",
                    help="learned hash head (edge-shitu hash train) to put into the bundle as hash.npz")
    cv.add_argument("--format", choices=["onnx", "lite-x86", "lite-arm"], default="onnx",
                    help="onnx (onnxruntime, any machine) or a Paddle-Lite .nb for x86 or arm")
    cv.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    cv.add_argument("--calib", help="int8: folder of real photos to calibrate on (searched recursively)")
    cv.add_argument("--calib-count", type=int, help="int8: how many calibration photos")
    cv.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], help="onnx int8: calibration method")
    cv.add_argument("--quant-mode", choices=["static", "dynamic"], help="onnx int8: static (calibrated) or dynamic")
    cv.add_argument("--lite-algo", choices=["avg", "hist", "KL"], help="lite int8: post-training quantisation algorithm")
    cv.add_argument("--lite-opt", help="lite: the paddle_lite_opt executable (default: $EDGE_SHITU_LITE_OPT, PATH)")
    cv.add_argument("--lite-python", help="lite --verify: Python of the Lite side environment")
    cv.add_argument("--verify", action="store_true",
                    help="compare with Paddle Inference on real photos; fail when agreement is too low")
    cv.add_argument("--verify-images", help="photos for --verify (default: the shared drink test images)")
    cv.set_defaults(func=_cmd_convert)

    bi = sub.add_parser("bundle", help="inspect bundles").add_subparsers(dest="bundle_cmd", metavar="ACTION", required=True)
    bif = bi.add_parser("info", help="manifest, sizes and verification figures")
    bif.add_argument("bundle")
    bif.add_argument("--json", action="store_true")
    bif.set_defaults(func=_cmd_bundle_info)

    q = sub.add_parser("quickstart", help="models -> bundle -> drink gallery -> recognise the test images")
    q.add_argument("--shared", help="shared data folder (default: ../shared or $EDGE_SHITU_SHARED)")
    q.add_argument("--work", help="where artefacts are kept (default: ~/.cache/edge-shitu/quickstart)")
    q.add_argument("--models", choices=["auto", "official", "replica"], default="auto",
                   help="auto: official weights when they can be fetched, else replicas (said loudly)")
    q.add_argument("--mirror", help="mirror of the official hosts for the official weights")
    q.add_argument("--limit", type=int, default=None, help="use only the first N gallery images")
    threads(q)
    q.set_defaults(func=_cmd_quickstart)

    # Commands of the other concerns live in their own modules and attach to the same parser.
    import importlib

    groups = {"gallery": g}
    for name in _EXTENSIONS:
        importlib.import_module(f"edge_shitu.cli.{name}").register(sub, groups)
    return p


def main(argv: Optional[Sequence[str]] = None, *, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run the command line.

    Args:
      argv: arguments without the program name; ``None`` reads ``sys.argv``.
      stdout: where results go (default ``sys.stdout``).
      stderr: where errors and progress go (default ``sys.stderr``).

    Returns:
      0 on success, 2 for bad input (missing or undecodable files, bad arguments), 1 for other failures.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = _parser()
    try:
        # argparse writes usage and help to the process streams; send them where the caller asked.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args, extra = parser.parse_known_args(argv)
            # argparse stops filling a positional list at the first option; file names that follow
            # options ("add G.db --label L a.jpg b.jpg") belong to the command's list all the same.
            target = next((n for n in ("paths", "images") if isinstance(getattr(args, n, None), list)), None)
            if extra and target and not any(e.startswith("-") for e in extra):
                setattr(args, target, list(getattr(args, target) or []) + extra)
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            if args.version:
                out.write(f"edge-shitu {__version__}\n")
                return EXIT_OK
            if args.command is None:
                parser.error("a command is required")
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.func(args, out, err)
    except BrokenPipeError:
        # The reader went away (`edge-shitu gallery list | head`): what it wanted was written.
        _silence_stdout(out)
        return EXIT_OK
    except BackendUnavailableError as exc:
        _report(exc, args, err)
        return EXIT_FAILURE
    except (EdgeShituError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        _report(exc, args, err)
        bad_input = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
        return EXIT_BAD_INPUT if isinstance(exc, bad_input) else EXIT_FAILURE
    except KeyboardInterrupt:
        err.write("edge-shitu: interrupted\n")
        return 130
    except MemoryError:
        err.write("edge-shitu: error: out of memory; use smaller inputs or batches (nothing was changed)\n")
        return EXIT_FAILURE
    except OSError as exc:  # the machine's limits (a full disk, too many open files): not our bug
        _report(exc, args, err)
        return EXIT_FAILURE
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        _report(exc, args, err, unexpected=True)
        return EXIT_FAILURE


def _silence_stdout(out: TextIO) -> None:
    # Python flushes sys.stdout at exit; into a closed pipe that prints a second error.
    if out is sys.stdout:
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _one_line(exc: object, limit: int = 600) -> str:
    """An error message on one line of bounded length, whatever the input put into it."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _report(exc: BaseException, args, err: TextIO, *, unexpected: bool = False) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=err)
    prefix = "internal error: " if unexpected else ""
    if isinstance(exc, OSError) and not isinstance(exc, EdgeShituError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = exc
    err.write(f"edge-shitu: error: {prefix}{_one_line(text)}\n")
    if unexpected and not getattr(args, "debug", False):
        err.write("edge-shitu: run again with --debug for the traceback\n")
