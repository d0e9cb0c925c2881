"""The device commands as a user meets them: folders and globs, JSON lines, progress, help, exit codes,
flag names in errors, plugins. Fake sessions stand in for the models, so no Paddle is needed."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import FakeDetectorSession, FakeExtractorSession, run_cli as run
from edge_shitu.bundle import Bundle
from edge_shitu.cli import _parser
from edge_shitu.gallery import Gallery


@pytest.fixture
def bundle(fake_bundle, monkeypatch):
    monkeypatch.setattr("edge_shitu.embedder.create_session", lambda spec, **kw: FakeExtractorSession())
    monkeypatch.setattr("edge_shitu.detector.create_session",
                        lambda spec, **kw: FakeDetectorSession([((100, 100, 148, 148), 0.9)]))
    return fake_bundle


@pytest.fixture
def shots(tmp_path):
    """Photos in nested folders, plus files that are not images."""
    rng = np.random.default_rng(3)
    root = tmp_path / "shots"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    names = ["a/1.png", "a/deep/2.JPG", "b/3.webp", "b/4.bmp"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    return root, [str(root / n) for n in sorted(names)]


def test_folders_and_globs_expand_to_images(bundle, shots):
    root, images = shots
    code, out, err = run("embed", "--bundle", bundle, "--json", root)
    assert code == 0, err
    assert [r["image"] for r in json.loads(out)] == images
    code, out, err = run("embed", "--bundle", bundle, "--json", f"{root}/**/*.png", f"{root}/b/*")
    assert code == 0, err
    assert [r["image"] for r in json.loads(out)] == [images[0], images[2], images[3]]
    code, out, err = run("embed", "--bundle", bundle, f"{root}/*.gif")
    assert code == 2 and "no file matches this pattern" in err
    empty = root / "empty"
    empty.mkdir()
    code, out, err = run("detect", "--bundle", bundle, empty)
    assert code == 2 and "folder holds no image file" in err


@pytest.mark.parametrize("command", ["detect", "embed", "recognize"])
def test_jsonl_streams_one_record_per_image_with_the_replica_flag(bundle, shots, tmp_path, command):
    root, images = shots
    extra = []
    if command == "recognize":
        db = tmp_path / "g.db"
        Gallery.create(db, fingerprint=Bundle.load(bundle).code_fingerprint).close()
        extra = ["--gallery", db]
    bad = root / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    code, out, err = run(command, "--bundle", bundle, *extra, "--jsonl", images[0], bad, images[1])
    assert code == 2
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [images[0], str(bad), images[1]]
    assert "error" in records[1] and all(r["replica"] is True for r in (records[0], records[2]))
    # A stream, not one document: each line is a complete record.
    assert out.count("\n") == 3


def test_progress_is_a_status_line_without_a_terminal(bundle, shots):
    root, images = shots
    code, out, err = run("embed", "--bundle", bundle, root)
    assert code == 0
    assert "embedding: 4/4 (100%)" in err


def test_progress_is_a_tqdm_bar_on_a_terminal(bundle, shots):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    root, images = shots
    term = Terminal()
    code, out, _ = run("detect", "--bundle", bundle, root, stderr=term)
    assert code == 0 and "detecting: 100%" in term.getvalue() and "4/4" in term.getvalue()


def test_every_option_has_help():
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(" ".join(path + [action.dest]))

    walk(_parser(io.StringIO()), ["edge-shitu"])
    assert missing == []


def test_errors_name_the_flag_the_user_typed(bundle, shots, tmp_path):
    root, images = shots
    for argv, flag in [(["detect", "--bundle", bundle, "--max-detections", "0", images[0]], "--max-detections"),
                       (["detect", "--bundle", bundle, "--min-score", "2", images[0]], "--min-score"),
                       (["recognize", "--bundle", bundle, "--gallery", tmp_path / "g.db", "--top-k", "0", images[0]],
                        "--top-k"),
                       (["recognize", "--bundle", bundle, "--gallery", tmp_path / "g.db", "--max-distance", "-1",
                         images[0]], "--max-distance"),
                       (["gallery", "list", tmp_path / "g.db", "--limit", "-4"], "--limit")]:
        code, out, err = run(*argv)
        assert code == 2 and f"argument {flag}" in err, (argv, err)


def test_remove_of_nothing_is_an_error_whichever_way_it_is_named(tmp_path, rng):
    db = tmp_path / "g.db"
    with Gallery.create(db, fingerprint="ab") as g:
        g.add(rng.integers(0, 256, (3, 64), dtype=np.uint8), ["cola", "tea", "tea"])
    before = db.read_bytes()
    code, _, err = run("gallery", "remove", db, "--id", 99999)
    assert code == 2 and "unknown ids" in err
    code, _, err = run("gallery", "remove", db, "--label", "nosuch")
    assert code == 2 and "no item has --label 'nosuch'" in err
    assert db.read_bytes() == before
    code, out, _ = run("gallery", "remove", db, "--label", "tea")
    assert code == 0 and "removed 2 item(s)" in out


def test_help_lists_plugins_and_the_extra_of_what_is_missing(monkeypatch):
    from edge_shitu import cli

    code, out, _ = run("--help")
    for command in ("detect", "embed", "recognize", "gallery", "bundle", "convert", "models", "hash", "bench"):
        assert f"    {command}" in out
    # Without the plugins (a runtime-only install), the commands still show, with the pip command.
    monkeypatch.setattr(cli, "_plugins", lambda: [])
    code, out, _ = run("--help")
    assert code == 0 and 'convert   [not installed: pip install "edge-shitu[convert]"]' in out
    code, out, err = run("convert", "--det", "x", "--out", "y")
    assert code == 1 and 'pip install "edge-shitu[convert]"' in err


def test_a_broken_plugin_does_not_take_the_device_commands_down(monkeypatch, tmp_path, rng):
    from edge_shitu import cli

    class Broken:
        name, value = "broken", "nowhere:register"

        def load(self):
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(cli, "_plugins", lambda: [Broken()])
    db = tmp_path / "g.db"
    Gallery.create(db, fingerprint="ab").close()
    code, out, err = run("gallery", "info", db)
    assert code == 0 and "items: 0" in out and "plugin 'broken'" in err
