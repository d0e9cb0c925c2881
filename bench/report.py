"""Shared pieces of the benchmark harnesses: machine and version records, percentiles, peak memory,
JSON and Markdown writers, and stacked-bar PNG charts.

Nothing here knows about a particular benchmark; ``edge_shitu_bench.latency`` and the index benchmark both use it.
matplotlib is imported only when a chart is drawn, and its absence is reported with the extra to install.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.errors import BackendUnavailableError, EdgeShituError, InvalidInputError

__all__ = [
    "BENCH_EXTRA_HINT",
    "BenchmarkError",
    "PERCENTILES",
    "machine_info",
    "package_versions",
    "percentiles",
    "summarize",
    "peak_rss_mb",
    "ratio",
    "utc_now",
    "write_json",
    "write_text",
    "markdown_table",
    "require_matplotlib",
    "stacked_bar_chart",
]

BENCH_EXTRA_HINT = 'pip install "edge-shitu[bench]"'
PERCENTILES: Tuple[int, ...] = (50, 90, 99)
"""The percentiles every benchmark reports."""

# CPU features that decide which kernels the runtimes pick (oneDNN, onnxruntime, faiss).
_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimddp", "sve")
PathLike = Union[str, "os.PathLike[str]"]


class BenchmarkError(EdgeShituError, RuntimeError):
    """A benchmark run failed (a configuration crashed or returned no result); the message says which."""


def _cpu_model_and_flags() -> Tuple[Optional[str], List[str]]:
    model, flags = None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, [f for f in _CPU_FLAGS if f in flags]


def _memory_total_mb() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**20, 1)
    except ImportError:
        return None


def machine_info() -> Dict[str, Any]:
    """Describe the machine a benchmark ran on.

    Returns:
      A JSON-ready mapping: ``system``, ``release``, ``machine`` (architecture), ``python``, ``cpu_model``,
      ``logical_cpus``, ``usable_cpus`` (the CPUs this process may run on), ``cpu_flags`` (the SIMD features
      that matter to the inference kernels) and ``memory_total_mb``; unknown values are ``None``.
    """
    model, flags = _cpu_model_and_flags()
    try:
        usable: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_flags": flags,
        "memory_total_mb": _memory_total_mb(),
    }


def package_versions(names: Iterable[Union[str, Sequence[str]]]) -> Dict[str, Optional[str]]:
    """Installed versions of distributions, without importing them.

    Args:
      names: distribution names; an item may be a sequence of alternatives (e.g. ``("opencv-python-headless",
        "opencv-python")``), reported under its first name with the first one installed.

    Returns:
      Name -> version string, or ``None`` when not installed.
    """
    out: Dict[str, Optional[str]] = {}
    for item in names:
        choices = (item,) if isinstance(item, str) else tuple(item)
        version = None
        for name in choices:
            try:
                version = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        out[choices[0]] = version
    return out


def _samples(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInputError(f"{what}: need a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what}: samples must be finite numbers")
    return arr


def percentiles(values: Sequence[float], qs: Sequence[int] = PERCENTILES) -> Dict[str, float]:
    """Percentiles of timing samples (linear interpolation between closest ranks, numpy's default).

    Args:
      values: the samples, e.g. milliseconds; at least one, all finite.
      qs: percentiles in [0, 100].

    Returns:
      ``{"p50": ..., "p90": ..., "p99": ...}`` (keys follow ``qs``).

    Raises:
      InvalidInputError: no samples, a non-finite sample, or a percentile outside [0, 100].
    """
    arr = _samples(values, "percentiles")
    if any(not 0 <= q <= 100 for q in qs):
        raise InvalidInputError(f"percentiles must be in [0, 100], got {list(qs)}")
    found = np.percentile(arr, list(qs))
    return {f"p{q}": float(v) for q, v in zip(qs, found)}


def summarize(values: Sequence[float], qs: Sequence[int] = PERCENTILES) -> Dict[str, float]:
    """:func:`percentiles` plus ``mean``, ``min``, ``max`` and the sample count ``n``.

    Raises:
      InvalidInputError: as :func:`percentiles`.
    """
    arr = _samples(values, "summarize")
    out = percentiles(arr, qs)
    out.update(mean=float(arr.mean()), min=float(arr.min()), max=float(arr.max()), n=int(arr.size))
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of the calling process so far, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory
    map: ``getrusage`` ``ru_maxrss`` is not used there because Linux carries it over ``fork`` + ``exec``, so a
    subprocess would report its parent's peak whenever that is larger. Elsewhere ``ru_maxrss``, else psutil.
    Run each measured configuration in its own process: the peak never goes down.

    Raises:
      BackendUnavailableError: none of these sources is available.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # macOS reports bytes, the BSDs KiB.
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
    try:
        import psutil
    except ImportError:
        raise BackendUnavailableError(f"peak memory needs psutil on this system: {BENCH_EXTRA_HINT}") from None
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20


def ratio(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    """``value / baseline``, or ``None`` when either is missing or the baseline is not positive."""
    if value is None or baseline is None or not baseline > 0 or not math.isfinite(value):
        return None
    return float(value) / float(baseline)


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2024-05-01T12:00:00Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _replace_into(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically (a reader never sees half a file).

    Raises:
      InvalidInputError: ``data`` holds NaN/infinity or a value JSON cannot represent.
      OSError: the file cannot be written.
    """
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot write as JSON: {exc}") from None
    return _replace_into(Path(path), (text + "\n").encode("utf-8"))


def write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 text atomically, ending with one newline.

    Raises:
      OSError: the file cannot be written.
    """
    return _replace_into(Path(path), (text.rstrip("\n") + "\n").encode("utf-8"))


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   align: Optional[Sequence[str]] = None) -> str:
    """A GitHub-flavoured Markdown table.

    Args:
      headers: column titles.
      rows: one sequence of cells per row, as many as ``headers``; ``None`` becomes an empty cell and
        ``|`` is escaped.
      align: per column ``"l"``, ``"r"`` or ``"c"`` (default: first column left, the others right).

    Returns:
      The table, lines joined by ``\\n``, without a trailing newline.

    Raises:
      InvalidInputError: a row or ``align`` has the wrong length, or an unknown alignment.
    """
    n = len(headers)
    if n == 0:
        raise InvalidInputError("a table needs at least one column")
    align = list(align) if align is not None else ["l"] + ["r"] * (n - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    if len(align) != n or any(a not in marks for a in align):
        raise InvalidInputError(f"align must give one of l/r/c for each of the {n} columns, got {align}")
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for i, row in enumerate(rows):
        if len(row) != n:
            raise InvalidInputError(f"table row {i} has {len(row)} cells, expected {n}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def require_matplotlib() -> Any:
    """Import matplotlib (for charts), or explain which extra is missing.

    Returns:
      The ``matplotlib`` module.

    Raises:
      BackendUnavailableError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise BackendUnavailableError(
            f"charts need matplotlib ({exc}), part of the 'bench' extra: {BENCH_EXTRA_HINT}"
        ) from None
    return matplotlib


def stacked_bar_chart(path: PathLike, bars: Sequence[str], stacks: Mapping[str, Sequence[float]], *,
                      title: str, ylabel: str, totals: Optional[Sequence[Optional[float]]] = None) -> Path:
    """Draw one stacked bar per item and save it as a PNG.

    Drawn on matplotlib's Agg canvas without pyplot, so no global backend or figure state changes.

    Args:
      path: the ``.png`` file to write.
      bars: one label per bar (``\\n`` allowed).
      stacks: segment name -> one value per bar, stacked bottom-up in mapping order; negative values are
        drawn as 0.
      title: chart title.
      ylabel: y-axis title (with the unit).
      totals: optional number printed above each bar (e.g. the measured total, which need not equal the
        sum of the segments' medians).

    Returns:
      ``path``.

    Raises:
      BackendUnavailableError: matplotlib is not installed.
      InvalidInputError: no bars, or a stack or ``totals`` does not have one value per bar.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(bars)
    if n == 0:
        raise InvalidInputError("a chart needs at least one bar")
    for name, values in stacks.items():
        if len(values) != n:
            raise InvalidInputError(f"stack {name!r} has {len(values)} values, expected one per bar ({n})")
    if totals is not None and len(totals) != n:
        raise InvalidInputError(f"totals has {len(totals)} values, expected {n}")
    fig = Figure(figsize=(max(6.0, 1.5 * n + 3.0), 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    bottom = np.zeros(n)
    colours = _palette(len(stacks))
    for (name, values), colour in zip(stacks.items(), colours):
        heights = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
        ax.bar(x, heights, 0.6, bottom=bottom, label=name, color=colour, edgecolor="white", linewidth=0.5)
        bottom += heights
    top = float(bottom.max()) if n else 0.0
    if totals is not None:
        for xi, total, stacked in zip(x, totals, bottom):
            if total is not None:
                ax.text(xi, max(stacked, total) + 0.01 * top, f"{total:.1f}", ha="center", va="bottom", fontsize=9)
                top = max(top, total)
    ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    ax.set_xticks(x)
    ax.set_xticklabels(list(bars), fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # Legend top-down in the order the segments are stacked bottom-up, so both read the same way.
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), format="png")
    return out


def _palette(n: int) -> List[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
