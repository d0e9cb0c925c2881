"""``edge-shitu gallery build | add | remove | relabel | list | info | check | rehash | compact``.

Each command's change to a gallery is one transaction (see :mod:`edge_shitu.enrol`); label files
and labels are checked whole before any image is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, TextIO

from edge_shitu.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    Progress,
    add_image_limit,
    add_threads,
    embedder_options,
    expand_images,
    one_line,
    replica_note,
    whole_number,
    write_json,
)
from edge_shitu.errors import GalleryError, InvalidInputError

__all__ = ["register"]


def _cmd_build(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import build_gallery
    from edge_shitu.labelfile import read_label_file

    entries = read_label_file(args.labels)
    bundle = Bundle.load(args.bundle)
    with Embedder.from_bundle(bundle, options=embedder_options(args)) as emb, \
            Progress("embedding", len(entries), err) as progress:
        summary = build_gallery(bundle, Path(args.images), entries, Path(args.out), embedder=emb,
                                keep_embeddings=args.keep_embeddings, thumbnails=args.thumbnails,
                                compact=args.compact, overwrite=args.overwrite,
                                on_skip=lambda p, why: err.write(f"skipped: {one_line(why)}\n"),
                                on_progress=lambda done, total: progress.update(done))
    out.write(f"gallery {args.out}: {summary.added} image(s) added, {len(summary.skipped)} skipped, "
              f"{summary.labels} label(s)\n")
    replica_note(bundle, err)
    return EXIT_OK


def _cmd_add(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.embedder import Embedder
    from edge_shitu.enrol import enrol
    from edge_shitu.gallery import Gallery
    from edge_shitu.labelfile import check_label, read_label_file

    gallery_path, images = args.paths[0], args.paths[1:]
    if args.labels:
        if args.label or images:
            raise InvalidInputError("give either --labels FILE or --label L with image paths, not both")
        root = Path(args.images_root or ".")
        entries = read_label_file(args.labels)
        paths, labels, sources = [root / e.path for e in entries], [e.label for e in entries], [e.path for e in entries]
    else:
        if not args.label or not images:
            raise InvalidInputError("give --label L and one or more image paths (or --labels FILE)")
        check_label(args.label, "--label")
        images = expand_images(images)
        paths, labels, sources = [Path(p) for p in images], [args.label] * len(images), list(images)
    bundle = Bundle.load(args.bundle)
    with Gallery.open(gallery_path, fingerprint=bundle.code_fingerprint) as gallery, \
            Embedder.from_bundle(bundle, options=embedder_options(args)) as emb, \
            Progress("embedding", len(paths), err) as progress:
        summary = enrol(gallery, emb, paths, labels, sources=sources, keep_embeddings=args.keep_embeddings,
                        embedding_fingerprint=bundle.embedding_fingerprint, thumbnails=args.thumbnails,
                        on_skip=lambda p, why: err.write(f"skipped: {one_line(why)}\n"),
                        on_progress=lambda done, total: progress.update(done))
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


def _cmd_remove(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    if bool(args.ids) == bool(args.label):
        raise InvalidInputError("give either --id N [N ...] or --label L")
    with Gallery.open(args.gallery) as gallery:
        if args.ids:
            n = gallery.remove(args.ids)
        else:
            n = gallery.remove_label(args.label)
            if n == 0:
                # As for an unknown --id: naming nothing that exists is the user's mistake, not a no-op.
                raise GalleryError(f"{args.gallery}: no item has --label {args.label!r}; nothing was changed")
    out.write(f"removed {n} item(s)\n")
    return EXIT_OK


def _cmd_relabel(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery
    from edge_shitu.labelfile import check_label

    check_label(args.label, "--label")
    with Gallery.open(args.gallery) as gallery:
        n = gallery.relabel(args.ids, args.label)
    out.write(f"relabelled {n} item(s) as {args.label!r}\n")
    return EXIT_OK


def _cmd_list(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    with Gallery.open(args.gallery, readonly=True) as gallery:
        items = gallery.items(label=args.label, limit=args.limit)
    if args.json:
        write_json([{"id": it.id, "label": it.label, "source": it.source} for it in items], out)
    else:
        for it in items:
            out.write(f"{it.id}\t{it.label}\t{it.source or ''}\n")
    return EXIT_OK


def _cmd_info(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import Gallery

    with Gallery.open(args.gallery, readonly=True) as gallery:
        info = gallery.info()
    record = {
        "path": str(info.path), "items": info.count, "labels": info.label_count, "bits": info.bits,
        "fingerprint": info.fingerprint, "embedding_fingerprint": info.embedding_fingerprint,
        "format_version": info.format_version, "max_distance": info.max_distance,
        "det_threshold": info.det_threshold, "thumbnails": info.thumbnail_count, "compact": info.compact,
        "min_similarity": info.min_similarity, "file_bytes": info.file_size,
    }
    if args.json:
        write_json(record, out)
    else:
        for k, v in record.items():
            if k not in ("det_threshold", "compact", "min_similarity") or v is not None:
                out.write(f"{k}: {v}\n")
    return EXIT_OK


def _cmd_check(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.float_index import index_status
    from edge_shitu.gallery import Gallery, check_gallery

    problems = check_gallery(args.gallery)
    info = index = None
    if not problems:
        with Gallery.open(args.gallery, readonly=True) as gallery:
            info = gallery.info()
            index = index_status(gallery)
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
            record.update(items=info.count, labels=info.label_count, bits=info.bits, fingerprint=info.fingerprint,
                          compact=info.compact)
        if index is not None:
            record["float_index"] = {"path": str(index[0]), "current": index[1] is None, "why": index[1]}
        write_json(record, out)
    elif problems:
        out.write(f"{args.gallery}: {len(problems)} problem(s)\n")
        for p in problems:
            out.write(f"  {p}\n")
    else:
        compact = f", {info.compact} compact features" if info.compact else ""
        out.write(f"{args.gallery}: ok ({info.count} items, {info.label_count} labels, {info.bits}-bit codes"
                  f"{compact}, fingerprint {info.fingerprint})\n")
    if index is not None and not args.json:
        # A cache, rebuilt whenever it is next used: its state is reported, it is not a problem of the gallery.
        state = "up to date" if index[1] is None else f"out of date, rebuilt when next used: {index[1]}"
        out.write(f"float index {index[0]}: {state}\n")
    return EXIT_OK if not problems else EXIT_FAILURE


def _cmd_rehash(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle
    from edge_shitu.gallery import Gallery
    from edge_shitu.hashing import encoder_for

    bundle = Bundle.load(args.bundle)
    dim = bundle.require("extractor").output.dim
    encode = encoder_for(bundle.load_hash_head())
    fingerprint = bundle.code_fingerprint
    with Gallery.open(args.gallery) as gallery:
        info = gallery.info()
        if info.embedding_dim is None and info.count:
            raise GalleryError(
                f"{args.gallery}: stores no float embeddings, so its codes cannot be re-hashed; rebuild it with "
                f"`edge-shitu gallery build ... --keep-embeddings` (then later heads can re-hash it)"
            )
        if info.embedding_dim is not None and info.embedding_dim != dim:
            raise GalleryError(f"{args.gallery}: stores {info.embedding_dim}-d embeddings, but the extractor of "
                               f"{bundle.path} makes {dim}-d features: they come from another model; rebuild it")
        if gallery.bits != bundle.codes.bits:
            raise GalleryError(f"{args.gallery}: holds {gallery.bits}-bit codes, but {bundle.path} makes "
                               f"{bundle.codes.bits}-bit codes; rebuild the gallery with this bundle")
        if gallery.fingerprint == fingerprint and not args.force:
            out.write(f"{args.gallery}: codes already made by {bundle.path} (fingerprint {fingerprint}); "
                      "nothing to do (--force re-hashes anyway)\n")
            return EXIT_OK
        n = gallery.rehash(encode, fingerprint=fingerprint, embedding_fingerprint=bundle.embedding_fingerprint,
                           same_extractor=[bundle.plain_code_fingerprint, fingerprint])
    out.write(f"re-hashed {n} item(s) of {args.gallery} with {bundle.path} "
              f"({'hash head' if bundle.hash is not None else 'plain sign'}, {bundle.codes.bits} bits); "
              f"fingerprint {fingerprint}\n")
    return EXIT_OK


def _cmd_compact(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.compact import bytes_per_item
    from edge_shitu.gallery import DEFAULT_SHORTLIST, Gallery

    fmt = None if args.format == "none" else args.format
    with Gallery.open(args.gallery) as gallery:
        before = gallery.compact
        if before == fmt:
            out.write(f"{args.gallery}: {'already keeps ' + fmt if fmt else 'keeps no'} compact features; "
                      "nothing to do\n")
            return EXIT_OK
        n = gallery.set_compact(fmt)
        dim = gallery.info().embedding_dim
    if fmt is None:
        out.write(f"{args.gallery}: compact features dropped; the recogniser searches by Hamming distance and "
                  "accepts by max_distance again\n")
    else:
        size = f" ({bytes_per_item(fmt, dim)} B each)" if dim else ""
        out.write(f"{args.gallery}: {n} item(s) now keep {fmt} compact features{size}; the recogniser re-ranks the "
                  f"Hamming top-{DEFAULT_SHORTLIST} by them and accepts by min_similarity; run `edge-shitu gallery "
                  f"calibrate {args.gallery}` to choose it for this gallery\n")
    return EXIT_OK


def register(subparsers, groups) -> None:
    """Adds the ``gallery`` command and its actions; ``groups["gallery"]`` takes more actions from other modules."""
    g = subparsers.add_parser("gallery", help="build, change, inspect and check galleries").add_subparsers(
        dest="gallery_cmd", metavar="ACTION", required=True)
    groups["gallery"] = g
    bundle_help = "bundle folder or one-file bundle (.esb) whose extractor makes the codes"

    gb = g.add_parser("build", help="build a new gallery from a label file (atomically)")
    gb.add_argument("--bundle", required=True, help=bundle_help)
    gb.add_argument("--images", required=True, help="image root the label file's paths are relative to")
    gb.add_argument("--labels", required=True, help="label file: relative/path<TAB>label per line")
    gb.add_argument("--out", required=True, help="the gallery file to write")
    gb.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new one is complete)")
    gb.add_argument("--keep-embeddings", action="store_true",
                    help="also store float features (2 KB per item; lets `gallery rehash` apply a new hash head)")
    gb.add_argument("--thumbnails", action="store_true",
                    help="also store a small JPEG of each image (a few KB per item; shown by the kiosk's gallery)")
    gb.add_argument("--compact", choices=["int8", "fp16"], default=None,
                    help="also keep each item's features compactly (int8: d+4 bytes, fp16: 2d) and re-rank the Hamming "
                         "shortlist by them when recognising: float search's recall@1 on the real drink features")
    add_threads(gb)
    add_image_limit(gb)
    gb.set_defaults(func=_cmd_build)

    ga = g.add_parser("add", help="add images to a gallery (all of them, or none)",
                      usage="%(prog)s G.db --bundle B (--label L IMG... | --labels FILE [--images-root DIR])")
    # One positional list (gallery first): argparse cannot split two adjacent positionals around options.
    ga.add_argument("paths", nargs="+", metavar="G.db [IMG ...]",
                    help="the gallery file, then image files, folders or globs (with --label)")
    ga.add_argument("--bundle", required=True, help=bundle_help)
    ga.add_argument("--label", help="label of the images given on the command line")
    ga.add_argument("--labels", help="label file (relative/path<TAB>label per line) instead of --label and images")
    ga.add_argument("--images-root", help="root of the label file's relative paths (default: the current folder)")
    ga.add_argument("--keep-embeddings", action="store_true", help="also store float features (see gallery build)")
    ga.add_argument("--thumbnails", action="store_true",
                    help="also store a small JPEG of each image (see gallery build)")
    add_threads(ga)
    add_image_limit(ga)
    ga.set_defaults(func=_cmd_add)

    gr = g.add_parser("remove", help="remove items by id or label")
    gr.add_argument("gallery", help="the gallery file")
    gr.add_argument("--id", dest="ids", type=whole_number(0), nargs="+", metavar="N", help="ids of the items to remove")
    gr.add_argument("--label", help="remove every item with this label")
    gr.set_defaults(func=_cmd_remove)

    gl = g.add_parser("relabel", help="give items a new label")
    gl.add_argument("gallery", help="the gallery file")
    gl.add_argument("--id", dest="ids", type=whole_number(0), nargs="+", required=True, metavar="N",
                    help="ids of the items")
    gl.add_argument("--label", required=True, help="their new label")
    gl.set_defaults(func=_cmd_relabel)

    gs = g.add_parser("list", help="list items (id, label, source)")
    gs.add_argument("gallery", help="the gallery file")
    gs.add_argument("--label", help="only items with this label")
    gs.add_argument("--limit", type=whole_number(0), metavar="N", help="at most this many items")
    gs.add_argument("--json", action="store_true", help="print one JSON array")
    gs.set_defaults(func=_cmd_list)

    gi = g.add_parser("info", help="gallery summary")
    gi.add_argument("gallery", help="the gallery file")
    gi.add_argument("--json", action="store_true", help="print one JSON object")
    gi.set_defaults(func=_cmd_info)

    gc = g.add_parser("check", help="integrity: SQLite check, counts, code lengths, fingerprint (exit 1 on damage)")
    gc.add_argument("gallery", help="the gallery file")
    gc.add_argument("--bundle", help="also check that the codes are this bundle's: fingerprints, and codes "
                                     "recomputed from stored embeddings (a sample of 1000)")
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.set_defaults(func=_cmd_check)

    gh = g.add_parser("rehash", help="recompute codes from stored embeddings with a bundle's hash head")
    gh.add_argument("gallery", help="the gallery file (built with --keep-embeddings)")
    gh.add_argument("--bundle", required=True, help="the bundle whose codes the gallery is to hold")
    gh.add_argument("--force", action="store_true", help="re-hash even when the fingerprint already matches")
    gh.set_defaults(func=_cmd_rehash)

    gk = g.add_parser("compact", help="make compact features from stored embeddings for re-ranked search (or drop them)",
                      description="Makes every item's compact feature (int8: d+4 bytes, fp16: 2d) from its stored "
                                  "float embedding, in one transaction, so that the recogniser re-ranks the Hamming "
                                  "shortlist and accepts by similarity, as for a gallery built with --compact; "
                                  "`none` drops them. Needs a gallery built with --keep-embeddings. The calibrated "
                                  "min_similarity is cleared when the form changes.")
    gk.add_argument("gallery", help="the gallery file (built with --keep-embeddings)")
    gk.add_argument("format", choices=["int8", "fp16", "none"],
                    help="int8 (per-item scale), fp16, or none to drop the compact features")
    gk.set_defaults(func=_cmd_compact)
