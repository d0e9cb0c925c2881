"""``edge-shitu bundle info``: what a bundle holds and how well its conversion was verified;
``bundle pack`` / ``bundle unpack``: a bundle folder to one file (``.esb``) and back."""

from __future__ import annotations

import json
from typing import TextIO

from edge_shitu.cli.common import EXIT_OK

__all__ = ["register", "print_verification"]


def print_verification(report, out: TextIO) -> None:
    """Prints the verification report of a bundle (``verify.json``), or says there is none."""
    if report is None:
        out.write("verification: never verified (convert --verify)\n")
        return
    if report.get("passed") is None:
        out.write(f"verification: NOT VERIFIED: {report.get('unverifiable')}\n")
        _print_search(report, out)
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
    _print_search(report, out)


def _print_search(report, out: TextIO) -> None:
    """The INT8 search of each model, step by step (``verify.json``'s ``int8_search``)."""
    for role, search in sorted((report.get("int8_search") or {}).items()):
        chosen = search.get("chosen")
        # An ONNX search names blocks; a Paddle-Lite one names the weights of its paddleslim skip list.
        kept = search.get("float_blocks") or search.get("float_weights") or []
        # Paddle-Lite: the weights the user's --lite-skip made float, which no step counts.
        user = len(search.get("user_float_weights") or [])
        if chosen == 0:
            outcome = f"passes with every layer but the {user} of --lite-skip INT8" if user else (
                "passes with every layer INT8")
        elif chosen is not None:
            more = ", ..." if len(kept) > 8 else ""
            outcome = (f"{chosen} kept float (most output noise first: {', '.join(kept[:8])}{more})"
                       + (f", besides the {user} of --lite-skip" if user else ""))
        else:
            outcome = "no candidate passed"
        blocks = "" if search.get("blocks") is None else f"{search['blocks']} blocks, "
        out.write(f"  {role} int8 search: {blocks}{outcome}" + (f"; {search['check']}" if search.get("check") else "")
                  + "\n")
        for step in search.get("steps", []):
            size = "" if step.get("int8_bytes") is None else f"{step['int8_bytes'] / 1e6:.2f} MB, "
            speed = "" if step.get("ms") is None else f"{step['ms']:.1f} ms/run (1 thread), "
            out.write(f"    {step['float_blocks']:>3} float: {'passed' if step['passed'] else 'failed'}, "
                      f"{size}{speed}{_figures(step)}\n")
        # Every block INT8 failed: its weights and its activations, each verified alone.
        parts = search.get("int8_parts") or {}
        for part in sorted(parts, key=lambda name: (name != "weights", name)):
            result = parts[part]
            out.write(f"    only the {part} INT8 (every block): {'passed' if result['passed'] else 'failed'}, "
                      f"{_figures(result)}\n")


def _figures(result) -> str:
    """The agreement figures of one verified candidate, as ``name value`` pairs."""
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.get("figures", {}).items())
                     if k in ("match_rate", "max_score_diff", "min_cosine", "mean_bit_agreement", "min_bit_agreement"))


def _cmd_bundle_info(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(args.bundle)
    if args.json:
        json.dump({"manifest": bundle.manifest, "sizes": {r: m.nbytes for r, m in bundle.models.items()},
                   "verification": bundle.verification}, out, ensure_ascii=False, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"bundle {bundle.name} ({bundle.path})\n")
    total = 0
    for role, m in bundle.models.items():
        size = m.nbytes
        total += size
        src = m.source
        origin = (f"replica seed {src.get('seed')}" if m.is_replica else
                  f"official {src.get('archive', {}).get('name', src.get('model_dir_name'))}")
        out.write(f"  {role}: {_file_name(m)} {size / 1e6:.2f} MB, {m.backend} {m.precision} target {m.target}, "
                  f"input {m.input.name} {list(m.input.shape)} {m.input.interpolation}, {origin}\n")
    out.write(f"  total {total / 1e6:.2f} MB; codes {bundle.codes.bits} bits ({bundle.codes.method}, "
              f"{bundle.codes.bit_order}-endian bits); fingerprint {bundle.code_fingerprint if bundle.extractor else '-'}\n")
    if bundle.hash is not None:
        out.write(f"  hash head: {_file_name(bundle.hash)} [{bundle.hash.bits}, {bundle.hash.dim}] "
                  f"sha256 {bundle.hash.sha256[:16]}...\n")
    out.write("  tools: " + ", ".join(f"{k} {v}" for k, v in sorted(bundle.tools.items())) + "\n")
    print_verification(bundle.verification, out)
    return EXIT_OK


def _file_name(spec) -> str:
    return spec.path.name if spec.member is None else spec.member.name


def _cmd_bundle_pack(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundlefile import pack_bundle

    dest = pack_bundle(args.bundle, args.out, overwrite=args.overwrite)
    out.write(f"packed {args.bundle} into {dest} ({dest.stat().st_size / 1e6:.2f} MB, verified)\n")
    return EXIT_OK


def _cmd_bundle_unpack(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.bundlefile import unpack_bundle

    dest = unpack_bundle(args.bundle, args.out, overwrite=args.overwrite)
    out.write(f"unpacked {args.bundle} into {dest} (verified)\n")
    return EXIT_OK


def register(subparsers, groups) -> None:
    """Adds the ``bundle`` command; ``groups["bundle"]`` takes more actions from other modules."""
    bi = subparsers.add_parser("bundle", help="inspect, pack and unpack bundles").add_subparsers(
        dest="bundle_cmd", metavar="ACTION", required=True)
    groups["bundle"] = bi
    bif = bi.add_parser("info", help="manifest, sizes and verification figures")
    bif.add_argument("bundle", help="bundle folder or one-file bundle (.esb)")
    bif.add_argument("--json", action="store_true", help="print the manifest, sizes and verification as JSON")
    bif.set_defaults(func=_cmd_bundle_info)
    bp = bi.add_parser("pack", help="write a bundle folder as one file (.esb) to copy to a device")
    bp.add_argument("bundle", help="bundle folder")
    bp.add_argument("-o", "--out", required=True, help="the one-file bundle to write (e.g. bundle.esb)")
    bp.add_argument("--overwrite", action="store_true",
                    help="replace --out if it exists (only once the new file is complete and verified)")
    bp.set_defaults(func=_cmd_bundle_pack)
    bu = bi.add_parser("unpack", help="write a one-file bundle (.esb) back out as a bundle folder")
    bu.add_argument("bundle", help="one-file bundle (.esb)")
    bu.add_argument("-o", "--out", required=True, help="the bundle folder to create")
    bu.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is a bundle folder or empty (only once the new one is complete and "
                         "verified)")
    bu.set_defaults(func=_cmd_bundle_unpack)
