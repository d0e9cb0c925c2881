"""The converter's commands, registered with ``edge-shitu`` through the ``edge_shitu.commands`` entry point:
``models list | fetch``, ``replicate``, ``convert``, ``quickstart`` and ``gallery upgrade``.

This module imports nothing heavy: each command imports what it needs when it runs, and ``--help``
says when the ``convert`` extra is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, TextIO

from edge_shitu.cli.bundle import print_verification
from edge_shitu.cli.common import EXIT_OK, Progress, add_threads, heavy, missing_extra
from edge_shitu.errors import EdgeShituError, InvalidInputError
# Standard library and numpy only: the names of paddleslim's algorithms without Paddle.
from edge_shitu_converters.paddleslim_worker import ALGOS as _SLIM_ALGOS

__all__ = ["register"]

# What the commands that run Paddle need beyond the runtime.
_PADDLE = ("paddle", "paddle2onnx", "onnx")


def _module(name: str):
    return heavy(f"edge_shitu_converters.{name}", "convert")


def _cmd_models_list(args, out: TextIO, err: TextIO) -> int:
    fetch = _module("fetch")
    lock = fetch.load_lock(args.lock)
    for row in fetch.list_models(lock, cache_dir=Path(args.cache) if args.cache else None):
        cached = "" if row.cached is None else ("\tcached" if row.cached else "\tnot cached")
        out.write(f"{row.name}\t{row.role}\tfiles pinned {row.pinned}/{row.pinned + row.unpinned}"
                  f"{cached}\t{row.url}\n")
    return EXIT_OK


def _cmd_models_fetch(args, out: TextIO, err: TextIO) -> int:
    fetch = _module("fetch")
    lock = fetch.load_lock(args.lock)
    cache = Path(args.cache) if args.cache else fetch.default_cache_dir()
    bar: dict = {}

    def progress(done: int, total: Optional[int]) -> None:
        if total:
            bar.setdefault("p", Progress("downloading", total, err)).update(done)

    try:
        report = fetch.fetch(args.name, cache_dir=cache, mirror=args.mirror, lock=lock, force=args.force,
                             progress=progress)
    finally:
        if "p" in bar:
            bar["p"].__exit__(None, None, None)
    state = "already cached, verified" if report.cached else f"fetched from {report.source}"
    out.write(f"{args.name}: {report.model_dir} ({state})\n")
    out.write(f"  archive sha256 {report.archive_sha256}\n")
    for f in report.files:
        out.write(f"  {f.path}: sha256 {f.sha256} ({f.status})\n")
    return EXIT_OK


def _cmd_replicate(args, out: TextIO, err: TextIO) -> int:
    replica = _module("replica")
    path = replica.write_replica(Path(args.graph_dir), Path(args.out_dir), seed=args.seed)
    out.write(f"replica written to {path} (seed {args.seed}; random weights: outputs are meaningless)\n")
    return EXIT_OK


def _cmd_convert(args, out: TextIO, err: TextIO) -> int:
    convert = _module("convert")
    if not args.det and not args.rec:
        raise InvalidInputError("give --det DIR, --rec DIR or both")
    verify_images = args.verify_images
    if args.verify and verify_images is None:
        verify_images = _default_verify_images()
    # Every option given reaches convert(), which refuses those of another format or precision (dropping them here
    # would ignore them silently).
    given = {"calib_dir": args.calib, "calib_count": args.calib_count, "calib_method": args.calib_method,
             "quant_mode": args.quant_mode, "lite_algo": args.lite_algo, "lite_opt": args.lite_opt,
             "lite_python": args.lite_python, "lite_qat": args.lite_qat,
             "lite_bias_correction": args.lite_bias_correction}
    quant = {k: v for k, v in given.items() if v is not None}
    if args.lite_skip is not None:
        quant["lite_skip"] = _names(args.lite_skip, "--lite-skip")
    if args.int8_layers is not None:
        quant["int8_layers"] = args.int8_layers
    path = convert.convert(Path(args.det) if args.det else None, Path(args.rec) if args.rec else None,
                           Path(args.out), format=args.format, precision=args.precision, verify=args.verify,
                           verify_images=verify_images, hash_head=args.hash_head, **quant)
    out.write(f"bundle written to {path}\n")
    if args.verify:
        from edge_shitu.bundle import Bundle

        print_verification(Bundle.load(path).verification, out)
    return EXIT_OK


def _int8_layers(text: str):
    from edge_shitu_converters.int8_search import parse_int8_layers

    try:
        return parse_int8_layers(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str, flag: str) -> list:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise InvalidInputError(f"{flag} takes comma-separated names without empty ones, got {text!r}")
    return names


def _default_verify_images() -> str:
    shared = _module("shared")
    try:
        root = shared.find_shared()
    except EdgeShituError:
        raise InvalidInputError("--verify needs real photos: give --verify-images DIR") from None
    return str(root / "data" / "drink_dataset_v1.0" / "test_images")


def _cmd_quickstart(args, out: TextIO, err: TextIO) -> int:
    quickstart = _module("quickstart")
    return quickstart.run(shared=args.shared, work=args.work, models=args.models, bundle=args.bundle,
                          mirror=args.mirror, threads=args.threads, limit=args.limit, out=out, err=err)


def _cmd_gallery_upgrade(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.gallery import FORMAT_VERSION
    from edge_shitu_converters.gallery_upgrade import upgrade_gallery

    backup = upgrade_gallery(args.gallery)
    out.write(f"{args.gallery}: upgraded to format {FORMAT_VERSION}; the old file is kept as {backup}\n")
    return EXIT_OK


def register(subparsers, groups) -> None:
    """Adds the converter's commands to the ``edge-shitu`` parser."""
    note = missing_extra("convert", _PADDLE)

    m = subparsers.add_parser("models", help="official model archives pinned in models.lock").add_subparsers(
        dest="models_cmd", metavar="ACTION", required=True)
    ml = m.add_parser("list", help="the pinned models, their files and whether they are cached")
    ml.add_argument("--lock", help="models.lock to read (default: the one installed with edge-shitu)")
    ml.add_argument("--cache", help="cache directory to report on")
    ml.set_defaults(func=_cmd_models_list)
    mf = m.add_parser("fetch", help="download (or copy from a mirror), verify and unpack one pinned model")
    mf.add_argument("name", help="a name from `edge-shitu models list`")
    mf.add_argument("--mirror", help="local directory (or http(s) URL) laid out like the official hosts")
    mf.add_argument("--cache", help="where models are unpacked (default: ~/.cache/edge-shitu/models)")
    mf.add_argument("--lock", help="models.lock to read (default: the one installed with edge-shitu)")
    mf.add_argument("--force", action="store_true", help="fetch again even when cached")
    mf.set_defaults(func=_cmd_models_fetch)

    rp = subparsers.add_parser("replicate", help="official graph + deterministic random weights (a replica)" + note)
    rp.add_argument("graph_dir", help="folder with the official inference.pdmodel")
    rp.add_argument("out_dir", help="folder to write the replica into")
    rp.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    rp.set_defaults(func=_cmd_replicate)

    cv = subparsers.add_parser("convert", help="Paddle inference models -> bundle" + note)
    cv.add_argument("--det", help="detector model folder")
    cv.add_argument("--rec", help="extractor model folder")
    cv.add_argument("--out", required=True, help="the bundle folder to write")
    cv.add_argument("--hash-head", metavar="HEAD.npz",
                    help="learned hash head (edge-shitu hash train) to put into the bundle as hash.npz")
    cv.add_argument("--format", choices=["onnx", "lite-x86", "lite-arm"], default="onnx",
                    help="onnx (onnxruntime, any machine) or a Paddle-Lite .nb for x86 or arm")
    cv.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="model precision (default fp32)")
    cv.add_argument("--calib", help="int8: folder of real photos to calibrate on (searched recursively)")
    cv.add_argument("--calib-count", type=int, help="int8: how many calibration photos")
    cv.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], help="onnx int8: calibration method")
    cv.add_argument("--quant-mode", choices=["static", "dynamic"], help="onnx int8: static (calibrated) or dynamic")
    cv.add_argument("--int8-layers", type=_int8_layers, default=None, metavar="auto|all|N",
                    help="int8: what stays float. auto (default): with --verify, a model that fails is searched "
                         "for the fewest float blocks (a weighted layer and the ops after it, most damaging first) "
                         "with which it passes, each step printed (Paddle-Lite: weights of paddleslim's skip list, "
                         "each candidate checked in simulated INT8, so ARM bundles too); all: quantise every block; "
                         "N: keep the N most damaging blocks float (with --verify, an ARM Paddle-Lite bundle is "
                         "checked in simulated INT8 for all and N too, and refused when it fails)")
    cv.add_argument("--lite-algo", choices=list(_SLIM_ALGOS),
                    help="lite int8: paddleslim quant_post_static algorithm (default avg); with --lite-qat, that of "
                         "the post-training quantisation training starts from")
    cv.add_argument("--lite-bias-correction", action="store_const", const=True,
                    help="lite int8: paddleslim's bias correction of the weights' quantisation error")
    cv.add_argument("--lite-skip", metavar="NAME,...",
                    help="lite int8: weights whose ops stay in float (paddleslim's skip list; with --lite-qat, "
                         "its skip name scope), e.g. "
                         "extractor:conv2d_0.w_0 (a bare name when only one model has it)")
    cv.add_argument("--lite-opt", help="lite: the paddle_lite_opt executable (default: $EDGE_SHITU_LITE_OPT, PATH)")
    cv.add_argument("--lite-qat", type=int, metavar="ITERS",
                    help="lite int8: paddleslim quantisation-aware training for ITERS iterations after "
                         "post-training quantisation (--lite-algo), whose activation scales it keeps: the fp32 model "
                         "is the teacher, the --calib photos the data (no labels), with the --lite-skip and "
                         "--int8-layers N weights float; 1-3 s per iteration for the extractor, about 3 s for the "
                         "detector here, after the post-training run")
    cv.add_argument("--lite-python", help="lite: Python of the Lite side environment (int8 quantisation, --verify)")
    cv.add_argument("--verify", action="store_true",
                    help="compare with Paddle Inference on real photos; fail when agreement is too low")
    cv.add_argument("--verify-images", help="photos for --verify (default: the shared drink test images)")
    cv.set_defaults(func=_cmd_convert)

    q = subparsers.add_parser("quickstart", help="models -> bundle -> drink gallery -> recognise the test images"
                              + (" [without the convert extra: give --bundle]" if note else ""))
    q.add_argument("--shared", help="shared data folder (default: $EDGE_SHITU_SHARED, else ../shared when present; "
                                    "without one, the official demo data set is fetched into the work folder)")
    q.add_argument("--work", help="where artefacts are kept (default: ~/.cache/edge-shitu/quickstart)")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--models", choices=["auto", "official", "replica"], default=None,
                     help="auto (default): official weights when they can be fetched, else replicas (said loudly)")
    src.add_argument("--bundle", help="use this bundle (from `edge-shitu convert`) instead of converting models; "
                                      "needs only the onnx extra")
    q.add_argument("--mirror", help="local folder (or http(s) URL) laid out like the official hosts, "
                                    "<host>/<url path>, for the official models and data set")
    q.add_argument("--limit", type=int, default=None, help="use only the first N gallery images")
    add_threads(q)
    q.set_defaults(func=_cmd_quickstart)

    gu = groups["gallery"].add_parser("upgrade", help="rewrite a format-1 gallery in the current format (keeps a .v1.bak)")
    gu.add_argument("gallery", help="the format-1 gallery file")
    gu.set_defaults(func=_cmd_gallery_upgrade)
