"""Run the runtime on photos and compare two runs (x86 vs arm64): the parity half of ``bench/arm/run``.

    python bench/arm/parity.py run --bundle B [--gallery G.db] [--threads N] [--workers N] --out RUN.json IMG...
    python bench/arm/parity.py compare X86.json ARM.json [--box-tol 0.5]

``run`` needs only the runtime (numpy, Pillow, onnxruntime): it is what executes inside the arm64 chroot.
Per image it records the detections (full-precision boxes and scores), the 512-bit codes of the whole
image and of the best detection's crop (one batched extractor call), and, with a gallery, the top-5
matches of those codes (numpy search backend on both machines). Under emulation one detector call
takes about a minute, so each image is detected once and there is no warm-up call: the first image's
times include the sessions' first-run cost on both machines. ``--workers N`` splits the images over
N processes (each with its own sessions) and merges their records in the original order.

``compare`` prints both runs side by side and exits 1 unless: the same images, the same number of
boxes, every box within ``--box-tol`` pixels per coordinate (after pairing boxes whose near-equal
scores may swap places), identical codes and identical matches. Emulated timings say nothing about
device speed; the report says so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

FORMAT = "edge-shitu-arm-parity"
FORMAT_VERSION = 1
BOX_TOL_PX = 0.5
SEARCH_K = 5
_EXACT_PAIRING_MAX = 8  # up to this many boxes the best pairing is found by trying every permutation

Box = Sequence[float]


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("edge-shitu", "numpy", "pillow", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def collect(bundle: Path, images: Sequence[Path], *, gallery: Optional[Path] = None,
            threads: Optional[int] = None, emulated: bool = False) -> dict:
    """Detect, embed (whole image and best crop) and optionally search every image, timing each step.

    Args:
      emulated: recorded in the run's ``meta`` (the caller knows; the report then warns about timings).

    Returns:
      A JSON-ready dict: ``meta`` (machine, versions, threads, session start-up ms) and ``images``
      (one record per image, in the given order).

    Raises:
      The runtime's errors (missing or damaged bundle, gallery or image; backend not installed).
    """
    from edge_shitu.bundle import Bundle
    from edge_shitu.codes import codes_to_hex
    from edge_shitu.detector import Detector
    from edge_shitu.embedder import Embedder
    from edge_shitu.gallery import Gallery
    from edge_shitu.image import crop, load_image
    from edge_shitu.options import BackendOptions, DetectorOptions, EmbedderOptions

    t0 = time.perf_counter()
    b = Bundle.load(bundle)
    backend = BackendOptions(threads=threads)
    det = Detector.from_bundle(b, options=DetectorOptions(backend=backend))
    emb = Embedder.from_bundle(b, options=EmbedderOptions(backend=backend))
    # The same (numpy) search on both machines: the point is the architecture, not the backend.
    gal = Gallery.open(gallery, fingerprint=b.code_fingerprint, readonly=True, backend="numpy") if gallery else None
    startup_ms = (time.perf_counter() - t0) * 1000.0

    def one(path: Path) -> dict:
        t = time.perf_counter()
        img = load_image(path)  # decoded once for detection and crops; detect_ms includes the decode
        dets = det.detect(img)
        t_det = time.perf_counter()
        codes = emb.embed([img] + ([crop(img, dets[0].box)] if dets else []))
        t_emb = time.perf_counter()
        hexes = codes_to_hex(codes)
        record = {
            "image": path.name,
            "boxes": [[float(v) for v in d.box] for d in dets],
            "scores": [float(d.score) for d in dets],
            "code": hexes[0],
            "crop_code": hexes[1] if dets else None,
            "detect_ms": (t_det - t) * 1000.0,
            "embed_ms": (t_emb - t_det) * 1000.0,
        }
        if gal is not None:
            t = time.perf_counter()
            found = gal.search(codes, k=SEARCH_K)
            record["search_ms"] = (time.perf_counter() - t) * 1000.0
            record["matches"] = [
                [[int(i), int(d)] for i, d in zip(ids[:n], dists[:n])]
                for ids, dists, n in zip(found.ids, found.distances, found.counts)
            ]
            wanted = sorted({i for q in record["matches"] for i, _ in q})
            record["labels"] = dict(zip(map(str, wanted), gal.labels_of(wanted)))
        return record

    try:
        records = [one(p) for p in images]
    finally:
        det.close()
        emb.close()
        if gal is not None:
            gal.close()
    import onnxruntime

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": {
            "machine": platform.machine(),
            "emulated": emulated,
            "python": platform.python_version(),
            "versions": _versions(),
            "onnxruntime_providers": list(onnxruntime.get_available_providers()),
            "threads": threads,
            "workers": 1,
            "cpus": os.cpu_count(),
            "startup_ms": startup_ms,
        },
        "images": records,
    }


def collect_sharded(bundle: Path, images: Sequence[Path], *, workers: int, gallery: Optional[Path] = None,
                    threads: Optional[int] = None, emulated: bool = False) -> dict:
    """:func:`collect` split over ``workers`` child processes (image ``i`` goes to worker ``i % workers``).

    Raises:
      RuntimeError: a worker failed (its stderr is in the message).
    """
    workers = max(1, min(workers, len(images)))
    if workers == 1:
        return collect(bundle, images, gallery=gallery, threads=threads, emulated=emulated)
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        procs = []
        for k in range(workers):
            cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--bundle", str(bundle),
                   "--out", str(Path(tmp) / f"{k}.json")]
            if gallery is not None:
                cmd += ["--gallery", str(gallery)]
            if threads is not None:
                cmd += ["--threads", str(threads)]
            if emulated:
                cmd.append("--emulated")
            procs.append(subprocess.Popen(cmd + [str(p) for p in images[k::workers]],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [(k, p.communicate()[1], p.returncode) for k, p in enumerate(procs)]
        failed = [f"worker {k} exited {rc}: {err.strip()[-2000:]}" for k, err, rc in errors if rc != 0]
        if failed:
            raise RuntimeError("; ".join(failed))
        parts = [json.loads((Path(tmp) / f"{k}.json").read_text()) for k in range(workers)]
    by_name = {r["image"]: r for part in parts for r in part["images"]}
    run = parts[0]
    run["images"] = [by_name[p.name] for p in images]
    run["meta"]["workers"] = workers
    run["meta"]["startup_ms"] = max(part["meta"]["startup_ms"] for part in parts)
    return run


def box_diff(a: Box, b: Box) -> float:
    """Largest absolute coordinate difference of two ``(x1, y1, x2, y2)`` boxes, in pixels."""
    return max(abs(float(x) - float(y)) for x, y in zip(a, b))


def pair_boxes(ref: Sequence[Box], other: Sequence[Box]) -> Tuple[List[int], float]:
    """Pair two equally long box lists so that the largest coordinate difference is smallest.

    Detections are sorted by score, so two boxes of nearly equal score may swap places between
    machines; that is not a disagreement. The given order is kept unless another is strictly better.

    Returns:
      ``(perm, max_diff)``: ``other[perm[i]]`` is the partner of ``ref[i]``; ``max_diff`` is 0.0 for
      two empty lists.

    Raises:
      ValueError: the lists differ in length.
    """
    if len(ref) != len(other):
        raise ValueError(f"cannot pair {len(ref)} boxes with {len(other)}")
    n = len(ref)
    if n == 0:
        return [], 0.0
    cost = [[box_diff(a, b) for b in other] for a in ref]
    best = list(range(n))
    best_max = max(cost[i][i] for i in range(n))
    if n <= _EXACT_PAIRING_MAX:
        candidates = itertools.permutations(range(n))
    else:
        # Greedy: closest remaining pair first.
        perm, used_i, used_j = [0] * n, set(), set()
        for _, i, j in sorted((cost[i][j], i, j) for i in range(n) for j in range(n)):
            if i not in used_i and j not in used_j:
                used_i.add(i)
                used_j.add(j)
                perm[i] = j
        candidates = [tuple(perm)]
    for perm in candidates:
        m = max(cost[i][perm[i]] for i in range(n))
        if m < best_max:
            best, best_max = list(perm), m
    return best, best_max


def hamming_hex(a: str, b: str) -> int:
    """Number of differing bits of two equally long hex codes.

    Raises:
      ValueError: the codes differ in length.
    """
    from edge_shitu.codes import hex_to_codes
    from edge_shitu.search import hamming_distances

    if len(a) != len(b):
        raise ValueError(f"codes of different lengths: {len(a)} and {len(b)} hex digits")
    codes = hex_to_codes([a, b], len(a) // 2)
    return int(hamming_distances(codes[:1], codes[1:])[0, 0])


@dataclass
class ImageComparison:
    """How one image's records of two runs agree.

    Attributes:
      image: file name.
      boxes: ``(ref count, other count)``.
      max_box_diff: largest coordinate difference in pixels after pairing (``None`` if counts differ).
      max_score_diff: largest score difference of the paired boxes (``None`` if counts differ).
      code_bits: Hamming distance of the whole-image codes.
      crop_bits: Hamming distance of the best detection's crop codes (``None``: no detection in a run).
      matches_equal: identical gallery matches (``None``: no gallery in the runs).
      times_ms: step name -> ``(ref ms, other ms)``.
      problems: what disagrees, in words; empty when the image passes.
    """

    image: str
    boxes: Tuple[int, int]
    max_box_diff: Optional[float]
    max_score_diff: Optional[float]
    code_bits: int
    crop_bits: Optional[int]
    matches_equal: Optional[bool]
    times_ms: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def compare_image(ref: dict, other: dict, *, box_tol: float = BOX_TOL_PX) -> ImageComparison:
    """Compare one image's records of two runs (``ref`` is the x86 run).

    Raises:
      ValueError: the records are of different images.
    """
    if ref["image"] != other["image"]:
        raise ValueError(f"records of different images: {ref['image']!r} and {other['image']!r}")
    problems: List[str] = []
    n_ref, n_other = len(ref["boxes"]), len(other["boxes"])
    max_box = max_score = None
    if n_ref != n_other:
        problems.append(f"{n_ref} boxes vs {n_other}")
    else:
        perm, max_box = pair_boxes(ref["boxes"], other["boxes"])
        max_score = max((abs(ref["scores"][i] - other["scores"][perm[i]]) for i in range(n_ref)), default=0.0)
        if max_box > box_tol:
            problems.append(f"boxes differ by up to {max_box:.3f} px (tolerance {box_tol} px)")
    code_bits = hamming_hex(ref["code"], other["code"])
    if code_bits:
        problems.append(f"whole-image code differs in {code_bits} bit(s)")
    crop_bits = None
    if ref["crop_code"] is not None and other["crop_code"] is not None:
        crop_bits = hamming_hex(ref["crop_code"], other["crop_code"])
        if crop_bits:
            problems.append(f"best crop's code differs in {crop_bits} bit(s)")

    matches_equal = None
    if "matches" in ref and "matches" in other:
        named = lambda run: [[(run["labels"][str(i)], i, d) for i, d in q] for q in run["matches"]]
        matches_equal = named(ref) == named(other)
        if not matches_equal:
            problems.append("gallery matches differ")
    elif ("matches" in ref) != ("matches" in other):
        problems.append("only one run searched a gallery")

    times = {k: (ref[k], other[k]) for k in ("detect_ms", "embed_ms", "search_ms") if k in ref and k in other}
    return ImageComparison(ref["image"], (n_ref, n_other), max_box, max_score, code_bits, crop_bits, matches_equal,
                           times, problems)


def compare_runs(ref: dict, other: dict, *, box_tol: float = BOX_TOL_PX) -> Tuple[List[ImageComparison], List[str]]:
    """Compare two runs image by image.

    Returns:
      ``(per-image comparisons, run-level problems)``; the runs agree when no comparison and no
      run-level entry reports a problem.

    Raises:
      ValueError: a run is not of this format.
    """
    for run in (ref, other):
        if run.get("format") != FORMAT or run.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} run (format {run.get('format')!r} "
                             f"v{run.get('format_version')!r})")
    problems = []
    names_ref = [r["image"] for r in ref["images"]]
    names_other = [r["image"] for r in other["images"]]
    if sorted(names_ref) != sorted(names_other):
        problems.append(f"different images: {sorted(set(names_ref) ^ set(names_other))}")
    if not names_ref:
        problems.append("no images were compared")
    by_name = {r["image"]: r for r in other["images"]}
    rows = [compare_image(r, by_name[r["image"]], box_tol=box_tol) for r in ref["images"] if r["image"] in by_name]
    return rows, problems


def format_report(rows: List[ImageComparison], problems: List[str], ref_meta: dict, other_meta: dict,
                  *, box_tol: float = BOX_TOL_PX) -> str:
    """The side-by-side table, both machines' descriptions, the emulation caveat and the verdict."""
    ra, rb = ref_meta.get("machine", "?"), other_meta.get("machine", "?")
    has_search = any(r.matches_equal is not None for r in rows)
    head = ["image", f"boxes {ra}/{rb}", "max box diff px", "max score diff", "code bits differ whole/crop"]
    head += ["matches"] if has_search else []
    head += [f"detect ms {ra} / {rb}", f"embed ms {ra} / {rb}", "ok"]

    def fmt(v: Optional[float], spec: str) -> str:
        return "-" if v is None else format(v, spec)

    table = []
    for r in rows:
        t = {k: f"{a:.0f} / {b:.0f}" for k, (a, b) in r.times_ms.items()}
        line = [r.image, f"{r.boxes[0]}/{r.boxes[1]}", fmt(r.max_box_diff, ".2e"), fmt(r.max_score_diff, ".1e"),
                f"{r.code_bits}/{'-' if r.crop_bits is None else r.crop_bits}"]
        if has_search:
            line.append("-" if r.matches_equal is None else ("same" if r.matches_equal else "DIFFER"))
        line += [t.get("detect_ms", "-"), t.get("embed_ms", "-"), "yes" if r.ok else "NO"]
        table.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    row = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [row(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [row(x) for x in table]

    out.append("")
    for name, meta in ((ra, ref_meta), (rb, other_meta)):
        v = meta.get("versions", {})
        out.append(f"{name}: Python {meta.get('python')}, numpy {v.get('numpy')}, onnxruntime {v.get('onnxruntime')}, "
                   f"Pillow {v.get('pillow')}; {meta.get('cpus')} cpu(s), {meta.get('workers', 1)} process(es) "
                   f"x {meta.get('threads') or 'default'} thread(s); sessions start in {meta.get('startup_ms', 0):.0f} ms")
    for key in ("detect_ms", "embed_ms", "search_ms"):
        pairs = [r.times_ms[key] for r in rows if key in r.times_ms]
        if pairs:
            a, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            ratio = f" ({b / a:.0f}x)" if a > 0 else ""
            out.append(f"median {key[:-3]} per image: {ra} {a:.1f} ms, {rb} {b:.1f} ms{ratio}")
    for name, meta in ((ra, ref_meta), (rb, other_meta)):
        if meta.get("emulated"):
            out.append(f"NOTE: the {name} run was emulated (QEMU user mode): its timings measure the emulator, "
                       f"not {name} hardware, and say nothing about device speed.")
    failed = [r for r in rows if not r.ok]
    for r in failed:
        out.append(f"MISMATCH {r.image}: " + "; ".join(r.problems))
    for p in problems:
        out.append(f"MISMATCH: {p}")
    if failed or problems:
        out.append(f"PARITY FAILED: {len(failed)} of {len(rows)} image(s) disagree"
                   + (f"; {len(problems)} run-level problem(s)" if problems else ""))
    else:
        n_boxes = sum(r.boxes[0] for r in rows)
        worst = max((r.max_box_diff or 0.0) for r in rows)
        out.append(f"PARITY OK: {len(rows)} images, {n_boxes} boxes in the same counts, largest box difference "
                   f"{worst:.2e} px (tolerance {box_tol}), identical codes" + (", identical matches" if has_search else ""))
    return "\n".join(out)


def _images(paths: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for p in map(Path, paths):
        out += sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="parity.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="detect/embed/search photos and write a JSON record")
    r.add_argument("--bundle", required=True)
    r.add_argument("--gallery", help="also search the codes in this gallery")
    r.add_argument("--threads", type=int, default=None, help="inference threads per session")
    r.add_argument("--workers", type=int, default=1, help="processes to split the images over")
    r.add_argument("--emulated", action="store_true", help="record that this machine is emulated")
    r.add_argument("--out", required=True)
    r.add_argument("images", nargs="+", help="image files or folders")
    c = sub.add_parser("compare", help="compare two runs; exit 1 on any mismatch")
    c.add_argument("ref")
    c.add_argument("other")
    c.add_argument("--box-tol", type=float, default=BOX_TOL_PX)
    args = p.parse_args(argv)

    if args.cmd == "run":
        run = collect_sharded(Path(args.bundle), _images(args.images), workers=args.workers,
                              gallery=Path(args.gallery) if args.gallery else None, threads=args.threads,
                              emulated=args.emulated)
        Path(args.out).write_text(json.dumps(run, indent=1, ensure_ascii=False))
        sys.stdout.write(f"{run['meta']['machine']}: {len(run['images'])} images -> {args.out}\n")
        return 0
    ref, other = (json.loads(Path(x).read_text()) for x in (args.ref, args.other))
    rows, problems = compare_runs(ref, other, box_tol=args.box_tol)
    sys.stdout.write(format_report(rows, problems, ref["meta"], other["meta"], box_tol=args.box_tol) + "\n")
    return 0 if not problems and all(x.ok for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
