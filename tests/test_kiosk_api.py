"""The kiosk's HTTP API (docs/kiosk.md), in-process through Starlette's TestClient, plus the served process
killed in the middle of enrolments. The bundle is the tiny random-weight ONNX bundle: these tests check the
service, never recognition accuracy."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="starlette (the 'kiosk' extra) is not installed")
pytest.importorskip("httpx2", reason="httpx2 (the 'dev' extra, for Starlette's TestClient) is not installed")

from starlette.testclient import TestClient  # noqa: E402

from edge_shitu.cli import main  # noqa: E402
from edge_shitu.errors import InvalidInputError  # noqa: E402
from edge_shitu.gallery import Gallery  # noqa: E402
from edge_shitu.kiosk.app import create_app  # noqa: E402
from edge_shitu.kiosk.security import allowed_hosts, load_or_create_token, split_host  # noqa: E402
from edge_shitu.kiosk.service import KioskService, ServiceOptions, parse_box  # noqa: E402

TOKEN = "t0ken-for-the-tests-0123456789"


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(test_images) -> list:
    """Five drink photos as JPEG bytes, scaled to 320 px wide (what a kiosk camera frame is like)."""
    out = []
    for path in sorted(test_images)[:5]:
        im = Image.open(path).convert("RGB")
        im.thumbnail((320, 320))
        out.append(jpeg(np.asarray(im)))
    return out


@pytest.fixture
def service(tiny_bundle, tmp_path):
    with KioskService.open(tiny_bundle, tmp_path / "kiosk.db", options=ServiceOptions(threads=1)) as svc:
        yield svc


@pytest.fixture
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


def post_image(client, path: str, data: bytes, kind: str = "image/jpeg", **params):
    return client.post(path, content=data, headers={"Content-Type": kind}, params=params)


# ---------------------------------------------------------------------------------------------- reading


def test_health_info_and_the_ui_are_served(client, tiny_bundle):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    assert info["bundle"]["replica"] is True and info["bundle"]["precision"] == "fp32"
    assert set(info["bundle"]["models"]) == {"det", "rec"} and info["bundle"]["bits"] == 512
    assert info["gallery"]["items"] == 0 and info["gallery"]["labels"] == 0
    assert info["token_required"] is False
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/static/app.js").status_code == 200


def test_the_gallery_is_created_when_missing(tiny_bundle, tmp_path):
    target = tmp_path / "new.db"
    with KioskService.open(tiny_bundle, target, options=ServiceOptions(threads=1)):
        pass
    with Gallery.open(target) as g:
        assert len(g) == 0 and g.check() == []


def test_recognize_answers_what_recognize_json_prints(client, photos, tiny_bundle, service, tmp_path, capsys):
    created = post_image(client, "/api/items", photos[0], label="可口可乐")
    assert created.status_code == 201, created.text
    answer = post_image(client, "/api/recognize", photos[0], name="a.jpg")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"image", "width", "height", "results", "timings_ms", "replica"}
    assert body["replica"] is True and body["image"] == "a.jpg"
    best = body["results"][0]
    assert set(best) == {"box", "label", "distance", "similarity", "detection_score", "whole_image", "candidates"}
    assert best["label"] == "可口可乐" and best["distance"] == 0
    # A new kiosk gallery keeps int8 compact features: the photo's own similarity is 1 up to int8 rounding.
    assert service.gallery.compact == "int8"
    first = best["candidates"][0]
    assert {k: first[k] for k in ("id", "label", "distance")} == {"id": created.json()["id"], "label": "可口可乐",
                                                                  "distance": 0}
    assert first["similarity"] == best["similarity"] and abs(first["similarity"] - 1.0) < 2e-3

    # The same photo through the CLI, on the same gallery: the same record but for names and timings.
    photo = tmp_path / "a.jpg"
    photo.write_bytes(photos[0])
    capsys.readouterr()
    code = main(["recognize", "--bundle", str(tiny_bundle), "--gallery", str(service.gallery.path), "--json",
                 "--include-unknown", str(photo)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)[0]
    for record in (printed, body):
        record.pop("timings_ms"), record.pop("image")
    assert printed == body


def test_unknown_objects_are_reported_with_a_null_label(client, photos):
    body = post_image(client, "/api/recognize", photos[1]).json()
    assert body["results"], "an empty gallery still reports the regions, as unknown"
    assert all(r["label"] is None and r["candidates"] == [] for r in body["results"])


def test_items_pages_labels_and_thumbnails(client, photos):
    ids = []
    for i, data in enumerate(photos):
        r = post_image(client, "/api/items", data, label="cola" if i % 2 == 0 else "tea")
        assert r.status_code == 201
        ids.append(r.json()["id"])
    everything = client.get("/api/items").json()
    assert everything["total"] == 5 and [it["id"] for it in everything["items"]] == ids
    item = everything["items"][0]
    assert set(item) == {"id", "label", "source", "added_at", "has_thumbnail"} and item["has_thumbnail"] is True
    page = client.get("/api/items", params={"label": "cola", "offset": 1, "limit": 1}).json()
    assert page == {"total": 3, "items": [everything["items"][2]]}
    assert client.get("/api/labels").json() == {"labels": [{"label": "cola", "count": 3}, {"label": "tea", "count": 2}]}
    thumb = client.get(f"/api/items/{ids[0]}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert len(thumb.content) < 16_000
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 160


def test_enrol_with_a_box_crops_it_and_clips_it(client, photos):
    r = post_image(client, "/api/items", photos[0], label="cola", box="-10,-10,100.5,80")
    assert r.status_code == 201
    assert r.json()["box"] == [0.0, 0.0, 100.5, 80.0]
    thumb = Image.open(io.BytesIO(client.get(f"/api/items/{r.json()['id']}/thumbnail").content))
    assert thumb.size == (100, 80) or abs(thumb.size[0] / thumb.size[1] - 100.5 / 80) < 0.05


def test_relabel_delete_and_delete_label(client, photos):
    a = post_image(client, "/api/items", photos[0], label="cola").json()["id"]
    b = post_image(client, "/api/items", photos[1], label="cola").json()["id"]
    c = post_image(client, "/api/items", photos[2], label="tea").json()["id"]
    assert client.patch(f"/api/items/{a}", json={"label": "water"}).json() == {"id": a, "label": "water"}
    assert client.delete(f"/api/items/{b}").json() == {"deleted": 1}
    assert client.delete(f"/api/items/{b}").status_code == 404
    assert client.delete("/api/labels/tea").json() == {"deleted": 1}
    assert client.delete("/api/labels/tea").status_code == 404
    assert client.get(f"/api/items/{c}/thumbnail").status_code == 404
    assert [it["label"] for it in client.get("/api/items").json()["items"]] == ["water"]


def test_settings_are_validated_applied_and_persisted(tiny_bundle, tmp_path, photos):
    path = tmp_path / "g.db"
    options = ServiceOptions(threads=1, compact=None)
    with KioskService.open(tiny_bundle, path, options=options) as svc, TestClient(create_app(svc)) as c:
        default = c.get("/api/settings").json()
        assert default == {"mode": "distance", "max_distance": default["max_distance"], "min_similarity": None,
                           "det_threshold": default["det_threshold"], "bits": 512, "compact": None}
        post_image(c, "/api/items", photos[0], label="cola")
        changed = c.put("/api/settings", json={"max_distance": 0, "det_threshold": 0.5}).json()
        assert changed == {"mode": "distance", "max_distance": 0, "min_similarity": None, "det_threshold": 0.5,
                           "bits": 512, "compact": None}
        # Radius 0 accepts only identical codes: another photo is now unknown.
        others = post_image(c, "/api/recognize", photos[3]).json()["results"]
        assert all(r["label"] is None or r["distance"] == 0 for r in others)
        for bad in ({"max_distance": 513}, {"max_distance": -1}, {"max_distance": 1.5}, {"max_distance": True},
                    {"det_threshold": 1.5}, {"det_threshold": "0.3"}, {"det_threshold": float("nan")},
                    {"threshold": 3}, [1, 2], {"min_similarity": 0.5}):
            r = c.put("/api/settings", content=json.dumps(bad, allow_nan=True).encode())
            assert r.status_code == 400 and "error" in r.json(), bad
        assert c.get("/api/settings").json() == changed
    with KioskService.open(tiny_bundle, path, options=options) as again:
        assert again.settings() == changed


def test_similarity_settings_of_a_gallery_with_compact_features(tiny_bundle, tmp_path, photos):
    path = tmp_path / "g.db"
    with KioskService.open(tiny_bundle, path, options=ServiceOptions(threads=1)) as svc, \
            TestClient(create_app(svc)) as c:
        default = c.get("/api/settings").json()
        assert (default["mode"], default["min_similarity"], default["compact"]) == ("similarity", 0.5, "int8")
        post_image(c, "/api/items", photos[0], label="cola")
        own = post_image(c, "/api/recognize", photos[0]).json()["results"]
        assert [r["label"] for r in own if r["distance"] == 0] and all(r["similarity"] < 1.0 for r in own)
        # The photo's own regions are accepted at 0.5; at 1.0 the int8 rounding (0.9999...) rejects every one.
        changed = c.put("/api/settings", json={"min_similarity": 1.0, "det_threshold": 0.2}).json()
        assert (changed["min_similarity"], changed["det_threshold"]) == (1.0, 0.2)
        assert all(r["label"] is None for r in post_image(c, "/api/recognize", photos[0]).json()["results"])
        for bad in ({"min_similarity": 1.5}, {"min_similarity": -2}, {"min_similarity": "0.3"},
                    {"min_similarity": True}, {"min_similarity": float("nan")}):
            r = c.put("/api/settings", content=json.dumps(bad, allow_nan=True).encode())
            assert r.status_code == 400 and "min_similarity" in r.json()["error"], bad
        assert c.get("/api/settings").json() == changed
    with KioskService.open(tiny_bundle, path, options=ServiceOptions(threads=1, compact=None)) as again:
        assert again.settings() == changed  # an existing gallery keeps its own form


@pytest.mark.parametrize("compact, metric, points, first", [("int8", "similarity", 401, -1.0),
                                                            (None, "distance", 513, 0)])
def test_calibrate_returns_the_curve_and_refuses_a_tiny_gallery(tiny_bundle, tmp_path, photos, compact, metric,
                                                                points, first):
    with KioskService.open(tiny_bundle, tmp_path / "g.db", options=ServiceOptions(threads=1, compact=compact)) as svc, \
            TestClient(create_app(svc)) as client:
        r = client.post("/api/calibrate", json={"precision": 0.9})
        assert r.status_code == 400 and "error" in r.json()
        for i, data in enumerate(photos):
            post_image(client, "/api/items", data, label=f"label{i % 2}")
        body = client.post("/api/calibrate", json={"precision": 0.9}).json()
        assert set(body) >= {"metric", "target_precision", "threshold", "reached", "curve", "items", "labels"}
        assert body["metric"] == metric and body["items"] == 5
        assert len(body["curve"]) == points and body["curve"][0]["threshold"] == first
        assert body["threshold"] is None or any(p["threshold"] == body["threshold"] for p in body["curve"])
        for bad in ({"precision": 0}, {"precision": 1.5}, {"precision": "high"}, {"target": 0.9}):
            assert client.post("/api/calibrate", json=bad).status_code == 400, bad


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind, data, status, words", [
    ("text/plain", b"hello", 415, "image/jpeg"),
    ("", b"\xff\xd8", 415, "Content-Type"),
    ("image/jpeg", b"", 400, "empty"),
    ("image/jpeg", b"not an image at all", 400, ""),
    ("image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, ""),
])
def test_bad_image_bodies_get_a_clear_4xx(client, kind, data, status, words):
    for path, params in (("/api/recognize", {}), ("/api/items", {"label": "x"})):
        r = client.post(path, content=data, headers={"Content-Type": kind} if kind else {}, params=params)
        assert r.status_code == status, (path, r.text)
        assert words in r.json()["error"]


def test_bodies_over_the_limit_get_413_declared_or_streamed(service, photos):
    with TestClient(create_app(service, max_body=4096)) as c:
        r = post_image(c, "/api/recognize", photos[0])
        assert r.status_code == 413 and "4096" in r.json()["error"]

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"\xff" * 1000

        r = c.post("/api/recognize", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413


def test_a_pixel_bomb_is_refused_from_its_header(tiny_bundle, tmp_path):
    with KioskService.open(tiny_bundle, tmp_path / "g.db", options=ServiceOptions(threads=1, max_pixels=10_000)) as svc, \
            TestClient(create_app(svc)) as c:
        r = post_image(c, "/api/recognize", jpeg(np.zeros((200, 200, 3), np.uint8)))
        assert r.status_code == 400 and "max_pixels" in r.json()["error"]


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("post", "/api/items", {"params": {}}, 400),                                   # no label
    ("post", "/api/items", {"params": {"label": "a\tb"}}, 400),                     # tab in the label
    ("post", "/api/items", {"params": {"label": " cola"}}, 400),                    # leading space
    ("post", "/api/items", {"params": {"label": "x", "box": "1,2,3"}}, 400),
    ("post", "/api/items", {"params": {"label": "x", "box": "5,5,1,1"}}, 400),
    ("post", "/api/items", {"params": {"label": "x", "box": "1,1,nan,4"}}, 400),
    ("post", "/api/items", {"params": {"label": "x", "box": "5000,5000,6000,6000"}}, 400),  # outside the image
    ("get", "/api/items", {"params": {"limit": "0"}}, 400),
    ("get", "/api/items", {"params": {"limit": "501"}}, 400),
    ("get", "/api/items", {"params": {"offset": "-1"}}, 400),
    ("get", "/api/items", {"params": {"offset": "ten"}}, 400),
    ("get", "/api/items/abc/thumbnail", {}, 400),
    ("get", "/api/items/99999999999999999999999/thumbnail", {}, 400),
    ("get", "/api/items/12/thumbnail", {}, 404),
    ("patch", "/api/items/12", {"json": {"label": "x"}}, 404),
    ("patch", "/api/items/12", {"content": b"{not json"}, 400),
    ("patch", "/api/items/12", {"json": {"name": "x"}}, 400),
    ("delete", "/api/items/12", {}, 404),
    ("get", "/api/nothing", {}, 404),
    ("delete", "/api/settings", {}, 405),
    ("put", "/api/settings", {"content": b"\xff\xfe"}, 400),
])
def test_malformed_requests_get_json_errors(client, photos, method, path, kwargs, status):
    if path == "/api/items" and method == "post":
        kwargs = {**kwargs, "content": photos[0], "headers": {"Content-Type": "image/jpeg"}}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and "Traceback" not in r.text


def test_parse_box():
    assert parse_box("1,2.5,3,4") == (1.0, 2.5, 3.0, 4.0)
    for bad in ("", "1,2,3", "1,2,3,4,5", "a,b,c,d", "1,2,1,4", "inf,0,1,1"):
        with pytest.raises(InvalidInputError):
            parse_box(bad)


# ---------------------------------------------------------------------------------------------- security


def test_the_token_is_required_for_the_api_not_for_health_or_ui(service):
    with TestClient(create_app(service, token=TOKEN)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200
        missing = c.get("/api/items")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert c.get("/api/items", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 403
        assert c.get("/api/items", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 403
        ok = c.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["token_required"] is True
        assert c.delete("/api/labels/x").status_code == 401


def test_host_allowlist_and_same_origin(client, photos):
    assert client.get("/api/info", headers={"Host": "evil.example:8000"}).status_code == 400
    assert client.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/info", headers={"Host": "[::1]:8000"}).status_code == 200
    cross = client.post("/api/items", params={"label": "x"}, content=photos[0],
                        headers={"Content-Type": "image/jpeg", "Origin": "http://evil.example"})
    assert cross.status_code == 403 and "Origin" in cross.json()["error"]
    site = client.delete("/api/labels/x", headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    same = client.post("/api/items", params={"label": "x"}, content=photos[0],
                       headers={"Content-Type": "image/jpeg", "Origin": "http://testserver"})
    assert same.status_code == 201
    # No CORS: nothing invites another origin to read the answers.
    r = client.get("/api/items", headers={"Origin": "http://evil.example"})
    assert not any(k.lower().startswith("access-control-") for k in r.headers)
    # Every answer, errors included, forbids framing and foreign scripts.
    for answer in (r, client.get("/"), client.get("/api/nothing"), cross):
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
    assert client.options("/api/items", headers={"Origin": "http://evil.example",
                                                  "Access-Control-Request-Method": "DELETE"}).status_code == 405


def test_split_host_and_allowed_hosts():
    assert split_host("Example.COM:8000") == "example.com" and split_host("[::1]:80") == "::1"
    assert split_host("::1") == "::1" and split_host("kiosk") == "kiosk"
    local = allowed_hosts("127.0.0.1")
    assert {"localhost", "127.0.0.1", "::1"} <= local and socket.gethostname().lower() not in local
    wide = allowed_hosts("0.0.0.0", ["Kiosk.LAN"])
    assert socket.gethostname().lower() in wide and "kiosk.lan" in wide and "0.0.0.0" not in wide


def test_token_files(tmp_path):
    path = tmp_path / "state" / "token"
    token, created = load_or_create_token(path)
    assert created and len(token) >= 40 and (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_token(path) == (token, False)
    path.chmod(0o644)
    with pytest.raises(InvalidInputError, match="chmod 600"):
        load_or_create_token(path)
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(InvalidInputError, match=r"token:1: expected a token of at least 16"):
        load_or_create_token(path)


# ---------------------------------------------------------------------------------------------- concurrency


def test_recognitions_and_enrolments_at_once_stay_consistent(client, photos, service):
    errors, seen = [], []

    def recognise():
        for i in range(6):
            r = post_image(client, "/api/recognize", photos[i % len(photos)])
            if r.status_code != 200:
                errors.append(r.text)
            seen.append(len(r.json()["results"]))

    def enrol(k):
        for i in range(4):
            r = post_image(client, "/api/items", photos[(i + k) % len(photos)], label=f"l{k}")
            if r.status_code != 201:
                errors.append(r.text)

    threads = [threading.Thread(target=recognise) for _ in range(3)] + \
              [threading.Thread(target=enrol, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert client.get("/api/items").json()["total"] == 8
    assert service.gallery.check() == []


# ---------------------------------------------------------------------------------------------- the process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the service did not answer {url}/healthz within {timeout} s")


def test_killing_the_service_mid_enrolment_loses_at_most_that_enrolment(tiny_bundle, tmp_path, photos):
    gallery = tmp_path / "k.db"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_shitu.cli", "serve", "--bundle", str(tiny_bundle),
                             "--gallery", str(gallery), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    confirmed = []
    try:
        _wait_healthy(url, proc)

        def enrol_forever():
            i = 0
            while True:
                req = urllib.request.Request(f"{url}/api/items?label=item{i}", data=photos[i % len(photos)],
                                             headers={"Content-Type": "image/jpeg"}, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        confirmed.append(json.loads(r.read())["id"])
                except (OSError, urllib.error.URLError):
                    return
                i += 1

        worker = threading.Thread(target=enrol_forever, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        while len(confirmed) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(confirmed) >= 5, "the service did not confirm five enrolments within a minute"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        worker.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    with Gallery.open(gallery) as g:
        assert g.check() == []
        ids = set(int(i) for i in g.ids())
    assert set(confirmed) <= ids and len(ids) - len(confirmed) <= 1


# ---------------------------------------------------------------------------------------------- the command


def test_serve_refuses_bad_setups_in_one_line(tiny_bundle, tmp_path, capsys):
    assert main(["serve", "--bundle", str(tmp_path / "nope"), "--gallery", str(tmp_path / "g.db")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err
    loose = tmp_path / "token"
    loose.write_text("x" * 40 + "\n")
    loose.chmod(0o644)
    assert main(["serve", "--bundle", str(tiny_bundle), "--gallery", str(tmp_path / "g.db"), "--host", "0.0.0.0",
                 "--token-file", str(loose)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "chmod 600" in err
    assert not (tmp_path / "g.db").exists()
    assert main(["serve", "--bundle", str(tiny_bundle), "--gallery", str(tmp_path / "g.db"), "--port", "70000"]) == 2
