"""Faults and bad input against the gallery commands and the recogniser.

Each class of fault is tried at its root: a whole label file is validated before any image is read,
a command's change to a gallery is one transaction (checked with an exception in the middle, a full
disk on a small tmpfs and SIGKILL at several points), one build per output, readers that survive a
killed writer, batch commands that go on after a bad image. The models are fake sessions injected
in place of onnxruntime's, so these tests need neither Paddle nor real weights.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FakeDetectorSession, FakeExtractorSession, run_cli as run
from edge_shitu.bundle import Bundle
from edge_shitu.cli import main
from edge_shitu.errors import ClosedError, GalleryError, LabelFileError
from edge_shitu.gallery import Gallery, ItemBatch, check_gallery
from edge_shitu.labelfile import read_label_file
from edge_shitu.recognizer import Recognizer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Children run the CLI with the same fake sessions as the in-process tests.
_CHILD_PRELUDE = f"""
import os, signal, sys
sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]
from conftest import FakeDetectorSession, FakeExtractorSession
import edge_shitu.embedder, edge_shitu.detector
edge_shitu.embedder.create_session = lambda spec, **kw: FakeExtractorSession()
edge_shitu.detector.create_session = lambda spec, **kw: FakeDetectorSession([((100, 100, 148, 148), 0.9)])
"""


class _Counting(FakeExtractorSession):
    calls = 0

    def run(self, feeds, outputs=None):
        type(self).calls += 1
        return super().run(feeds, outputs)


@pytest.fixture
def bundle(fake_bundle, monkeypatch):
    """The fake bundle, with sessions that need no model files; ``_Counting.calls`` counts extractor calls."""
    _Counting.calls = 0
    monkeypatch.setattr("edge_shitu.embedder.create_session", lambda spec, **kw: _Counting())
    monkeypatch.setattr("edge_shitu.detector.create_session",
                        lambda spec, **kw: FakeDetectorSession([((100, 100, 148, 148), 0.9)]))
    return fake_bundle


@pytest.fixture
def photos(tmp_path):
    """150 small distinct photos and a label file for them (3 extractor batches of 64)."""
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(5)
    lines = []
    for i in range(150):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png\tlabel {i % 7}")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, labels, lines


def _empty_gallery(bundle_dir, path):
    Gallery.create(path, fingerprint=Bundle.load(bundle_dir).code_fingerprint).close()
    return path


def _state(path: Path):
    """What a gallery holds, to compare before and after a failed command."""
    with Gallery.open(path, readonly=True) as g:
        ids, codes = g.codes()
        return ids.tolist(), codes.tobytes(), g.label_counts()


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 320 KiB tmpfs: writes there fail with ENOSPC once it is full."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs ({proc.stderr.decode().strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("bad", ["a\x00b", "line\u2028sep", "next\u0085line", "para\u2029sep", "bell\x07"])
def test_label_file_is_validated_whole_before_any_image_is_read(bundle, photos, tmp_path, bad):
    root, labels, lines = photos
    lines = list(lines)
    lines[69] = f"69.png\t{bad}"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = _empty_gallery(bundle, tmp_path / "g.db")
    before = db.read_bytes()
    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--labels", labels, "--images-root", root)
    assert code == 2, err
    assert f"{labels}:70:" in err and err.count("\n") == 1 and "internal error" not in err
    assert _Counting.calls == 0 and db.read_bytes() == before
    code, out, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels,
                         "--out", tmp_path / "new.db")
    assert code == 2 and f"{labels}:70:" in err and _Counting.calls == 0
    assert not list(tmp_path.glob("*new.db*"))


def test_label_file_lines_end_only_at_newline(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.jpg\tcola\r\nb.jpg\ttea\n\nc.jpg\tjuice", encoding="utf-8")
    assert [(e.path, e.label, e.line) for e in read_label_file(path)] == [
        ("a.jpg", "cola", 1), ("b.jpg", "tea", 2), ("c.jpg", "juice", 4)]
    path.write_bytes(b"a.jpg\t" + b"x" * 70_000 + b"\n")
    with pytest.raises(LabelFileError, match=r"l.txt:1: line longer than 65536 bytes"):
        read_label_file(path)
    path.write_text("/etc/passwd\tx\n", encoding="utf-8")
    with pytest.raises(LabelFileError, match=r"l.txt:1: the path must be relative"):
        read_label_file(path)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    with pytest.raises(LabelFileError, match="not a regular file"):
        read_label_file(fifo)


def test_label_flag_is_checked_before_work(bundle, photos, tmp_path):
    root, _, _ = photos
    db = _empty_gallery(bundle, tmp_path / "g.db")
    code, _, err = run("gallery", "add", db, "--bundle", bundle, "--label", "tab\there", root / "0.png")
    assert code == 2 and "--label: a label must be" in err and _Counting.calls == 0


def test_gallery_add_is_one_transaction_when_a_batch_fails(bundle, photos, tmp_path, monkeypatch):
    root, labels, _ = photos
    db = _empty_gallery(bundle, tmp_path / "g.db")
    assert run("gallery", "add", db, "--bundle", bundle, "--label", "seed", root / "0.png")[0] == 0
    before = _state(db)

    def third_call_fails(self, feeds, outputs=None):
        type(self).calls += 1
        if type(self).calls == 3:
            raise OSError(28, "No space left on device")
        return FakeExtractorSession.run(self, feeds, outputs)

    monkeypatch.setattr(_Counting, "run", third_call_fails)
    _Counting.calls = 0
    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--labels", labels, "--images-root", root)
    assert code == 1 and "No space left on device" in err and "internal error" not in err
    assert _Counting.calls == 3 and _state(db) == before and check_gallery(db) == []


def test_gallery_add_commits_everything_once(bundle, photos, tmp_path):
    root, labels, lines = photos
    db = _empty_gallery(bundle, tmp_path / "g.db")
    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--labels", labels, "--images-root", root,
                         "--keep-embeddings")
    assert code == 0 and "added 150 item(s) (ids 0-149)" in out, err
    with Gallery.open(db) as g:
        assert len(g) == 150 and g.check() == []
        assert g.labels_of([0, 69, 149]) == ["label 0", "label 6", "label 2"]
        assert g.info().embedding_fingerprint == Bundle.load(bundle).embedding_fingerprint


def test_add_batches_discards_everything_on_any_failure(rng):
    codes = rng.integers(0, 256, (10, 64), dtype=np.uint8)

    def batches(fail_at):
        for j in range(5):
            if j == fail_at:
                raise RuntimeError("the source broke")
            yield ItemBatch(codes[2 * j:2 * j + 2], [f"l{j}", f"l{j}"])

    with Gallery.create(":memory:", fingerprint="ab") as g:
        with pytest.raises(RuntimeError, match="the source broke"):
            g.add_batches(batches(3))
        assert len(g) == 0 and g.label_counts() == {}
        bad = [ItemBatch(codes[:2], ["a", "b"]), ItemBatch(codes[2:4], ["c", "bad\nlabel"])]
        with pytest.raises(ValueError, match=r"batch 1: labels\[1\]"):
            g.add_batches(bad)
        assert len(g) == 0
        ids = g.add_batches(batches(None))
        assert ids.tolist() == list(range(10)) and g.check() == []
        assert g.search(codes, k=1).ids[:, 0].tolist() == list(range(10))
        # No staging table is left behind on the connection.
        assert g._conn.execute("SELECT count(*) FROM temp.sqlite_master WHERE name LIKE 'staged%'").fetchone()[0] == 0


def test_gallery_add_on_a_full_disk_changes_nothing(bundle, photos, small_disk):
    root, labels, _ = photos
    db = small_disk / "g.db"
    _empty_gallery(bundle, db)
    assert run("gallery", "add", db, "--bundle", bundle, "--label", "seed", root / "0.png")[0] == 0
    before = _state(db)
    # 150 items with 2 KB embeddings each do not fit in what is left of 320 KiB.
    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--labels", labels, "--images-root", root,
                         "--keep-embeddings")
    assert code != 0 and "full" in err and "nothing was changed" in err, err
    assert len([line for line in err.splitlines() if line.startswith("edge-shitu:")]) == 1, err
    assert _state(db) == before and check_gallery(db) == []


@pytest.mark.parametrize("where", ["embedding", "commit"])
def test_sigkill_during_gallery_add_leaves_it_before_or_after(bundle, photos, tmp_path, where):
    root, labels, _ = photos
    db = _empty_gallery(bundle, tmp_path / "g.db")
    assert run("gallery", "add", db, "--bundle", bundle, "--label", "seed", root / "0.png")[0] == 0
    before = _state(db)
    kill = {
        # In the middle of the run: the third extractor call.
        "embedding": "FakeExtractorSession.run = (lambda run: lambda self, *a, **k: "
                     "(os.kill(os.getpid(), signal.SIGKILL) if len(self.batches) == 2 else run(self, *a, **k)))"
                     "(FakeExtractorSession.run)",
        # Inside the final transaction, after the items were copied in.
        "commit": "import edge_shitu.gallery as G; G._bump_counts = lambda *a: os.kill(os.getpid(), signal.SIGKILL)",
    }[where]
    script = _CHILD_PRELUDE + kill + "\nfrom edge_shitu.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run([sys.executable, "-c", script, "gallery", "add", str(db), "--bundle", str(bundle),
                           "--labels", str(labels), "--images-root", str(root), "--keep-embeddings"],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert check_gallery(db) == []
    assert _state(db) == before
    # Running it again adds every item exactly once.
    code, out, err = run("gallery", "add", db, "--bundle", bundle, "--labels", labels, "--images-root", root)
    assert code == 0 and "added 150 item(s)" in out, err
    with Gallery.open(db, readonly=True) as g:
        assert len(g) == 151 and sum(g.label_counts().values()) == 151


def test_build_checks_its_output_before_any_work(bundle, photos, tmp_path):
    root, labels, _ = photos
    for out, extra, message in [
        (tmp_path, ["--overwrite"], "is a directory"),
        (tmp_path / "nope" / "g.db", [], "does not exist"),
    ]:
        code, _, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels,
                           "--out", out, *extra)
        assert code == 2 and message in err and _Counting.calls == 0, err


def test_one_build_per_output_and_stale_partials_removed(bundle, photos, tmp_path):
    from edge_shitu.enrol import _exclusive_output

    root, labels, _ = photos
    out = tmp_path / "g.db"
    stale = tmp_path / ".g.db.0123.partial"
    stale.write_bytes(b"left by a killed build")
    (tmp_path / ".g.db.0123.partial-journal").write_bytes(b"x")
    with _exclusive_output(out):
        code, _, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels,
                           "--out", out)
        assert code == 2 and "another `gallery build` is writing it" in err and not out.exists()
    assert _Counting.calls == 0
    code, _, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".g.db")) == []
    assert check_gallery(out) == []


def test_build_on_a_full_disk_leaves_no_partial(bundle, photos, small_disk):
    root, labels, _ = photos
    out = small_disk / "g.db"
    code, _, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels, "--out", out,
                       "--keep-embeddings")
    errors = [line for line in err.splitlines() if line.startswith("edge-shitu:")]
    assert code != 0 and len(errors) == 1 and f"{out}: not built, nothing was written" in errors[0], err
    assert "full" in errors[0] and list(small_disk.iterdir()) == []


_KILLED_WRITER = """
import os, signal, sys
sys.path[:0] = [{repo!r}]
import edge_shitu.gallery as G
g = G.Gallery.open(sys.argv[1])
g._conn.execute("PRAGMA cache_size=8")  # spill to the file early: the file is then really half-written
G._bump_counts = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
g.remove(g.ids()[::2])
"""


def test_open_reader_survives_a_killed_writer(bundle, tmp_path, rng):
    db = tmp_path / "g.db"
    codes = rng.integers(0, 256, (3000, 64), dtype=np.uint8)
    fp = Bundle.load(bundle).code_fingerprint
    with Gallery.create(db, fingerprint=fp) as g:
        g.add(codes, [f"label {i % 50}" for i in range(3000)])
    image = np.asarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    with Recognizer.from_bundle(bundle, db) as rec:
        expected = rec.recognize(image)
        before = rec.gallery.search(codes[:5], k=3)
        proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(repo=str(REPO)), str(db)],
                              capture_output=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        assert Path(str(db) + "-journal").exists()
        # The half-written file cannot be read through a read-only connection: the reader keeps
        # serving its last whole state, every time.
        for _ in range(3):
            again = rec.recognize(image)
            assert [(r.label, r.distance) for r in again.recognitions] == \
                [(r.label, r.distance) for r in expected.recognitions]
            result = rec.gallery.search(codes[:5], k=3)
            np.testing.assert_array_equal(result.ids, before.ids)
        assert rec.gallery.stale is not None and len(rec.gallery) == 3000
        # A writable opening rolls the journal back; the reader finds the file whole again.
        with Gallery.open(db) as w:
            assert len(w) == 3000
        rec.recognize(image)
        assert rec.gallery.stale is None and len(rec.gallery) == 3000
    assert check_gallery(db) == []


def test_recognize_detect_embed_go_on_after_a_bad_image(bundle, tmp_path, rng):
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for p in good:
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(p)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    images = [good[0], bad, tmp_path / "missing.png", good[1]]
    db = _empty_gallery(bundle, tmp_path / "g.db")
    run("gallery", "add", db, "--bundle", bundle, "--label", "thing", good[0])
    for command in (["recognize", "--gallery", db], ["detect"], ["embed"]):
        code, out, err = run(*command, "--bundle", bundle, "--json", *images)
        assert code == 2, (command, err)
        records = json.loads(out)
        assert [r["image"] for r in records] == list(map(str, images))
        assert "error" not in records[0] and "error" not in records[3]
        assert "b.jpg" in records[1]["error"] and "missing.png" in records[2]["error"]
        assert "2 of 4 image(s) failed" in err and "internal error" not in err
        assert err.count("b.jpg") == 1 and err.count("missing.png") == 1


def test_broken_pipe_is_quiet(bundle, tmp_path, rng):
    db = _empty_gallery(bundle, tmp_path / "g.db")
    with Gallery.open(db) as g:
        g.add(rng.integers(0, 256, (50, 64), dtype=np.uint8), ["x"] * 50)

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    code = main(["gallery", "list", str(db)], stdout=ClosedPipe(), stderr=err)
    assert code == 0 and err.getvalue() == ""


def test_closed_objects_raise_our_error(bundle, tmp_path):
    db = _empty_gallery(bundle, tmp_path / "g.db")
    image = np.zeros((64, 64, 3), np.uint8)
    rec = Recognizer.from_bundle(bundle, db)
    rec.close()
    rec.close()
    with pytest.raises(ClosedError, match="recognizer is closed"):
        rec.recognize(image)
    with pytest.raises(ClosedError, match="detector is closed"):
        rec.detector.detect(image)
    with pytest.raises(ClosedError, match="embedder is closed"):
        rec.embedder.embed([image])
    with pytest.raises(GalleryError, match="closed"):
        rec.gallery.search(np.zeros((1, 64), np.uint8))


@pytest.mark.parametrize("value", ["100000", "0", "-3", "two"])
def test_thread_counts_are_bounded_by_the_machine(bundle, tmp_path, value):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code, out, err = run("embed", "--bundle", bundle, "--threads", value, image)
    assert code == 2 and "argument --threads" in err and "internal error" not in err
    assert _Counting.calls == 0
    if value != "two":
        assert f"this machine has {os.cpu_count()} CPU cores" in err


def test_pixel_limit_is_the_users(bundle, tmp_path, rng):
    image = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(image)
    db = _empty_gallery(bundle, tmp_path / "g.db")
    for command in (["recognize", "--gallery", db], ["detect"], ["embed"], ["gallery", "add", db, "--label", "x"]):
        code, out, err = run(*command, "--bundle", bundle, "--max-pixels", "10000", image)
        assert code == 2 and "big.png" in err and "12000" in err and "10000" in err, (command, err)
        code, out, err = run(*command, "--bundle", bundle, "--max-pixels", "12e3", image)
        assert code == 0, (command, err)
    code, out, err = run("embed", "--bundle", bundle, "--max-pixels", "-5", image)
    assert code == 2 and "argument --max-pixels" in err


def test_broken_pipe_through_a_real_pipe(tmp_path, rng):
    db = tmp_path / "g.db"
    with Gallery.create(db, fingerprint="ab") as g:
        g.add(rng.integers(0, 256, (20000, 64), dtype=np.uint8), [f"label {i}" for i in range(20000)])
    proc = subprocess.run(f"{sys.executable} -m edge_shitu.cli gallery list {db} | head -n 1",
                          shell=True, capture_output=True, cwd=REPO, timeout=120)
    assert proc.stdout.decode().startswith("0\tlabel 0")
    assert proc.stderr.decode() == ""


def test_build_skips_what_cannot_be_read_and_goes_on(bundle, photos, tmp_path):
    root, labels, lines = photos
    os.mkfifo(root / "fifo.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "dir.png").mkdir()
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    extra = ["fifo.png\tx", "loop.png\tx", "dir.png\tx", "dangling.png\tx", "null.png\tx"]
    (root / "null.png").symlink_to("/dev/null")
    labels.write_text("\n".join(lines[:10] + extra) + "\n", encoding="utf-8")
    out = tmp_path / "g.db"
    code, stdout, err = run("gallery", "build", "--bundle", bundle, "--images", root, "--labels", labels, "--out", out)
    assert code == 0 and "10 image(s) added, 5 skipped" in stdout, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 5 and "internal error" not in err
    for name, reason in [("fifo.png", "a FIFO"), ("loop.png", "symbolic links"), ("dir.png", "is a directory"),
                         ("dangling.png", "symbolic link to nothing"), ("null.png", "a character device")]:
        assert any(name in line and reason in line for line in skipped), (name, skipped)
