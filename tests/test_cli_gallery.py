"""Gallery maintenance commands (check, upgrade) run in-process on galleries made with the API."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from edge_shitu.gallery import Gallery

from conftest import run_cli as run

FP = "0123abcd"


def _gallery(path, rng, n=40):
    with Gallery.create(path, fingerprint=FP) as g:
        g.add(rng.integers(0, 256, (n, 64), dtype=np.uint8), [f"l{i % 4}" for i in range(n)])


def test_check_healthy_and_damaged(tmp_path, rng):
    path = tmp_path / "g.db"
    _gallery(path, rng)
    code, out, err = run("gallery", "check", path)
    assert code == 0 and "ok (40 items, 4 labels, 512-bit codes, fingerprint 0123abcd)" in out, err
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE items SET code = x'00' WHERE id = 3")
        conn.execute("UPDATE labels SET count = 99 WHERE label = 'l1'")
    code, out, err = run("gallery", "check", path, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert any("not 64-byte blobs" in p for p in report["problems"])
    assert any("item counts" in p for p in report["problems"])


def test_check_of_a_foreign_file_is_one_line(tmp_path):
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes(x)")
    code, out, err = run("gallery", "check", path)
    assert code == 1 and "1 problem(s)" in out and "notes.db: not an edge-shitu gallery" in out


def test_check_missing_file(tmp_path):
    code, _, err = run("gallery", "check", tmp_path / "nope.db")
    assert code == 2 and "gallery file not found" in err and "nope.db" in err


def test_upgrade_command(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, label TEXT NOT NULL, code BLOB NOT NULL, "
                     "embedding BLOB NULL, source TEXT NULL, added_at REAL)")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("format_version", "1"), ("bits", "512"), ("bit_order", "big"), ("metric", "hamming"),
            ("fingerprint", FP), ("created_by", "edge-shitu 0.0.9"), ("next_id", "2")])
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, NULL, NULL, NULL)",
                         [(0, "cola", bytes(64)), (1, "tea", bytes([255] * 64))])
    code, out, err = run("gallery", "info", path)
    assert code == 2 and "edge-shitu gallery upgrade" in err
    code, out, err = run("gallery", "upgrade", path)
    assert code == 0 and "upgraded to format 2" in out and "old.db.v1.bak" in out, err
    code, out, err = run("gallery", "check", path)
    assert code == 0 and "ok (2 items, 2 labels" in out
