"""Load benchmark of the kiosk service (``edge-shitu bench kiosk``): N clients posting camera frames on loopback.

The service runs as its own process (``edge-shitu serve``), as on a kiosk. Each client keeps one HTTP
connection and posts JPEG frames (the photos scaled to 640 px on the long side, as the browser UI sends
them) one after another, for at most ``seconds`` and ``max_requests`` in all. The baseline, measured in
the same run on the same frames, is the same pipeline called in-process (:class:`KioskService`), one
frame at a time: the ratio service p50 / direct p50 is what HTTP, JSON and the server cost a frame.
Resident memory of the service process is read at start and at the end of every client count.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from edge_shitu.errors import InvalidInputError
from edge_shitu_bench.report import BenchmarkError, machine_info, markdown_table, percentiles, ratio, utc_now, \
    write_json, write_text

__all__ = ["KioskLoadOptions", "run", "markdown"]

_FRAME_SIDE = 640
_JPEG_QUALITY = 80
_MAX_FRAMES = 8
_START_TIMEOUT_S = 120.0
_REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class KioskLoadOptions:
    """What the load benchmark runs.

    Attributes:
      bundle: the bundle the service serves.
      images: folder of photos; the first eight in name order become the frames.
      out: folder of kiosk.json and kiosk.md.
      gallery: gallery to serve; None builds one in a temporary folder by enrolling the frames.
      clients: client counts, one row each.
      seconds: longest time of one row.
      max_requests: most requests of one row (all clients together).
      threads: intra-op threads of the service's model sessions (None: the backend's default).
      warmup: untimed requests first, per row.

    Raises:
      InvalidInputError: a value out of range.
    """

    bundle: Path
    images: Path
    out: Path
    gallery: Optional[Path] = None
    clients: Sequence[int] = (1, 2, 4)
    seconds: float = 20.0
    max_requests: int = 2000
    threads: Optional[int] = None
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.clients or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 64
                                   for c in self.clients):
            raise InvalidInputError(f"clients must be whole numbers in 1..64, got {list(self.clients)}")
        if not 0 < self.seconds <= 3600:
            raise InvalidInputError(f"seconds must be in (0, 3600], got {self.seconds}")
        if not 1 <= self.max_requests <= 1_000_000:
            raise InvalidInputError(f"max_requests must be in 1..1000000, got {self.max_requests}")


def _frames(folder: Path) -> List[bytes]:
    from PIL import Image

    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)[:_MAX_FRAMES] \
        if folder.is_dir() else []
    if not paths:
        raise InvalidInputError(f"{folder}: expected a folder of photos (.jpg .png .webp .bmp)")
    frames = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((_FRAME_SIDE, _FRAME_SIDE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=_JPEG_QUALITY)
            frames.append(buf.getvalue())
    return frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _direct_ms(service, frames: Sequence[bytes], seconds: float, max_requests: int, warmup: int) -> List[float]:
    for i in range(warmup):
        service.recognize(frames[i % len(frames)])
    times: List[float] = []
    end = time.perf_counter() + seconds
    while len(times) < max_requests and time.perf_counter() < end:
        t0 = time.perf_counter()
        service.recognize(frames[len(times) % len(frames)])
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _client(port: int, frames: Sequence[bytes], offset: int, stop_at: float, budget: "_Budget",
            times: List[float], errors: List[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=_REQUEST_TIMEOUT_S)
    i = offset
    try:
        while time.perf_counter() < stop_at and budget.take():
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/recognize", body=frames[i % len(frames)],
                             headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                else:
                    json.loads(body)
                    times.append((time.perf_counter() - t0) * 1000.0)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=_REQUEST_TIMEOUT_S)
            i += 1
    finally:
        conn.close()


class _Budget:
    def __init__(self, n: int) -> None:
        self._left = n
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


def _build_gallery(bundle: Path, frames: Sequence[bytes], dest: Path, threads: Optional[int]) -> None:
    from edge_shitu.kiosk.service import KioskService, ServiceOptions

    with KioskService.open(bundle, dest, options=ServiceOptions(threads=threads)) as service:
        for i, frame in enumerate(frames):
            service.enrol(frame, f"frame{i}")


def run(options: KioskLoadOptions, progress=lambda line: None) -> Dict[str, Any]:
    """Run the benchmark; write kiosk.json and kiosk.md into ``options.out``.

    Returns:
      The report (what kiosk.json holds).

    Raises:
      InvalidInputError: no photos in ``options.images``.
      BenchmarkError: the service did not start.
    """
    from edge_shitu.bundle import Bundle
    from edge_shitu.kiosk.service import KioskService, ServiceOptions

    frames = _frames(options.images)
    bundle = Bundle.load(options.bundle)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-shitu-kiosk-bench-") as tmp:
        gallery = options.gallery
        if gallery is None:
            gallery = Path(tmp) / "gallery.db"
            progress(f"building a {len(frames)}-item gallery from the frames")
            _build_gallery(options.bundle, frames, gallery, options.threads)

        progress("baseline: the pipeline in-process, one frame at a time")
        with KioskService.open(bundle, gallery, options=ServiceOptions(threads=options.threads)) as service:
            direct = _direct_ms(service, frames, min(options.seconds, 10.0), options.max_requests, options.warmup)
        direct_p = percentiles(direct)

        port = _free_port()
        command = [sys.executable, "-m", "edge_shitu.cli", "serve", "--bundle", str(options.bundle),
                   "--gallery", str(gallery), "--port", str(port)]
        if options.threads is not None:
            command += ["--threads", str(options.threads)]
        log = open(Path(tmp) / "serve.log", "w+b")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        rows: List[Dict[str, Any]] = []
        try:
            _wait(port, proc, log)
            rss_start = _rss_mb(proc.pid)
            for n in options.clients:
                progress(f"{n} client(s) for at most {options.seconds:g} s / {options.max_requests} requests")
                warm = [_Budget(options.warmup * n)]
                _run_clients(port, frames, n, time.perf_counter() + 60.0, warm[0], [], [])
                times: List[float] = []
                errors: List[str] = []
                t0 = time.perf_counter()
                _run_clients(port, frames, n, t0 + options.seconds, _Budget(options.max_requests), times, errors)
                wall = time.perf_counter() - t0
                p = percentiles(times) if times else {}
                rows.append({"clients": n, "requests": len(times) + len(errors), "ok": len(times),
                             "errors": len(errors), "first_errors": errors[:5], "seconds": round(wall, 3),
                             "throughput_rps": round(len(times) / wall, 3) if wall > 0 else None,
                             "p50_ms": p.get("p50"), "p99_ms": p.get("p99"),
                             "p50_vs_direct": ratio(p.get("p50"), direct_p["p50"]),
                             "rss_mb": _rss_mb(proc.pid)})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    report = {
        "benchmark": "kiosk load", "date": utc_now(), "machine": machine_info(),
        "bundle": {"path": str(options.bundle), "replica": bundle.is_replica},
        "frames": len(frames), "frame_bytes_mean": round(sum(map(len, frames)) / len(frames)),
        "threads": options.threads, "seconds": options.seconds, "max_requests": options.max_requests,
        "direct": {"requests": len(direct), "p50_ms": direct_p["p50"], "p99_ms": direct_p["p99"]},
        "service_rss_mb_start": rss_start, "rows": rows,
    }
    write_json(options.out / "kiosk.json", report)
    write_text(options.out / "kiosk.md", markdown(report) + "\n")
    return report


def _run_clients(port: int, frames, n: int, stop_at: float, budget: _Budget, times: List[float],
                 errors: List[str]) -> None:
    threads = [threading.Thread(target=_client, args=(port, frames, k, stop_at, budget, times, errors), daemon=True)
               for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _wait(port: int, proc: subprocess.Popen, log) -> None:
    end = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise BenchmarkError(f"the service exited with {proc.returncode}: "
                                 f"{log.read().decode(errors='replace').strip()[-500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise BenchmarkError(f"the service did not answer on port {port} within {_START_TIMEOUT_S:g} s")


def markdown(report: Dict[str, Any]) -> str:
    """The report as a Markdown table, with the baseline and the memory."""
    d = report["direct"]
    head = (f"Kiosk load on loopback: {report['frames']} frames of ~{report['frame_bytes_mean'] // 1024} KB, "
            f"threads {report['threads'] or 'default'}, each row at most {report['seconds']:g} s / "
            f"{report['max_requests']} requests{' (replica bundle: cost only)' if report['bundle']['replica'] else ''}.\n"
            f"Baseline (in-process, one frame at a time): p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms "
            f"over {d['requests']} frames. Service memory at start: {report['service_rss_mb_start'] or 0:.0f} MB.\n\n")
    rows = [[r["clients"], r["requests"], r["errors"], r["throughput_rps"],
             None if r["p50_ms"] is None else round(r["p50_ms"], 1),
             None if r["p99_ms"] is None else round(r["p99_ms"], 1),
             None if r["p50_vs_direct"] is None else f"{r['p50_vs_direct']:.2f}x",
             None if r["rss_mb"] is None else round(r["rss_mb"])] for r in report["rows"]]
    return head + markdown_table(["clients", "requests", "errors", "frames/s", "p50 ms", "p99 ms",
                                  "p50 / in-process", "RSS MB after"], rows)
