"""Tests of converters/fetch.py: models.lock validation, fetching from local and http mirrors,
verification, cache reuse and safe unpacking. No internet: every source is local or loopback."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import re
import socket
import stat
import struct
import tarfile
import threading
import time
import tracemalloc
import urllib.error
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_shitu_converters import fetch as fetch_mod
from edge_shitu_converters.fetch import (
    STATUS_PINNED_OK,
    STATUS_UNLISTED,
    STATUS_UNPINNED,
    fetch,
    list_models,
    load_lock,
)
from edge_shitu_converters.shared import DET_GRAPH, REC_GRAPH, REC_V1_GRAPH
from edge_shitu.errors import BundleError, FetchError, InvalidInputError, MissingFileError

OFFICIAL_HOSTS = {"paddle-imagenet-models-name.bj.bcebos.com", "paddledet.bj.bcebos.com"}
DET = "picodet-mainbody"
DATASET = "drink-dataset-v1"
DET_URL_PATH = "dygraph/rec/models/inference/picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar"
DET_HOST = "paddle-imagenet-models-name.bj.bcebos.com"
# The hashes of the public copies, as listed in ../shared/README.md (independent of models.lock).
README_HASHES = {
    (DET_GRAPH, "inference.pdmodel"): "aef54d49af0ed0b38334c1da9939ff8a5e2a19229f9a21147521cdf22b456280",
    (DET_GRAPH, "inference.pdiparams.info"): "6b4829bf2ab055e65f47e0df85d18bb747254a951c49e9840be32825bedd8aa8",
    (DET_GRAPH, "infer_cfg.yml"): "fcdae0cb77e82a01859dac1a8eae269f43e1fa0075715dcaba51bd4d70593164",
    (REC_GRAPH, "inference.pdmodel"): "3e0ade05639ff7b5fe450a55883a8087dc2b5c2349fe6b73897cbe2a5eeb6ee8",
    (REC_GRAPH, "inference.pdiparams.info"): "7af601351a3b806a62452945f8b758d065256d0e609e442e6195b4bb82c02fb4",
    (REC_V1_GRAPH, "inference.pdmodel"): "67a6c2544357a259996e9aac37464996d6a7f884638329a678641f95afb2703d",
    (REC_V1_GRAPH, "inference.pdiparams.info"): "810f55ba117a75de3f6bfc07fb12fe442fd9bd414bbd6fc5bb37aba6c5e7100c",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# helpers: archives, mirrors, locks


def make_tar(path: Path, members, *, gz: bool = False) -> Path:
    """members: (name, bytes) for regular files, or a ready TarInfo (links, devices, dirs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, members) -> Path:
    """members: (name, bytes) or (ZipInfo, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def real_det_files(shared_dir: Path) -> dict:
    """The real pinned files of the detector (graph, params info, infer_cfg) from ../shared."""
    folder = shared_dir / "models" / "ppshitu-graphs" / DET_GRAPH
    return {n: (folder / n).read_bytes() for n in ("inference.pdmodel", "inference.pdiparams.info", "infer_cfg.yml")}


@pytest.fixture
def weights() -> bytes:
    """Random stand-in for the unpinned inference.pdiparams (the real weights are not available)."""
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.fixture
def lock():
    return load_lock()


def det_members(real_det_files: dict, weights: bytes, *, prefix: str = DET_GRAPH + "/") -> list:
    members = [(prefix + n, data) for n, data in real_det_files.items()]
    members.append((prefix + "inference.pdiparams", weights))
    return members


def det_archive(mirror: Path) -> Path:
    return mirror / DET_HOST / DET_URL_PATH


@pytest.fixture
def mirror(tmp_path: Path, real_det_files: dict, weights: bytes) -> Path:
    """A mirror laid out like the official host, holding a genuine-looking detector archive."""
    root = tmp_path / "mirror"
    make_tar(det_archive(root), [_special(DET_GRAPH, tarfile.DIRTYPE)] + det_members(real_det_files, weights))
    return root


def write_lock(path: Path, models: list) -> Path:
    path.write_text(json.dumps({"lock_version": 1, "about": "test lock", "models": models}), encoding="utf-8")
    return path


def entry_dict(**over) -> dict:
    base = {
        "name": "toy",
        "role": "extractor",
        "url": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/rec/models/inference/toy_infer.tar",
        "format": "tar",
        "archive_sha256": None,
        "unpack_dir": "toy_infer",
        "files": {"inference.pdmodel": sha(b"graph"), "inference.pdiparams": None},
        "notes": "test entry",
    }
    base.update(over)
    return base


TOY_PATH = ("paddle-imagenet-models-name.bj.bcebos.com", "dygraph/rec/models/inference")


def toy_archive(mirror: Path, suffix: str = "tar") -> Path:
    return mirror.joinpath(*TOY_PATH) / f"toy_infer.{suffix}"


TOY_MEMBERS = [("toy_infer/inference.pdmodel", b"graph"), ("toy_infer/inference.pdiparams", b"weights")]


def cache_leftovers(cache: Path) -> list:
    return sorted(os.listdir(cache)) if cache.exists() else []


class LoopbackServer:
    """A static file server on 127.0.0.1 (loopback only) that records the paths requested."""

    def __init__(self, root: Path):
        self.requests = []
        handler = functools.partial(_QuietHandler, directory=str(root), log=self.requests)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"


class _QuietHandler(SimpleHTTPRequestHandler):
    def __init__(self, *args, log=None, **kwargs):
        self._log_list = log
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        if self._log_list is not None:
            self._log_list.append(self.path)


@pytest.fixture
def http_mirror(mirror: Path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = LoopbackServer(mirror)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if the code under test tries to open any URL."""
    calls = []

    def refuse(url, timeout, connect_timeout):
        calls.append(url)
        raise AssertionError(f"network access attempted: {url}")

    monkeypatch.setattr(fetch_mod, "_open_url", refuse)
    return calls


# ---------------------------------------------------------------------------------------------
# models.lock


def test_repo_lock_is_valid(lock):
    assert lock.lock_version == 1
    assert lock.about
    required = {
        "picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar",
        "PP-ShiTuV2/general_PPLCNetV2_base_pretrained_v1.0_infer.tar",
        "general_PPLCNet_x2_5_lite_v1.0_infer.tar",
        "general_PPLCNet_x2_5_lite_binary_v1.0_infer.tar",
        "lite/ppshituv2_lite_models_v1.0.tar",
        "lite/ppshituv2_lite_models_fp32_v1.0.tar",
        "paddledet.bj.bcebos.com/models/picodet_lcnet_x2_5_640_mainbody_infer.tar",
    }
    for suffix in required:
        assert any(m.url.endswith(suffix) for m in lock.models), suffix
    assert len(set(lock.names)) == len(lock.names)
    raw = json.loads(lock.path.read_text(encoding="utf-8"))
    for m, r in zip(lock.models, raw["models"]):
        parts = re.match(r"^https://([^/]+)/(.+)$", m.url)
        assert parts and parts.group(1) in OFFICIAL_HOSTS, m.url
        assert m.role in ("detector", "extractor", "lite-package", "dataset")
        assert m.notes.strip()
        # load_lock normalises; the file itself must hold 64-hex or explicit nulls.
        for value in [r["archive_sha256"], *r["files"].values()]:
            assert value is None or re.fullmatch(r"[0-9a-f]{64}", value), (m.name, value)
        # weights are never pinned here (no public copy exists): explicit nulls.
        for f in m.files:
            if f.path.endswith(".pdiparams") or f.path.endswith(".nb"):
                assert f.sha256 is None, (m.name, f.path)


def test_lock_pins_match_readme_and_shared_files(lock, shared_dir):
    models = [m for m in lock.models if m.role != "dataset"]
    by_dir = {m.unpack_dir: m for m in models}
    pinned = {(m.unpack_dir, f.path): f.sha256 for m in models for f in m.files if f.pinned}
    pinned.update({("archive", m.name): m.archive_sha256 for m in models if m.archive_sha256})
    # Every pin is one of the README's hashes (no invented hash), and every README hash is pinned.
    assert pinned == README_HASHES
    for (folder, name), digest in README_HASHES.items():
        assert folder in by_dir
        assert sha((shared_dir / "models" / "ppshitu-graphs" / folder / name).read_bytes()) == digest


def test_lock_pins_the_drink_dataset_from_the_shared_copy(lock, drink_dir):
    entry = lock.get(DATASET)
    assert entry.role == "dataset"
    assert entry.url == f"https://{DET_HOST}/dygraph/rec/data/drink_dataset_v1.0.tar"
    assert entry.unpack_dir == "drink_dataset_v1.0" and entry.archive_sha256 is None
    files = {f.path: f.sha256 for f in entry.files}
    # What the quickstart reads by name is listed, and every pin is the hash of the shared (public) copy.
    assert "gallery/drink_label.txt" in files
    assert {p for p in files if p.startswith("test_images/")} == {
        f"test_images/{p.name}" for p in (drink_dir / "test_images").iterdir()}
    for rel, digest in files.items():
        assert digest == sha((drink_dir / rel).read_bytes()), rel


def test_lock_from_env_var(tmp_path, monkeypatch):
    path = write_lock(tmp_path / "other.lock", [entry_dict()])
    monkeypatch.setenv("EDGE_SHITU_MODELS_LOCK", str(path))
    got = load_lock()
    assert got.path == path and got.names == ("toy",)
    assert got.get("toy").files[0].sha256 == sha(b"graph")


def test_lock_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "nope.lock"))):
        load_lock(tmp_path / "nope.lock")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(extra=1), r"unknown key\(s\) 'extra' in the top level"),
        (lambda d: d["models"][0].update(mirror="x"), r"unknown key\(s\) 'mirror' in models\[0\]"),
        (lambda d: d["models"][0].pop("notes"), r"missing key\(s\) 'notes'"),
        (lambda d: d.update(lock_version=2), "lock_version must be 1"),
        (lambda d: d.update(lock_version=True), "lock_version must be 1"),
        (lambda d: d["models"][0].update(archive_sha256="ABC"), "archive_sha256 must be null or 64 lowercase hex"),
        (lambda d: d["models"][0]["files"].update({"x.bin": "A" * 64}), "must be null or 64 lowercase hex"),
        (lambda d: d["models"][0].update(url="http://example.com/a.tar"), "must be an https:// URL"),
        (lambda d: d["models"][0].update(url="https://example.com/a/../b.tar"), "plain path"),
        (lambda d: d["models"][0].update(role="classifier"), "role must be one of"),
        (lambda d: d["models"][0].update(format="rar"), "format must be one of"),
        (lambda d: d["models"][0].update(name="../x"), "name must match"),
        (lambda d: d["models"][0].update(unpack_dir="/abs"), "unpack_dir must be a relative POSIX path"),
        (lambda d: d["models"][0]["files"].update({"../x": None}), "must not contain '..'"),
        (lambda d: d["models"].append(dict(d["models"][0])), "duplicate model name"),
    ],
)
def test_lock_rejects_bad_content(tmp_path, mutate, message):
    doc = {"lock_version": 1, "about": "x", "models": [entry_dict()]}
    mutate(doc)
    path = tmp_path / "bad.lock"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(BundleError, match=re.escape(str(path)) + ".*" + message):
        load_lock(path)


def test_lock_rejects_duplicate_json_keys_and_bad_json(tmp_path):
    path = tmp_path / "dup.lock"
    path.write_text('{"lock_version": 1, "lock_version": 1, "about": "", "models": []}', encoding="utf-8")
    with pytest.raises(BundleError, match="duplicate key 'lock_version'"):
        load_lock(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not a valid models.lock JSON"):
        load_lock(path)


def test_unknown_model_lists_known_names(lock, tmp_path, no_network):
    with pytest.raises(InvalidInputError, match="unknown model 'nope'.*known models: .*picodet-mainbody.*ppshituv2-extractor"):
        fetch("nope", cache_dir=tmp_path / "cache", lock=lock)
    assert not (tmp_path / "cache").exists()


def test_list_models(lock, tmp_path):
    rows = list_models(lock)
    assert [r.name for r in rows] == list(lock.names)
    det = next(r for r in rows if r.name == DET)
    assert (det.role, det.pinned, det.unpinned, det.cached) == ("detector", 3, 1, None)
    binary = next(r for r in rows if r.name == "ppshituv1-binary-extractor")
    assert (binary.pinned, binary.unpinned) == (0, 3)
    assert all(r.cached is False for r in list_models(lock, cache_dir=tmp_path))


# ---------------------------------------------------------------------------------------------
# fetching


def test_fetch_from_directory_mirror_then_cached(lock, mirror, tmp_path, weights, real_det_files, no_network):
    cache = tmp_path / "cache"
    seen = []
    report = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock, progress=lambda d, t: seen.append((d, t)))
    archive = det_archive(mirror)
    assert report.cached is False
    assert report.source == str(archive)
    assert report.model_dir == cache / DET / DET_GRAPH
    assert report.archive_sha256 == sha(archive.read_bytes())
    assert report.archive_pinned is False
    status = {f.path: (f.status, f.sha256) for f in report.files}
    assert status == {
        "inference.pdmodel": (STATUS_PINNED_OK, README_HASHES[(DET_GRAPH, "inference.pdmodel")]),
        "inference.pdiparams.info": (STATUS_PINNED_OK, README_HASHES[(DET_GRAPH, "inference.pdiparams.info")]),
        "infer_cfg.yml": (STATUS_PINNED_OK, README_HASHES[(DET_GRAPH, "infer_cfg.yml")]),
        "inference.pdiparams": (STATUS_UNPINNED, sha(weights)),
    }
    assert report.unpinned == ("inference.pdiparams",)
    assert (report.model_dir / "inference.pdiparams").read_bytes() == weights
    assert (report.model_dir / "inference.pdmodel").read_bytes() == real_det_files["inference.pdmodel"]
    size = archive.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert cache_leftovers(cache) == [DET]  # no .part / .partial left over
    assert [r.cached for r in list_models(lock, cache_dir=cache) if r.name == DET] == [True]

    # Second fetch: served from the cache, even though the mirror no longer has the archive.
    archive.unlink()
    again = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert again.cached is True
    assert again.files == report.files
    assert again.archive_sha256 == report.archive_sha256 and again.source == report.source

    # force=True really goes back to the source (which now lacks the archive) and keeps the old copy.
    with pytest.raises(FetchError, match="not found in the mirror"):
        fetch(DET, cache_dir=cache, mirror=mirror, lock=lock, force=True)
    assert (report.model_dir / "inference.pdiparams").read_bytes() == weights
    assert cache_leftovers(cache) == [DET]


def test_force_refetch_replaces_copy(lock, mirror, tmp_path, real_det_files):
    cache = tmp_path / "cache"
    fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    new_weights = b"other weights"
    make_tar(det_archive(mirror), det_members(real_det_files, new_weights))
    assert fetch(DET, cache_dir=cache, mirror=mirror, lock=lock).cached is True
    report = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock, force=True)
    assert report.cached is False
    assert (report.model_dir / "inference.pdiparams").read_bytes() == new_weights
    assert cache_leftovers(cache) == [DET]


def test_corrupted_cache_is_fetched_again(lock, mirror, tmp_path, weights):
    cache = tmp_path / "cache"
    first = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    (first.model_dir / "inference.pdmodel").write_bytes(b"tampered after fetch")
    cached = {r.name: r.cached for r in list_models(lock, cache_dir=cache)}
    assert cached[DET] is True  # the cheap check does not hash; fetch does
    second = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert second.cached is False
    assert sha((second.model_dir / "inference.pdmodel").read_bytes()) == README_HASHES[(DET_GRAPH, "inference.pdmodel")]
    # An unpinned file changed after the fetch is noticed too (against the recorded hash).
    (second.model_dir / "inference.pdiparams").write_bytes(b"changed")
    third = fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert third.cached is False
    assert (third.model_dir / "inference.pdiparams").read_bytes() == weights


def test_fetch_from_http_mirror(lock, http_mirror, mirror, tmp_path, weights):
    cache = tmp_path / "cache"
    seen = []
    report = fetch(DET, cache_dir=cache, mirror=http_mirror.url, lock=lock, timeout=10,
                   progress=lambda d, t: seen.append((d, t)))
    assert report.source == http_mirror.url + DET_HOST + "/" + DET_URL_PATH
    assert http_mirror.requests == ["/" + DET_HOST + "/" + DET_URL_PATH]
    size = det_archive(mirror).stat().st_size
    assert seen[-1] == (size, size)
    assert {f.path: f.sha256 for f in report.files}["inference.pdiparams"] == sha(weights)
    assert fetch(DET, cache_dir=cache, mirror=http_mirror.url, lock=lock).cached is True
    assert len(http_mirror.requests) == 1


@pytest.fixture
def no_sockets(monkeypatch):
    """Any attempt to open a network connection fails the test, below urllib and below _open_url."""

    def refuse(self, address, *args):
        raise AssertionError(f"network connection attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_cache_hit_makes_no_network_attempt(lock, mirror, tmp_path, no_sockets):
    cache = tmp_path / "cache"
    fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    # The official URL and an http mirror are both "remote": a verified cached copy must not touch either.
    assert fetch(DET, cache_dir=cache, lock=lock).cached is True
    assert fetch(DET, cache_dir=cache, mirror="http://127.0.0.1:9/", lock=lock).cached is True


@pytest.fixture
def loopback_only(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def silent_host():
    """A loopback port that completes TCP handshakes (the kernel's backlog) but never answers: what a host
    behind a firewall that drops packets, or a stalled proxy, looks like to the client."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@pytest.mark.parametrize("connect_timeout", [0.5, fetch_mod.CONNECT_TIMEOUT_S])
def test_silent_host_costs_the_connect_timeout_not_the_read_timeout(lock, tmp_path, loopback_only, silent_host,
                                                                    connect_timeout):
    cache = tmp_path / "cache"
    start = time.monotonic()
    with pytest.raises(FetchError, match=rf"download failed: {silent_host}/.*: no answer within {connect_timeout:g} s"):
        fetch(DET, cache_dir=cache, mirror=silent_host, lock=lock, timeout=120, connect_timeout=connect_timeout)
    elapsed = time.monotonic() - start
    assert connect_timeout - 0.1 <= elapsed < 2 * connect_timeout + 0.5, elapsed
    assert cache_leftovers(cache) == []


def test_slow_body_is_bound_by_the_read_timeout(lock, mirror, tmp_path, loopback_only):
    # The headers come at once, then the body pauses for longer than the connect timeout: a slow but
    # live download must not be cut by the short timeout meant for hosts that never answer.
    data = det_archive(mirror).read_bytes()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(data))
            conn.sendall(data[:1000])
            time.sleep(1.0)
            conn.sendall(data[1000:])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        report = fetch(DET, cache_dir=tmp_path / "cache", mirror=f"http://127.0.0.1:{server.getsockname()[1]}",
                       lock=lock, timeout=10, connect_timeout=0.3)
    finally:
        thread.join(timeout=10)
        server.close()
    assert report.cached is False and report.archive_sha256 == sha(data)


def test_http_mirror_missing_archive(lock, http_mirror, mirror, tmp_path):
    det_archive(mirror).unlink()
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"download failed: http://127\.0\.0\.1:\d+/.*_infer\.tar: HTTP 404"):
        fetch(DET, cache_dir=cache, mirror=http_mirror.url, lock=lock, timeout=10)
    assert cache_leftovers(cache) == []


def test_official_url_without_mirror(lock, tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout, connect_timeout):
        calls.append((url, timeout, connect_timeout))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(fetch_mod, "_open_url", offline)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=re.escape(f"download failed: https://{DET_HOST}/{DET_URL_PATH}: no route")):
        fetch(DET, cache_dir=cache, lock=lock, timeout=7)
    assert calls == [(f"https://{DET_HOST}/{DET_URL_PATH}", 7, fetch_mod.CONNECT_TIMEOUT_S)]
    assert cache_leftovers(cache) == []


def test_missing_archive_in_directory_mirror_does_not_fall_back(lock, tmp_path, no_network):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=re.escape(str(det_archive(empty))) + r" \(mirror layout"):
        fetch(DET, cache_dir=cache, mirror=empty, lock=lock)
    with pytest.raises(FetchError, match="mirror directory not found"):
        fetch(DET, cache_dir=cache, mirror=tmp_path / "nowhere", lock=lock)
    with pytest.raises(FetchError, match="only a local directory or an http"):
        fetch(DET, cache_dir=cache, mirror="ftp://mirror.example/", lock=lock)
    assert no_network == []
    assert cache_leftovers(cache) == []


def test_tampered_pdmodel_refused_and_nothing_left(lock, tmp_path, real_det_files, weights, no_network):
    mirror = tmp_path / "mirror"
    files = dict(real_det_files)
    files["inference.pdmodel"] = files["inference.pdmodel"][:-1] + bytes([files["inference.pdmodel"][-1] ^ 1])
    make_tar(det_archive(mirror), det_members(files, weights))
    cache = tmp_path / "cache"
    expected = README_HASHES[(DET_GRAPH, "inference.pdmodel")]
    msg = (
        f"sha256 mismatch for inference.pdmodel in picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar: "
        f"expected {expected}, got {sha(files['inference.pdmodel'])}"
    )
    with pytest.raises(FetchError, match=re.escape(msg)):
        fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert cache_leftovers(cache) == []


def test_missing_listed_member_refused(lock, tmp_path, real_det_files, no_network):
    mirror = tmp_path / "mirror"
    make_tar(det_archive(mirror), [(DET_GRAPH + "/" + n, d) for n, d in real_det_files.items()])
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="inference.pdiparams is listed in models.lock but missing from picodet_"):
        fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert cache_leftovers(cache) == []


def test_wrong_top_directory_refused(lock, tmp_path, real_det_files, weights):
    mirror = tmp_path / "mirror"
    make_tar(det_archive(mirror), det_members(real_det_files, weights, prefix="renamed_infer/"))
    with pytest.raises(FetchError, match=r"does not unpack to picodet_PPLCNet_x2_5_mainbody_lite_v1\.0_infer/.*renamed_infer"):
        fetch(DET, cache_dir=tmp_path / "cache", mirror=mirror, lock=lock)
    assert cache_leftovers(tmp_path / "cache") == []


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


@pytest.mark.parametrize(
    "bad, member, reason",
    [
        (("../evil", b"x"), "../evil", "has a '..' component"),
        ((DET_GRAPH + "/../../evil", b"x"), DET_GRAPH + "/../../evil", "has a '..' component"),
        (("/tmp/evil-abs", b"x"), "/tmp/evil-abs", "is an absolute path"),
        (("C:/evil", b"x"), "C:/evil", "is an absolute path"),
        ((DET_GRAPH + "\\..\\evil", b"x"), DET_GRAPH + "\\..\\evil", "contains a backslash"),
        (_link(DET_GRAPH + "/link", "/etc/passwd", tarfile.SYMTYPE), DET_GRAPH + "/link", "is a symlink"),
        (_link(DET_GRAPH + "/inner", "inference.pdmodel", tarfile.SYMTYPE), DET_GRAPH + "/inner", "is a symlink"),
        (_link(DET_GRAPH + "/hard", DET_GRAPH + "/inference.pdmodel", tarfile.LNKTYPE), DET_GRAPH + "/hard", "is a hardlink"),
        (_special(DET_GRAPH + "/fifo", tarfile.FIFOTYPE), DET_GRAPH + "/fifo", "is a device or FIFO"),
        (_special(DET_GRAPH + "/tty", tarfile.CHRTYPE), DET_GRAPH + "/tty", "is a device or FIFO"),
        (((DET_GRAPH + "/inference.pdmodel"), b"second copy"), DET_GRAPH + "/inference.pdmodel", "appears twice"),
    ],
)
@pytest.mark.parametrize("stdlib_filter", [True, False], ids=["with-data-filter", "without-data-filter"])
def test_unsafe_tar_members_refused(lock, tmp_path, real_det_files, weights, bad, member, reason, stdlib_filter, monkeypatch):
    if not stdlib_filter:
        # Python 3.9/3.10 before the backport have no tarfile.data_filter: our own checks must suffice.
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    mirror = tmp_path / "mirror"
    members = det_members(real_det_files, weights) + [bad]
    make_tar(det_archive(mirror), members)
    cache = tmp_path / "cache"
    expected = f"unsafe member in picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar: {member!r}"
    with pytest.raises(FetchError, match=re.escape(expected) + ".*" + re.escape(reason)):
        fetch(DET, cache_dir=cache, mirror=mirror, lock=lock)
    assert cache_leftovers(cache) == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil-abs").exists()


def test_size_cap(lock, mirror, tmp_path):
    with pytest.raises(FetchError, match="larger than the 1000-byte limit"):
        fetch(DET, cache_dir=tmp_path / "c1", mirror=mirror, lock=lock, max_bytes=1000)
    assert cache_leftovers(tmp_path / "c1") == []


def test_unpacked_size_cap(tmp_path):
    # A compression bomb in miniature: a small .tar.gz that unpacks to far more than the cap.
    bomb_mirror = tmp_path / "bomb"
    archive = make_tar(toy_archive(bomb_mirror), TOY_MEMBERS + [("toy_infer/zeros", bytes(400_000))], gz=True)
    assert archive.stat().st_size < 100_000
    lock = load_lock(write_lock(tmp_path / "t.lock", [entry_dict()]))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="toy_infer.tar: unpacked size exceeds the 100000-byte limit at member 'toy_infer/zeros'"):
        fetch("toy", cache_dir=cache, mirror=bomb_mirror, lock=lock, max_bytes=100_000)
    assert cache_leftovers(cache) == []
    assert fetch("toy", cache_dir=cache, mirror=bomb_mirror, lock=lock, max_bytes=500_000).cached is False


def test_not_an_archive(lock, tmp_path):
    mirror = tmp_path / "mirror"
    det_archive(mirror).parent.mkdir(parents=True)
    det_archive(mirror).write_bytes(b"<html>404 from a captive portal</html>")
    with pytest.raises(FetchError, match="picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar is not a readable tar"):
        fetch(DET, cache_dir=tmp_path / "cache", mirror=mirror, lock=lock)
    assert cache_leftovers(tmp_path / "cache") == []


def test_pinned_archive_hash(tmp_path):
    mirror = tmp_path / "mirror"
    archive = make_tar(toy_archive(mirror), TOY_MEMBERS, gz=True)
    good = load_lock(write_lock(tmp_path / "good.lock", [entry_dict(archive_sha256=sha(archive.read_bytes()))]))
    report = fetch("toy", cache_dir=tmp_path / "cache", mirror=mirror, lock=good)
    assert report.archive_pinned and report.archive_sha256 == sha(archive.read_bytes())
    bad = load_lock(write_lock(tmp_path / "bad.lock", [entry_dict(archive_sha256="0" * 64)]))
    cache = tmp_path / "cache2"
    with pytest.raises(FetchError, match=f"sha256 mismatch for archive toy_infer.tar from .*: expected {'0' * 64}, got {sha(archive.read_bytes())}"):
        fetch("toy", cache_dir=cache, mirror=mirror, lock=bad)
    assert cache_leftovers(cache) == []


def test_zip_archive_and_unlisted_files(tmp_path):
    mirror = tmp_path / "mirror"
    make_zip(toy_archive(mirror, "zip"), TOY_MEMBERS + [("toy_infer/sub/extra.txt", b"extra")])
    url = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/rec/models/inference/toy_infer.zip"
    lock = load_lock(write_lock(tmp_path / "z.lock", [entry_dict(url=url, format="zip")]))
    report = fetch("toy", cache_dir=tmp_path / "cache", mirror=mirror, lock=lock)
    assert [(f.path, f.status) for f in report.files] == [
        ("inference.pdmodel", STATUS_PINNED_OK),
        ("inference.pdiparams", STATUS_UNPINNED),
        ("sub/extra.txt", STATUS_UNLISTED),
    ]
    assert (report.model_dir / "sub" / "extra.txt").read_bytes() == b"extra"


def _zip_symlink(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in TOY_MEMBERS:
            zf.writestr(name, data)
        info = zipfile.ZipInfo("toy_infer/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")


@pytest.mark.parametrize(
    "build, member, reason",
    [
        (lambda p: make_zip(p, TOY_MEMBERS + [("../evil", b"x")]), "../evil", "'..' component"),
        (lambda p: make_zip(p, TOY_MEMBERS + [("/abs-evil", b"x")]), "/abs-evil", "absolute path"),
        (_zip_symlink, "toy_infer/link", "is a symlink"),
    ],
)
def test_unsafe_zip_members_refused(tmp_path, build, member, reason):
    mirror = tmp_path / "mirror"
    build(toy_archive(mirror, "zip"))
    url = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/rec/models/inference/toy_infer.zip"
    lock = load_lock(write_lock(tmp_path / "z.lock", [entry_dict(url=url, format="zip")]))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=re.escape(f"unsafe member in toy_infer.zip: {member!r}") + ".*" + reason):
        fetch("toy", cache_dir=cache, mirror=mirror, lock=lock)
    assert cache_leftovers(cache) == []
    assert not (tmp_path / "evil").exists()


def test_bad_arguments(lock, mirror, tmp_path):
    with pytest.raises(InvalidInputError, match="timeout must be a positive"):
        fetch(DET, cache_dir=tmp_path, mirror=mirror, lock=lock, timeout=0)
    with pytest.raises(InvalidInputError, match="max_bytes must be a positive"):
        fetch(DET, cache_dir=tmp_path, mirror=mirror, lock=lock, max_bytes=0)


# ---------------------------------------------------------------------------------------------
# bounded archive metadata: headers, names, member counts and directories are bounded before
# they are read, and every refusal is one short line


MIB = 1 << 20
MEMORY_CEILING = 16 * MIB


def raw_header(name: bytes, kind: bytes, size: int, *, fields=()) -> bytes:
    """One ustar header block declaring ``size`` data bytes, written field by field (no tarfile writer);
    ``fields`` are extra (offset, bytes) pairs."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    for offset, value in fields:
        block[offset:offset + len(value)] = value
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_records(records: dict) -> bytes:
    """PAX ``"<length> <key>=<value>\\n"`` records, the length counting itself."""
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def tar_blocks(members=TOY_MEMBERS, *, fmt=tarfile.GNU_FORMAT) -> bytes:
    """Header and data blocks of (name, bytes) members, without the end-of-archive blocks."""
    out = b""
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out += info.tobuf(fmt, "utf-8", "surrogateescape") + padded(data)
    return out


def toy_tar_bytes(members=TOY_MEMBERS, *, fmt=tarfile.GNU_FORMAT) -> bytes:
    return tar_blocks(members, fmt=fmt) + bytes(1024)


def repeated_gzip(data: bytes, times: int) -> bytes:
    """``times`` copies of ``data`` as concatenated gzip members: a small file that inflates hugely."""
    return gzip.compress(data, mtime=0) * times


def toy_lock(tmp_path: Path, **over):
    return load_lock(write_lock(tmp_path / "toy.lock", [entry_dict(**over)]))


@contextlib.contextmanager
def traced_peak():
    """Yield a dict that receives ``peak``: the most Python memory allocated inside the block."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    box = {}
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()


def refused(tmp_path: Path, lock, *, name: str = "toy", max_bytes: int = 1 << 30, traced: bool = True) -> str:
    """Fetch ``name`` from ``tmp_path/mirror``; return the FetchError's message after checking it is
    one short line, that memory stayed bounded (when ``traced``) and that nothing was left in the cache."""
    cache = tmp_path / "cache"
    with (traced_peak() if traced else contextlib.nullcontext({})) as mem, pytest.raises(FetchError) as info:
        fetch(name, cache_dir=cache, mirror=tmp_path / "mirror", lock=lock, max_bytes=max_bytes)
    message = str(info.value)
    assert len(message) < 300 and "\n" not in message, message[:1000]
    assert mem.get("peak", 0) < MEMORY_CEILING, mem["peak"]
    assert cache_leftovers(cache) == []
    return message


def write_archive(tmp_path: Path, data: bytes, suffix: str = "tar") -> Path:
    path = toy_archive(tmp_path / "mirror", suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


EXTENDED = [
    (tarfile.GNUTYPE_LONGNAME, "GNU long name"),
    (tarfile.GNUTYPE_LONGLINK, "GNU long link name"),
    (tarfile.XHDTYPE, "PAX"),
    (tarfile.XGLTYPE, "PAX global"),
]


@pytest.mark.parametrize("kind, what", EXTENDED, ids=[k.decode() for k, _ in EXTENDED])
def test_huge_extended_header_refused_unread(tmp_path, kind, what):
    # 1 GiB declared, 4 KiB present: tarfile would try to read the whole declared payload.
    write_archive(tmp_path, raw_header(b"././@LongLink", kind, 1 << 30) + b"a" * 4096 + toy_tar_bytes())
    message = refused(tmp_path, toy_lock(tmp_path))
    assert message == (
        f"toy_infer.tar: {what} header at offset 0 declares 1073741824 bytes, over the 16384-byte limit; refusing it"
    )


@pytest.mark.parametrize("kind, what", EXTENDED[:1] + EXTENDED[2:], ids=["L", "x", "g"])
def test_inflating_extended_header_never_held_in_memory(tmp_path, kind, what):
    # The payload is really there, compressed: 64 MiB of header inflated from a 70 KB .tar.gz.
    data = (
        gzip.compress(raw_header(b"././@LongLink", kind, 64 * MIB), mtime=0)
        + repeated_gzip(b"a" * MIB, 64)
        + gzip.compress(toy_tar_bytes(), mtime=0)
    )
    assert write_archive(tmp_path, data).stat().st_size < 100_000
    message = refused(tmp_path, toy_lock(tmp_path))
    assert message.startswith(f"toy_infer.tar: {what} header at offset 0 declares {64 * MIB} bytes, over the")


def test_extended_header_chain_refused(tmp_path):
    # Hundreds of empty PAX headers in a row: tarfile would recurse once per header.
    write_archive(tmp_path, raw_header(b"././@PaxHeader", tarfile.XHDTYPE, 0) * 400 + toy_tar_bytes())
    message = refused(tmp_path, toy_lock(tmp_path))
    assert message == "toy_infer.tar: more than 8 extended headers in a row at offset 4096; refusing it"


def test_pax_record_count_capped(tmp_path):
    # A small global header with many keys would be copied into every member tarfile keeps.
    payload = pax_records({f"comment{i}": "x" for i in range(100)})
    assert len(payload) < 16 << 10
    write_archive(tmp_path, raw_header(b"pax_global_header", tarfile.XGLTYPE, len(payload)) + padded(payload)
                  + toy_tar_bytes())
    message = refused(tmp_path, toy_lock(tmp_path))
    assert re.fullmatch(
        r"toy_infer\.tar: the member at offset \d+ has 100 PAX records, over the limit of 64; refusing it", message
    )


def test_extended_headers_capped_in_total(tmp_path):
    # Each header is under the per-header limit; 150 of them are over the per-archive one.
    members = []
    for i in range(150):
        info = tarfile.TarInfo(f"toy_infer/extra{i}")
        info.pax_headers = {"comment": "c" * 15_000}
        members.append(info)
    make_tar(toy_archive(tmp_path / "mirror"), TOY_MEMBERS + members, gz=True)
    message = refused(tmp_path, toy_lock(tmp_path))
    assert re.fullmatch(r"toy_infer\.tar: extended headers exceed the 2097152-byte limit at offset \d+; refusing it", message)


def test_member_count_capped(tmp_path):
    # The same directory 10,000 times over: nothing to write, only members to count.
    directory = _special("toy_infer/sub", tarfile.DIRTYPE).tobuf(tarfile.GNU_FORMAT)
    write_archive(tmp_path, gzip.compress(tar_blocks() + directory * 10_000 + bytes(1024), mtime=0))
    message = refused(tmp_path, toy_lock(tmp_path), traced=False)  # tracing 10,000 members is slow
    assert message == "toy_infer.tar: more than 10000 members (at 'toy_infer/sub'); refusing it"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("toy_infer/" + "a/" * 2495 + "z",
         r"'toy_infer/a/a/.*\.\.\. \(5001 characters\) is a 5001-byte name, over the 4096-byte limit"),
        ("toy_infer/" + "b" * 300, r"'toy_infer/b+\.\.\. \(310 characters\) has a path component over 255 bytes"),
        ("toy_infer/evil\nname", r"'toy_infer/evil\\nname' contains control characters"),
        ("toy_infer/\x1b[2Jclear", r"'toy_infer/\\x1b\[2Jclear' contains control characters"),
        ("a" * 3000 + "/../evil", r"'aaaa.*\.\.\. \(3008 characters\) has a '\.\.' component"),
    ],
    ids=["name-over-4096", "component-over-255", "newline", "escape", "long-name-quoted"],
)
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_bad_names_refused_in_one_short_line(tmp_path, name, reason, fmt):
    write_archive(tmp_path, toy_tar_bytes(TOY_MEMBERS + [(name, b"x")], fmt=fmt))
    message = refused(tmp_path, toy_lock(tmp_path))
    assert re.match(r"unsafe member in toy_infer\.tar: " + reason, message), message


def test_non_utf8_name_refused(tmp_path):
    # tarfile turns bytes that are not UTF-8 into lone surrogates, which no UTF-8 stream can print.
    write_archive(tmp_path, toy_tar_bytes(TOY_MEMBERS + [("toy_infer/bad\udcffname", b"x")], fmt=tarfile.GNU_FORMAT))
    message = refused(tmp_path, toy_lock(tmp_path))
    assert message == "unsafe member in toy_infer.tar: 'toy_infer/bad\\udcffname' is not a UTF-8 name", message


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_legal_names_still_unpack(tmp_path, fmt):
    deep = "toy_infer/" + "/".join(["d" * 250] * 4) + "/f"
    write_archive(tmp_path, toy_tar_bytes(TOY_MEMBERS + [(deep, b"deep")], fmt=fmt))
    report = fetch("toy", cache_dir=tmp_path / "cache", mirror=tmp_path / "mirror", lock=toy_lock(tmp_path))
    assert (report.model_dir / deep.split("/", 1)[1]).read_bytes() == b"deep"


def test_top_level_listing_is_cut(tmp_path):
    members = [("x" * 200 + str(i), b"") for i in range(300)]
    write_archive(tmp_path, toy_tar_bytes(members))
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as info:
        fetch("toy", cache_dir=cache, mirror=tmp_path / "mirror", lock=toy_lock(tmp_path))
    message = str(info.value)
    assert message.startswith("toy_infer.tar does not unpack to toy_infer/") and message.endswith("(300 in all))")
    assert len(message) < 300 and "\n" not in message


@pytest.mark.parametrize(
    "kind, payload",
    [
        # A record length of 5000 digits: int() refuses it with a ValueError tarfile lets through.
        (tarfile.XHDTYPE, b"1" * 5000 + b" path=x\n"),
        (tarfile.XGLTYPE, pax_records({"GNU.sparse.realsize": "many"})),
    ],
    ids=["length-digits", "global-realsize"],
)
def test_malformed_pax_header_refused(tmp_path, kind, payload):
    write_archive(tmp_path, gzip.compress(raw_header(b"././@PaxHeader", kind, len(payload)) + padded(payload)
                                          + toy_tar_bytes(), mtime=0))
    message = refused(tmp_path, toy_lock(tmp_path))
    # Python 3.13 checks PAX record lengths itself and reports an invalid header instead.
    assert re.fullmatch(
        r"toy_infer\.tar(: malformed header at offset \d+: .+; refusing it| is not a readable tar archive: .+)", message
    ), message


@pytest.mark.parametrize("extended", [False, True], ids=["plain", "extension-blocks"])
def test_sparse_member_refused(tmp_path, extended):
    # With its "extended" flag set, a sparse header is followed by map blocks for as long as each
    # block says another follows: here 16 MiB of them, each with 21 map entries.
    header = raw_header(b"toy_infer/sparse", tarfile.GNUTYPE_SPARSE, 0, fields=[(482, bytes([extended]))])
    data = gzip.compress(tar_blocks() + header, mtime=0)
    if extended:
        block = padded(b"%011o\0" % 1 * 42)[:504] + b"\x01" + bytes(7)
        data += repeated_gzip(block * 2048, 16)
    write_archive(tmp_path, data + gzip.compress(bytes(1024), mtime=0))
    message = refused(tmp_path, toy_lock(tmp_path))
    assert re.fullmatch(
        r"toy_infer\.tar: the member at offset \d+ is a GNU sparse file, which is not supported; refusing it", message
    )


@pytest.mark.parametrize(
    "records",
    [
        # 1.0: the map is read from the data, as long as its first line says; here "forever".
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "toy_infer/s", "GNU.sparse.realsize": "9"},
        {"GNU.sparse.map": "0,5", "GNU.sparse.size": "5"},
    ],
    ids=["1.0", "0.1"],
)
def test_pax_sparse_member_refused(tmp_path, records):
    payload = pax_records(records)
    sparse_map = b"99999999999\n" + b"1" * 4000
    archive = (
        tar_blocks()
        + raw_header(b"././@PaxHeader", tarfile.XHDTYPE, len(payload)) + padded(payload)
        + raw_header(b"toy_infer/s", tarfile.REGTYPE, len(sparse_map)) + padded(sparse_map)
        + bytes(1024)
    )
    write_archive(tmp_path, archive)
    message = refused(tmp_path, toy_lock(tmp_path))
    assert "is a GNU sparse file, which is not supported" in message


@pytest.mark.parametrize("spread", [False, True], ids=["one-member", "many-members"])
def test_gzip_bomb_refused_while_streaming(tmp_path, spread):
    # 64 MiB of zeros in a 70 KB .tar.gz, against an 8 MiB cap: as one member or as 64 of 1 MiB.
    sizes = [MIB] * 64 if spread else [64 * MIB]
    data = gzip.compress(tar_blocks(), mtime=0)
    for i, size in enumerate(sizes):
        data += gzip.compress(raw_header(b"toy_infer/zeros%d" % i, tarfile.REGTYPE, size), mtime=0)
        data += repeated_gzip(bytes(MIB), size // MIB)
    data += gzip.compress(bytes(1024), mtime=0)
    assert write_archive(tmp_path, data).stat().st_size < 100_000
    message = refused(tmp_path, toy_lock(tmp_path), max_bytes=8 * MIB)
    last = 7 if spread else 0
    assert message == f"toy_infer.tar: unpacked size exceeds the {8 * MIB}-byte limit at member 'toy_infer/zeros{last}'"


def zip_directory(count: int, *, claimed: int) -> bytes:
    """A zip of nothing but a central directory of ``count`` entries whose end record claims ``claimed``."""
    name = b"toy_infer/x"
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0) + name
    central = entry * count
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, claimed, claimed, len(central), 0, 0)
    return central + end


@pytest.mark.parametrize(
    "count, claimed, reason",
    [
        (10_001, 10_001, "its central directory lists 10001 members, over the limit of 10000"),
        (100_000, 1, "its central directory takes 5700000 bytes, over the 2097152-byte limit"),
    ],
    ids=["entries", "bytes"],
)
def test_zip_directory_bounded_before_parsing(tmp_path, count, claimed, reason):
    write_archive(tmp_path, zip_directory(count, claimed=claimed), "zip")
    url = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/rec/models/inference/toy_infer.zip"
    message = refused(tmp_path, toy_lock(tmp_path, url=url, format="zip"))
    assert message == f"toy_infer.zip: {reason}"


def test_not_an_archive_message_is_one_line(lock, tmp_path):
    mirror = tmp_path / "mirror"
    det_archive(mirror).parent.mkdir(parents=True)
    det_archive(mirror).write_bytes(b"<html>404 from a captive portal</html>" * 20)
    refused(tmp_path, lock, name=DET)


def test_cli_reports_hostile_archive_in_one_line(tmp_path, monkeypatch):
    from edge_shitu.cli import main

    monkeypatch.delenv("EDGE_SHITU_MODELS_LOCK", raising=False)
    mirror = tmp_path / "mirror"
    archive = det_archive(mirror)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 1 << 30) + b"a" * 4096)
    out, err = io.StringIO(), io.StringIO()
    code = main(["models", "fetch", DET, "--mirror", str(mirror), "--cache", str(tmp_path / "cache")],
                stdout=out, stderr=err)
    # FetchError is an OSError, not a ValueError: the CLI reports it as a failure (1), not bad input (2).
    assert code == 1
    assert out.getvalue() == ""
    lines = [line for line in err.getvalue().splitlines() if not line.startswith("downloading:")]  # progress
    assert len(lines) == 1 and len(lines[0]) < 300, err.getvalue()[:1000]
    assert lines[0].startswith("edge-shitu: error: picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer.tar: GNU long name header")
