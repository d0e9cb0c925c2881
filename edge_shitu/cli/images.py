"""``edge-shitu detect | embed | recognize``: the device commands that look at images.

Each takes image files, folders and globs, goes on after an image it cannot read (reporting it on
stderr and with an ``{"image", "error"}`` record; the exit code is then 2), prints text, one JSON
array (``--json``) or one JSON object per line as each image is done (``--jsonl``). Every record
says whether the bundle is a replica.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from edge_shitu.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    JsonLines,
    Progress,
    add_image_limit,
    add_threads,
    box,
    embedder_options,
    expand_images,
    fraction,
    one_line,
    per_image,
    replica_note,
    whole_number,
)
from edge_shitu.errors import InvalidInputError
from edge_shitu.options import MAX_DETECTIONS, MAX_TOP_K

__all__ = ["register"]


def _cmd_detect(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.detector import Detector
    from edge_shitu.options import BackendOptions, DetectorOptions

    images = expand_images(args.images)
    bundle = Bundle.load(args.bundle)
    bundle.require("detector")
    overrides = {}
    if args.min_score is not None:
        overrides["min_score"] = args.min_score
    if args.max_detections is not None:
        overrides["max_detections"] = args.max_detections
    opts = DetectorOptions(backend=BackendOptions(threads=args.threads), max_pixels=args.max_pixels, **overrides)
    sink = JsonLines(out, lines=args.jsonl, array=args.json)
    with Detector.from_bundle(bundle, options=opts) as det, Progress("detecting", len(images), err) as progress:
        def work(img: str) -> dict:
            dets = det.detect(img)
            if not (args.json or args.jsonl):
                out.write(f"{img}: {len(dets)} box(es)\n")
                for d in dets:
                    out.write(f"  {box(d.box)} score {d.score:.3f}\n")
            return {"image": img, "boxes": [{"box": box(d.box), "score": round(d.score, 4)} for d in dets],
                    "replica": bundle.is_replica}

        code = per_image(images, work, err, sink, debug=args.debug, progress=progress)
    sink.close()
    replica_note(bundle, err)
    return code


def _cmd_embed(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.codes import codes_to_hex
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import embed_files

    images = expand_images(args.images)
    bundle = Bundle.load(args.bundle)
    records = [{"image": img} for img in images]
    sink = JsonLines(out, lines=args.jsonl, array=args.json)
    failed = 0

    def skip(i: int, why: str) -> None:
        nonlocal failed
        failed += 1
        err.write(f"edge-shitu: error: {one_line(why)}\n")
        records[i]["error"] = one_line(why)

    done = 0
    with Embedder.from_bundle(bundle, options=embedder_options(args)) as emb, \
            Progress("embedding", len(images), err) as progress:
        for idx, codes, _ in embed_files(emb, images, batch=emb.options.max_batch, on_skip=skip,
                                         on_progress=lambda n, total: progress.update(n)):
            for i, code in zip(idx, codes_to_hex(codes)):
                records[i].update(code=code, replica=bundle.is_replica)
            # Records go out in input order, as soon as every earlier image is done.
            last = max(idx) + 1
            while done < last:
                _emit_embedding(records[done], sink, out, args)
                done += 1
    for record in records[done:]:
        _emit_embedding(record, sink, out, args)
    sink.close()
    if failed and len(images) > 1:
        err.write(f"edge-shitu: {failed} of {len(images)} image(s) failed\n")
    replica_note(bundle, err)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def _emit_embedding(record: dict, sink: JsonLines, out: TextIO, args) -> None:
    sink.add(record)
    if not (args.json or args.jsonl) and "code" in record:
        out.write(f"{record['image']}\t{record['code']}\n")


def _cmd_recognize(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.options import BackendOptions, DetectorOptions, RecognizerOptions
    from edge_shitu.recognizer import STAGES, Recognizer
    from edge_shitu.records import result_record

    # Checked here too, so that the message names the flags rather than the option fields.
    if args.search_backend == "hnsw" and args.max_distance is not None:
        raise InvalidInputError("--max-distance does not apply to --search-backend hnsw, which accepts matches by "
                                "similarity: use --min-similarity")
    if args.hnsw_ef is not None and args.search_backend != "hnsw":
        raise InvalidInputError(f"--hnsw-ef applies to --search-backend hnsw only, got --search-backend "
                                f"{args.search_backend}")
    images = expand_images(args.images)
    bundle = Bundle.load(args.bundle)
    given = {name: getattr(args, name) for name in ("max_distance", "top_k", "whole_image", "min_similarity")
             if getattr(args, name) is not None}
    if args.hnsw_ef is not None:
        from edge_shitu.float_index import FloatIndexOptions

        given["float_index"] = FloatIndexOptions(ef_search=args.hnsw_ef)
    detector = DetectorOptions(backend=BackendOptions(threads=args.threads))
    opts = RecognizerOptions(**given, detector=detector, embedder=embedder_options(args),
                             include_unknown=args.include_unknown, search_backend=args.search_backend,
                             max_pixels=args.max_pixels)
    sink = JsonLines(out, lines=args.jsonl, array=args.json)
    structured = args.json or args.jsonl
    with Recognizer.from_bundle(bundle, args.gallery, options=opts) as recognizer, \
            Progress("recognising", len(images), err) as progress:
        if recognizer.gallery.backend == "faiss":
            import faiss

            # faiss's idle OpenMP threads spin and take the cores from the model sessions, and one image's
            # queries are one thread's work. A process-wide setting: the application's to make, not the library's.
            faiss.omp_set_num_threads(1)
        def work(img: str) -> dict:
            res = recognizer.recognize(img)
            record = result_record(res, image=img, replica=bundle.is_replica, timings=structured or args.timings)
            if not structured:
                out.write(f"{img}: {len(res.recognitions)} result(s)\n")
                for r in res.recognitions:
                    where = "whole image" if r.whole_image else f"box {box(r.box)}"
                    label = r.label if r.label is not None else "(unknown)"
                    match = ("no match (empty gallery)" if r.distance is None
                             else f"distance {r.distance}  similarity {r.similarity:.3f}")
                    out.write(f"  {label}  {match}  {where}\n")
                if args.timings:
                    out.write("  timings ms: " + ", ".join(f"{k} {res.timings_ms[k]:.1f}" for k in STAGES) + "\n")
            return record

        code = per_image(images, work, err, sink, debug=args.debug, progress=progress)
    sink.close()
    replica_note(bundle, err)
    return code


def _similarity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text[:40]!r}")
    return value


def _images_and_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder or one-file bundle (.esb)")
    p.add_argument("images", nargs="+", metavar="IMG",
                   help="image files, folders (searched recursively for .jpg .jpeg .png .webp .bmp) or globs")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help=f"print one JSON array of {what} at the end")
    out.add_argument("--jsonl", action="store_true", help=f"print {what} as JSON lines, one per image as it is done")
    add_threads(p)
    add_image_limit(p)


def register(subparsers, groups) -> None:
    """Adds ``detect``, ``embed`` and ``recognize``."""
    from edge_shitu.float_index import FloatIndexOptions

    d = subparsers.add_parser("detect", help="detect the main objects of images",
                              description="Boxes of the main objects, best first.")
    _images_and_output(d, "boxes")
    d.add_argument("--min-score", type=fraction(), default=None, metavar="S",
                   help="report boxes with at least this score, 0 to 1 (default: the bundle's)")
    d.add_argument("--max-detections", type=whole_number(1, MAX_DETECTIONS), default=None, metavar="N",
                   help="report at most this many boxes per image (default: the bundle's)")
    d.set_defaults(func=_cmd_detect)

    e = subparsers.add_parser("embed", help="512-bit code of whole images (128 hex characters)")
    _images_and_output(e, "codes")
    e.set_defaults(func=_cmd_embed)

    r = subparsers.add_parser("recognize", help="detect, embed and search a gallery")
    _images_and_output(r, "recognitions")
    r.add_argument("--gallery", required=True, help="the gallery file to search")
    r.add_argument("--timings", action="store_true", help="also give per-stage timings in ms")
    r.add_argument("--max-distance", type=whole_number(0), default=None, metavar="BITS",
                   help="accept a match within this many differing bits; smaller is stricter (default: the "
                        "gallery's calibrated value, else the bundle's); not with --search-backend hnsw")
    r.add_argument("--min-similarity", type=_similarity, default=None, metavar="S",
                   help="with a gallery built with --compact (re-ranked search) or with --search-backend hnsw: "
                        "accept a match whose inner product is at least S, in [-1, 1]; larger is stricter "
                        "(default: the gallery's, else 0.5)")
    r.add_argument("--top-k", type=whole_number(1, MAX_TOP_K), default=None, metavar="K",
                   help="candidates kept per region (default: the bundle's)")
    r.add_argument("--whole-image", choices=["if_none", "always", "never"], default=None,
                   help="recognise the whole image too: only when nothing is detected (if_none), always (the "
                        "reference's behaviour) or never (default: the bundle's)")
    r.add_argument("--include-unknown", action="store_true", help="also list regions with no accepted match")
    r.add_argument("--search-backend", choices=["auto", "numpy", "faiss", "hnsw"], default="auto",
                   help="auto, numpy, faiss: exact Hamming search of the codes (auto: faiss when installed, else "
                        "numpy); hnsw: approximate inner-product search of the float embeddings the gallery stores "
                        "(built with --keep-embeddings), through an index file kept beside the gallery (G.db.hnsw, "
                        "rebuilt when the gallery changes); needs pip install \"edge-shitu[hnsw]\"")
    r.add_argument("--hnsw-ef", type=whole_number(1, 100_000), default=None, metavar="EF",
                   help="with --search-backend hnsw: candidates examined per search; larger finds more of the true "
                        f"nearest items, slower (default {FloatIndexOptions().ef_search})")
    r.set_defaults(func=_cmd_recognize)
