"""Tests of item thumbnails (edge_shitu.thumbnail and their storage in galleries) and of the persisted
detector threshold."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_shitu.cli import main
from edge_shitu.errors import (
    GalleryCorruptError,
    GalleryError,
    InvalidDtypeError,
    InvalidInputError,
    UnknownItemError,
)
from edge_shitu.gallery import Gallery, GalleryItem, ItemBatch, check_gallery
from edge_shitu.image import load_image
from edge_shitu.thumbnail import JPEG_MAGIC, MAX_THUMBNAIL_BYTES, make_thumbnail

FP = "0123abcd"


def _codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 64), dtype=np.uint8)


def _picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth synthetic RGB picture (gradients plus a little noise), uint8 (height, width, 3)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _size(jpeg: bytes) -> tuple:
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return im.size


def _jpeg(rng: np.random.Generator, width: int = 40, height: int = 30) -> bytes:
    return make_thumbnail(_picture(rng, height, width))


def _raw(path: Path):
    return closing(sqlite3.connect(path, isolation_level=None))


def _tables(path: Path) -> set:
    with _raw(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _thumbnail_rows(path: Path) -> list:
    with _raw(path) as conn:
        return [r[0] for r in conn.execute("SELECT item_id FROM thumbnails ORDER BY item_id")]


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(map(str, argv)), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def gallery_path(tmp_path: Path) -> Path:
    return tmp_path / "drinks.gallery"


@pytest.fixture
def plain(gallery_path: Path, rng) -> Path:
    """A closed gallery of 6 items (ids 0..5, labels a/b) without any thumbnail: no thumbnails table."""
    with Gallery.create(gallery_path, fingerprint=FP) as g:
        g.add(_codes(rng, 6), ["a", "b", "a", "b", "a", "b"])
    return gallery_path


class TestMakeThumbnail:
    def test_longer_side_is_scaled_to_size_keeping_aspect(self, rng):
        assert _size(make_thumbnail(_picture(rng, 200, 300))) == (160, 107)
        assert _size(make_thumbnail(_picture(rng, 300, 200))) == (107, 160)
        assert _size(make_thumbnail(_picture(rng, 480, 640), size=64)) == (64, 48)
        assert _size(make_thumbnail(_picture(rng, 1000, 10))) == (2, 160)

    def test_never_upscales(self, rng):
        assert _size(make_thumbnail(_picture(rng, 50, 100))) == (100, 50)
        assert _size(make_thumbnail(_picture(rng, 1, 1))) == (1, 1)

    def test_box_is_cropped_clipped_and_may_be_fractional(self, rng):
        img = _picture(rng, 100, 120)
        # floor(10.5)..ceil(90.7) x floor(20.2)..ceil(60.1), as edge_shitu.image.crop cuts it
        assert _size(make_thumbnail(img, (10.5, 20.2, 90.7, 60.1))) == (81, 41)
        assert _size(make_thumbnail(img, (-50, -50, 60, 400))) == (60, 100)
        assert _size(make_thumbnail(img, np.array([0, 0, 119.5, 99.5], np.float32))) == (120, 100)
        # the crop, not the whole image, is what is encoded
        red = np.zeros((100, 120, 3), np.uint8)
        red[:50, :60] = (255, 0, 0)
        with Image.open(io.BytesIO(make_thumbnail(red, (0, 0, 60, 50)))) as im:
            assert np.abs(np.asarray(im).astype(int) - (255, 0, 0)).max() < 10

    def test_baseline_jpeg_deterministic_and_without_metadata(self, rng):
        img = _picture(rng, 120, 90)
        jpeg = make_thumbnail(img)
        assert jpeg.startswith(JPEG_MAGIC) and jpeg == make_thumbnail(img.copy())
        assert b"\xff\xc0" in jpeg and b"\xff\xc2" not in jpeg  # SOF0 (baseline), no SOF2 (progressive)
        assert b"Exif" not in jpeg
        assert len(make_thumbnail(img, quality=30)) < len(make_thumbnail(img, quality=95))

    def test_a_real_photo_at_640x480_takes_under_16_kb(self, test_images):
        photo = load_image(test_images[0])
        photo = np.asarray(Image.fromarray(photo).resize((640, 480), Image.Resampling.BILINEAR))
        jpeg = make_thumbnail(photo)
        assert _size(jpeg) == (160, 120) and jpeg.startswith(JPEG_MAGIC)
        assert 1000 < len(jpeg) < 16 * 1024

    def test_bad_input_is_refused(self, rng):
        img = _picture(rng, 20, 20)
        with pytest.raises(InvalidDtypeError, match="uint8"):
            make_thumbnail(img.astype(np.float32))
        with pytest.raises(InvalidInputError, match=r"\(H, W, 3\), got \(20, 20\)"):
            make_thumbnail(img[:, :, 0])
        with pytest.raises(InvalidInputError, match=r"\(H, W, 3\), got \(20, 20, 4\)"):
            make_thumbnail(np.zeros((20, 20, 4), np.uint8))
        with pytest.raises(InvalidInputError, match="expected a uint8"):
            make_thumbnail(img.tolist())
        with pytest.raises(InvalidInputError, match="outside"):
            make_thumbnail(img, (30, 30, 40, 40))
        with pytest.raises(InvalidInputError, match="x1 <= x2"):
            make_thumbnail(img, (10, 0, 5, 5))
        for size in (0, -1, 1.5, True):
            with pytest.raises(InvalidInputError, match="size must be an integer >= 1"):
                make_thumbnail(img, size=size)
        for quality in (0, 96, 80.0):
            with pytest.raises(InvalidInputError, match=r"quality must be an integer in \[1, 95\]"):
                make_thumbnail(img, quality=quality)

    def test_a_thumbnail_over_the_budget_is_refused(self, rng):
        noise = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
        with pytest.raises(InvalidInputError, match=f"more than the {MAX_THUMBNAIL_BYTES} a gallery accepts"):
            make_thumbnail(noise, size=400, quality=95)


class TestGalleryThumbnails:
    def test_add_round_trip(self, gallery_path, rng):
        t0, t2 = _jpeg(rng), _jpeg(rng, 30, 40)
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add(_codes(rng, 3), ["a", "b", "a"], thumbnails=[t0, None, t2])
            assert g.thumbnail(ids[0]) == t0 and g.thumbnail(int(ids[1])) is None and g.thumbnail(ids[2]) == t2
            assert [it.has_thumbnail for it in g.items()] == [True, False, True]
            assert g.info().thumbnail_count == 2
        with Gallery.open(gallery_path, readonly=True) as g:
            assert g.thumbnail(0) == t0 and g.thumbnail(2) == t2 and g.thumbnail(1) is None
            assert [it.has_thumbnail for it in g.items(label="a")] == [True, True]
            assert g.check() == []
        assert check_gallery(gallery_path) == []

    def test_add_batches_round_trip(self, gallery_path, rng):
        thumbs = [_jpeg(rng) for _ in range(4)]
        batches = [ItemBatch(_codes(rng, 2), ["a", "b"], thumbnails=thumbs[:2]),
                   ItemBatch(_codes(rng, 2), ["c", "d"]),
                   ItemBatch(_codes(rng, 2), ["e", "f"], thumbnails=[None, thumbs[3]])]
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add_batches(batches)
            assert ids.tolist() == list(range(6))
            assert [g.thumbnail(i) for i in ids] == [thumbs[0], thumbs[1], None, None, None, thumbs[3]]
            assert g.check() == []
        assert _thumbnail_rows(gallery_path) == [0, 1, 5]

    def test_batches_without_thumbnails_create_no_table(self, plain, rng):
        with Gallery.open(plain) as g:
            g.add_batches([ItemBatch(_codes(rng, 2), ["a", "b"], thumbnails=[None, None])])
        assert "thumbnails" not in _tables(plain)

    def test_unknown_id(self, plain, rng):
        with Gallery.open(plain) as g:
            for op in (lambda: g.thumbnail(6), lambda: g.remove([6]), lambda: g.relabel([99], "x"),
                       lambda: g.embeddings([42])):
                with pytest.raises(UnknownItemError, match="unknown id") as info:
                    op()
                assert isinstance(info.value, GalleryError) and isinstance(info.value, KeyError)
                assert not str(info.value).startswith("'")
            with pytest.raises(InvalidDtypeError, match="item_id must be an integer"):
                g.thumbnail("1")
            with pytest.raises(InvalidDtypeError, match="item_id must be an integer"):
                g.thumbnail(True)
            with pytest.raises(InvalidInputError, match="item_id must be in"):
                g.thumbnail(-1)

    @pytest.mark.parametrize("thumbnails,match", [
        (["not bytes", None], r"thumbnails\[0\] must be JPEG bytes or None, got str"),
        ([None, b"\x89PNG\r\n\x1a\n"], r"thumbnails\[1\] must be a JPEG .*89 50 4E"),
        ([b"", None], r"starting with nothing"),
        ([bytearray(b"\xff\xd8\xff\xe0"), None], "got bytearray"),
        ([JPEG_MAGIC + bytes(MAX_THUMBNAIL_BYTES), None], f"at most {MAX_THUMBNAIL_BYTES} bytes"),
        ([None], r"one entry per code \(2\), got 1"),
        (b"\xff\xd8\xff\xe0", "sequence with one entry per code"),
    ], ids=["str", "png", "empty", "bytearray", "too-large", "too-few", "bare-bytes"])
    def test_a_bad_thumbnail_is_refused_and_nothing_is_written(self, plain, rng, thumbnails, match):
        before = plain.read_bytes()
        with Gallery.open(plain) as g:
            with pytest.raises(InvalidInputError, match=match):
                g.add(_codes(rng, 2), ["a", "b"], thumbnails=thumbnails)
            with pytest.raises(InvalidInputError, match=match):
                g.add_batches([ItemBatch(_codes(rng, 2), ["c", "d"], thumbnails=[_jpeg(rng), _jpeg(rng)]),
                               ItemBatch(_codes(rng, 2), ["a", "b"], thumbnails=thumbnails)])
            assert len(g) == 6
        assert plain.read_bytes() == before and "thumbnails" not in _tables(plain)

    def test_remove_and_remove_label_delete_thumbnails(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            ids = g.add(_codes(rng, 6), ["a", "b", "a", "b", "a", "b"], thumbnails=[_jpeg(rng) for _ in range(6)])
            assert g.remove([ids[0], ids[1]]) == 2
            assert _thumbnail_rows(gallery_path) == [2, 3, 4, 5]
            assert g.remove_label("a") == 2
            assert _thumbnail_rows(gallery_path) == [3, 5]
            assert g.info().thumbnail_count == 2 and g.check() == []
            # ids of removed items can be given again: they come back without the old thumbnail
            g.add(_codes(rng, 1), ["c"], ids=[0])
            assert g.thumbnail(0) is None
        assert check_gallery(gallery_path) == []

    def test_check_reports_orphan_and_non_jpeg_thumbnails(self, gallery_path, rng):
        with Gallery.create(gallery_path, fingerprint=FP) as g:
            g.add(_codes(rng, 2), ["a", "b"], thumbnails=[_jpeg(rng), _jpeg(rng)])
        with _raw(gallery_path) as conn:
            conn.execute("INSERT INTO thumbnails(item_id, jpeg) VALUES (77, ?)", (_jpeg(rng),))
            conn.execute("UPDATE thumbnails SET jpeg = ? WHERE item_id = 1", (b"GIF89a",))
        problems = check_gallery(gallery_path)
        assert any("1 thumbnails belong to no item (item ids [77]" in p for p in problems), problems
        assert any("1 thumbnails are not JPEG blobs (item ids [1]" in p for p in problems), problems
        with Gallery.open(gallery_path) as g:
            assert len(g.check()) == 2
            with pytest.raises(GalleryCorruptError, match="thumbnail of item 1 is not a JPEG"):
                g.thumbnail(1)
            # an orphan row never becomes the thumbnail of a new item with its id
            g.add(_codes(rng, 1), ["c"], ids=[77])
            assert g.thumbnail(77) is None
        code, out, _ = run("gallery", "check", gallery_path)
        assert code == 1 and "not JPEG blobs" in out

    def test_wrong_thumbnail_columns_are_reported(self, plain):
        with _raw(plain) as conn:
            conn.execute("CREATE TABLE thumbnails(item_id INTEGER PRIMARY KEY, data BLOB)")
        with pytest.raises(GalleryCorruptError, match=r"thumbnails table lacks the column\(s\) \['jpeg'\]"):
            Gallery.open(plain)

    def test_a_gallery_without_the_table_works_and_gains_it_on_first_write(self, plain, rng):
        assert "thumbnails" not in _tables(plain)
        with Gallery.open(plain, readonly=True) as reader:
            assert reader.thumbnail(0) is None
            assert [it.has_thumbnail for it in reader.items()] == [False] * 6
            assert reader.info().thumbnail_count == 0 and reader.check() == []
            with Gallery.open(plain) as writer:
                writer.remove([5])
                writer.remove_label("b")
                assert "thumbnails" not in _tables(plain)
                jpeg = _jpeg(rng)
                (new,) = writer.add(_codes(rng, 1), ["c"], thumbnails=[jpeg])
            assert "thumbnails" in _tables(plain)
            # the already-open reader sees the new table and item
            assert reader.thumbnail(new) == jpeg and reader.thumbnail(0) is None
            assert [it.has_thumbnail for it in reader.items()] == [False, False, False, True]
        assert check_gallery(plain) == []

    def test_item_defaults_and_count(self, plain, rng):
        assert GalleryItem(id=1, label="a", source=None, added_at=None, has_embedding=False,
                           code=b"").has_thumbnail is False
        with Gallery.open(plain) as g:
            assert g.count() == 6 and g.count("a") == 3 and g.count(label="zzz") == 0
            g.remove_label("b")
            assert g.count() == 3 and g.count("b") == 0
            with pytest.raises(InvalidInputError, match="label must be a str or None"):
                g.count(3)


class TestDetThreshold:
    def test_set_reset_persist(self, plain):
        with Gallery.open(plain) as g:
            assert g.det_threshold is None and g.info().det_threshold is None
            g.set_det_threshold(0.35)
            assert g.det_threshold == 0.35 and g.info().det_threshold == 0.35
        with Gallery.open(plain, readonly=True) as g:
            assert g.det_threshold == 0.35 and g.max_distance is None
        with Gallery.open(plain) as g:
            g.set_det_threshold(np.float32(0.25))
            assert g.det_threshold == pytest.approx(0.25) and isinstance(g.det_threshold, float)
            g.set_det_threshold(1)
            assert g.det_threshold == 1.0
            g.set_det_threshold(None)
            assert g.det_threshold is None
        with Gallery.open(plain) as g:
            assert g.det_threshold is None
        with _raw(plain) as conn:
            assert conn.execute("SELECT count(*) FROM meta WHERE key = 'det_threshold'").fetchone()[0] == 0

    def test_an_open_reader_sees_another_connections_change(self, plain):
        with Gallery.open(plain, readonly=True) as reader, Gallery.open(plain) as writer:
            assert reader.det_threshold is None
            writer.set_det_threshold(0.5)
            assert reader.det_threshold == 0.5 and reader.info().det_threshold == 0.5
            writer.set_det_threshold(None)
            assert reader.det_threshold is None
            with pytest.raises(GalleryError, match="read-only"):
                reader.set_det_threshold(0.1)

    @pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf"), True, "0.5", 10 ** 400],
                             ids=["1.5", "-0.1", "nan", "inf", "True", "str", "huge-int"])
    def test_bad_values_are_refused(self, plain, value):
        before = plain.read_bytes()
        with Gallery.open(plain) as g:
            with pytest.raises(InvalidInputError, match=r"det_threshold must be a number in \[0, 1\] or None"):
                g.set_det_threshold(value)
        assert plain.read_bytes() == before

    @pytest.mark.parametrize("stored", ["abc", "1.5", "-0.01", "nan", ""])
    def test_a_corrupt_stored_value(self, plain, stored):
        with _raw(plain) as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('det_threshold', ?)", (stored,))
        with pytest.raises(GalleryCorruptError, match="meta 'det_threshold' must be a number in"):
            Gallery.open(plain)
        assert any("det_threshold" in p for p in check_gallery(plain))

    def test_gallery_info_shows_it_when_set(self, plain):
        code, out, _ = run("gallery", "info", plain)
        assert code == 0 and "det_threshold" not in out and "thumbnails: 0" in out
        with Gallery.open(plain) as g:
            g.set_det_threshold(0.4)
        code, out, _ = run("gallery", "info", plain)
        assert code == 0 and "det_threshold: 0.4\n" in out
        code, out, _ = run("gallery", "info", plain, "--json")
        assert json.loads(out)["det_threshold"] == 0.4


def test_gallery_build_and_add_with_thumbnails(tiny_bundle, test_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in test_images[:4]:
        shutil.copy(p, images / p.name)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{p.name}\tl{i % 2}\n" for i, p in enumerate(test_images[:4])) + "broken.jpg\tx\n",
                      encoding="utf-8")
    db = tmp_path / "g.db"
    code, out, err = run("gallery", "build", "--bundle", tiny_bundle, "--images", images, "--labels", labels,
                         "--out", db, "--thumbnails")
    assert code == 0 and "4 image(s) added, 1 skipped" in out, err
    with Gallery.open(db, readonly=True) as g:
        items = g.items()
        assert len(items) == 4 and all(it.has_thumbnail for it in items)
        for it, path in zip(items, test_images[:4]):
            jpeg = g.thumbnail(it.id)
            assert jpeg.startswith(JPEG_MAGIC) and len(jpeg) < 16 * 1024
            h, w = load_image(path).shape[:2]
            assert max(_size(jpeg)) == min(160, max(h, w))
    code, out, err = run("gallery", "check", db)
    assert code == 0 and "ok (4 items" in out, err
    code, out, _ = run("gallery", "info", db, "--json")
    assert json.loads(out)["thumbnails"] == 4

    code, out, err = run("gallery", "add", db, "--bundle", tiny_bundle, "--label", "shelf", "--thumbnails",
                         images / test_images[0].name)
    assert code == 0 and "added 1 item(s)" in out, err
    code, out, err = run("gallery", "add", db, "--bundle", tiny_bundle, "--label", "bare",
                         images / test_images[1].name)
    assert code == 0, err
    with Gallery.open(db, readonly=True) as g:
        assert [it.has_thumbnail for it in g.items()] == [True] * 5 + [False]
    assert run("gallery", "check", db)[0] == 0

    plain = tmp_path / "plain.db"
    code, _, err = run("gallery", "build", "--bundle", tiny_bundle, "--images", images, "--labels", labels,
                       "--out", plain)
    assert code == 0, err
    assert "thumbnails" not in _tables(plain)
