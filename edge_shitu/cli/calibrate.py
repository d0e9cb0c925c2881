"""``edge-shitu gallery calibrate G``: choose and store the gallery's acceptance threshold for a target precision.

The threshold is the one the recogniser applies to the gallery: ``max_distance`` (bits) for Hamming
search, ``min_similarity`` for a gallery that keeps compact features (re-ranked search).

The measurement itself (leave-one-out and leave-one-class-out queries, the curve, the choice) is
:mod:`edge_shitu.calibration`; this module parses arguments, stores the threshold, prints the
curve and draws it with matplotlib (the ``bench`` extra), imported only for ``--plot``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional, TextIO

import numpy as np

from edge_shitu.cli.common import EXIT_FAILURE, EXIT_OK, fraction, heavy, whole_number
from edge_shitu.errors import InvalidInputError

__all__ = ["register"]

# Curve table: this many rows either side of the chosen threshold, this many thresholds apart (4 bits, or
# 0.02 of similarity).
_TABLE_SIDE_ROWS = 5
_TABLE_STEP = 4


def register(subparsers, groups) -> None:
    """Adds ``calibrate`` to the ``gallery`` command.

    Args:
      subparsers: the top-level subparsers (unused: the command lives under ``gallery``).
      groups: ``{"gallery": <the gallery command's subparsers>}``.
    """
    p = groups["gallery"].add_parser(
        "calibrate", help="choose the acceptance threshold for a target precision from the gallery's own items",
        description="Leave-one-out (known objects) and leave-one-class-out (unknown objects) searches of the "
                    "gallery's own items give a precision/recall curve over the acceptance threshold, and the "
                    "most accepting threshold that reaches the target precision is stored in the gallery; the "
                    "recogniser uses it unless an option overrides it. Hamming galleries: max_distance "
                    "(--max-distance); galleries built with --compact (re-ranked search): min_similarity "
                    "(--min-similarity).")
    p.add_argument("gallery", help="the gallery file to calibrate (its own items are the queries)")
    p.add_argument("--precision", type=fraction(low_open=True), default=0.95,
                   help="target precision in (0, 1] (default 0.95)")
    p.add_argument("--max-queries", type=whole_number(1), default=2000,
                   help="items used as queries; larger galleries are sampled (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample (default 0)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, but do not store the threshold")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the curve into this PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the curve and the choice as one JSON object")
    p.set_defaults(func=_cmd_gallery_calibrate)


def _cmd_gallery_calibrate(args, out: TextIO, err: TextIO) -> int:
    from edge_shitu.calibration import CalibrationOptions, calibrate_gallery, store_threshold
    from edge_shitu.gallery import Gallery

    options = CalibrationOptions(target_precision=args.precision, max_queries=args.max_queries, seed=args.seed)
    figure_cls = None
    if args.plot:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            raise InvalidInputError(f"--plot {args.plot}: the plot is written as PNG, give a file name ending in .png")
        if not plot.parent.is_dir():
            raise InvalidInputError(f"--plot {args.plot}: folder {plot.parent} does not exist")
        # Before the measurement, so a missing extra costs nothing and changes nothing.
        figure_cls = heavy("matplotlib.figure", "bench").Figure

    with Gallery.open(args.gallery, readonly=args.dry_run) as gallery:
        previous = gallery.min_similarity if gallery.compact is not None else gallery.max_distance
        result = calibrate_gallery(gallery, options=options)
        conflict_labels = gallery.labels_of(result.conflicts[:3].ravel()) if result.conflicts.size else []
        if figure_cls is not None:
            _plot(result, figure_cls, Path(args.plot), Path(args.gallery).name)
        stored = not args.dry_run and store_threshold(gallery, result)

    if result.conflicts.size:
        examples = ", ".join(
            f"id {int(a)} {la!r} = id {int(b)} {lb!r}"
            for (a, b), la, lb in zip(result.conflicts[:3], conflict_labels[0::2], conflict_labels[1::2]))
        err.write(f"warning: {result.conflicts.shape[0]} sampled item(s) have the very same code as an item of "
                  f"another label ({examples}); no threshold can tell them apart, so precision is capped: "
                  "relabel or remove the duplicates\n")
    if args.json:
        json.dump(_record(args, result, previous, stored), out, ensure_ascii=False, indent=2)
        out.write("\n")
    else:
        _write_text(args, result, previous, stored, out)
    return EXIT_OK if result.reached else EXIT_FAILURE


def _num(x: float, digits: int = 4) -> Optional[float]:
    return None if math.isnan(x) else round(float(x), digits)


def _name(result) -> str:
    """The setting the curve's thresholds are values of."""
    return "min_similarity" if result.metric == "similarity" else "max_distance"


def _value(result, t) -> str:
    return f"{t:.3f}" if result.metric == "similarity" else str(t)


def _point_record(result, p) -> dict:
    return {_name(result): p.threshold, "precision": _num(p.precision), "recall": _num(p.recall),
            "accept_rate": _num(p.accept_rate), "unknown_accept_rate": _num(p.unknown_accept_rate),
            "correct": p.correct, "wrong": p.wrong, "unknown": p.unknown}


def _record(args, result, previous: Optional[int], stored: bool) -> dict:
    best = result.best_precision()
    name = _name(result)
    return {
        "gallery": args.gallery,
        "metric": result.metric,
        "shortlist": result.shortlist,
        "items": result.items,
        "labels": result.labels,
        "queries": {"sampled": result.sampled, "count": int(result.query_ids.shape[0]), "seed": result.seed,
                    "known": result.known_queries, "unknown": result.unknown_queries},
        "target_precision": result.target_precision,
        "reached": result.reached,
        "chosen": None if result.chosen is None else _point_record(result, result.chosen),
        "best_precision": None if best is None else _point_record(result, best),
        f"previous_{name}": previous,
        "stored": stored,
        name: result.threshold if stored else previous,
        "conflicts": result.conflicts.tolist(),
        "plot": args.plot,
        "curve": [_point_record(result, result.point(t)) for t in result.thresholds.tolist()],
    }


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _table_rows(result, centre) -> List[int]:
    """Positions on the curve around the threshold ``centre``."""
    middle = int(np.flatnonzero(np.abs(result.thresholds - centre) < 1e-9)[0])
    rows = {middle}
    for k in range(1, _TABLE_SIDE_ROWS + 1):
        rows.update((middle - k * _TABLE_STEP, middle + k * _TABLE_STEP))
    return sorted(i for i in rows if 0 <= i < result.thresholds.shape[0])


def _write_text(args, result, previous, stored: bool, out: TextIO) -> None:
    name = _name(result)
    q = int(result.query_ids.shape[0])
    how = (f"{q:,} of {result.items:,} items sampled as queries (seed {result.seed}; --max-queries to change)"
           if result.sampled else f"all {q:,} items used as queries")
    search = ("Hamming search" if result.metric == "distance"
              else f"re-ranked search (Hamming top-{result.shortlist} by compact features)")
    out.write(f"{args.gallery}: {result.items:,} items, {result.labels:,} labels, {search}; {how}: "
              f"{result.known_queries:,} known (leave-one-out), {result.unknown_queries:,} unknown (leave-one-class-out)\n")
    chosen = result.chosen
    if chosen is not None:
        out.write(f"target precision {result.target_precision:g}: {name} {_value(result, chosen.threshold)} "
                  f"(precision {chosen.precision:.4f}, recall {chosen.recall:.4f}, accept rate {chosen.accept_rate:.3f}, "
                  f"unknown objects accepted {100 * chosen.unknown_accept_rate:.1f} %)\n")
        centre = chosen.threshold
    else:
        best = result.best_precision()
        if best is None:
            out.write(f"target precision {result.target_precision:g} cannot be reached: no query is ever accepted\n")
            centre = result.thresholds[0]
        else:
            out.write(f"target precision {result.target_precision:g} cannot be reached: the best is "
                      f"{best.precision:.4f} at {name} {_value(result, best.threshold)} (recall {best.recall:.4f})\n")
            centre = best.threshold
    option = "--" + name.replace("_", "-")
    if stored:
        out.write(f"stored in {args.gallery} (was {previous}): the recogniser uses {name} "
                  f"{_value(result, result.threshold)} unless {option} is given\n")
    elif result.reached:
        out.write(f"dry run: {args.gallery} not changed ({name} stays {previous})\n")
    else:
        out.write(f"nothing stored: {args.gallery} keeps {name} {previous}\n")
    out.write(f"  {name}  precision  recall  accepted  unknowns accepted\n")
    for i in _table_rows(result, centre):
        p = result.point(result.thresholds[i].item())
        mark = "*" if result.threshold is not None and p.threshold == result.threshold else " "
        out.write(f"  {_value(result, p.threshold):>{len(name)}}{mark} {_fmt(p.precision, 4):>9}  {_fmt(p.recall, 4):>6}  "
                  f"{_fmt(p.accept_rate):>8}  {_fmt(p.unknown_accept_rate):>17}\n")
    if args.plot:
        out.write(f"curve drawn in {args.plot}\n")


def _plot(result, figure_cls, path: Path, title: str) -> None:
    t = result.thresholds
    # Where every query is accepted the curve is flat: leave that out (beyond the distance, below the similarity).
    everything = np.flatnonzero(result.accept_rate >= 1.0)
    if result.metric == "distance":
        low, high = 0, (min(result.bits, int(everything[0] * 1.1) + 1) if everything.size else result.bits)
    else:
        low, high = (float(t[everything[-1]]) if everything.size else -1.0), 1.0
    fig = figure_cls(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, result.precision, label="precision")
    ax.plot(t, result.recall, label="recall (known objects)")
    ax.plot(t, result.unknown_accept_rate, label="unknown objects accepted")
    ax.axhline(result.target_precision, color="grey", linestyle=":", linewidth=1, label=f"target {result.target_precision:g}")
    if result.threshold is not None:
        ax.axvline(result.threshold, color="black", linestyle="--", linewidth=1,
                   label=f"{_name(result)} {_value(result, result.threshold)}")
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("max_distance (bits)" if result.metric == "distance" else "min_similarity (inner product)")
    q = int(result.query_ids.shape[0])
    ax.set_title(f"{title}: {result.items} items, {q} {'sampled ' if result.sampled else ''}queries")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
