"""The comparison half of bench/arm/parity.py (pure functions; the emulated run itself is bench/arm/run)."""

from __future__ import annotations

import copy
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edge_shitu_bench.arm import parity
from edge_shitu_bench.arm.parity import (
    BOX_TOL_PX,
    FORMAT,
    FORMAT_VERSION,
    box_diff,
    compare_image,
    compare_runs,
    format_report,
    hamming_hex,
    main,
    pair_boxes,
)

CODE = "0f" * 64


def _record(name="a.jpg", boxes=((10.0, 20.0, 110.0, 220.0), (5.0, 5.0, 50.0, 60.0)), code=CODE, search=True):
    rec = {
        "image": name,
        "boxes": [list(b) for b in boxes],
        "scores": [0.9 - 0.1 * i for i in range(len(boxes))],
        "code": code,
        "crop_code": code if boxes else None,
        "detect_ms": 200.0,
        "embed_ms": 40.0,
    }
    if search:
        rec.update(search_ms=0.3, matches=[[[3, 10], [7, 12]], [[7, 9]]], labels={"3": "cola", "7": "tea"})
    return rec


def _run(records, machine="x86_64", emulated=False):
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "meta": {"machine": machine, "emulated": emulated, "python": "3.11", "versions": {}, "cpus": 2,
                     "threads": 1, "workers": 1, "startup_ms": 100.0},
            "images": records}


def _oracle_pairing(ref, other):
    """Smallest achievable worst coordinate difference, by brute force."""
    return min(max(box_diff(ref[i], other[p[i]]) for i in range(len(ref)))
               for p in itertools.permutations(range(len(other))))


class TestPairing:
    def test_box_diff_is_the_largest_coordinate_difference(self):
        assert box_diff((0, 0, 10, 10), (0.25, -0.5, 10, 10.125)) == 0.5

    def test_identity_keeps_order(self):
        boxes = [(0, 0, 1, 1), (2, 2, 3, 3), (4, 4, 5, 5)]
        assert pair_boxes(boxes, boxes) == ([0, 1, 2], 0.0)

    def test_swapped_near_equal_scores_are_paired_back(self):
        a = [(0, 0, 10, 10), (100, 100, 150, 150), (30, 30, 60, 60)]
        b = [a[1], a[0], (30.1, 30, 60, 60.2)]
        perm, worst = pair_boxes(a, b)
        assert perm == [1, 0, 2]
        assert worst == pytest.approx(0.2)

    def test_empty(self):
        assert pair_boxes([], []) == ([], 0.0)

    def test_lengths_must_match(self):
        with pytest.raises(ValueError, match="cannot pair 1 boxes with 0"):
            pair_boxes([(0, 0, 1, 1)], [])

    @pytest.mark.parametrize("seed", range(5))
    def test_matches_brute_force_oracle(self, seed):
        import numpy as np

        rng = np.random.default_rng(seed)
        ref = rng.uniform(0, 100, (5, 4)).tolist()
        other = (np.array(ref)[rng.permutation(5)] + rng.normal(0, 0.3, (5, 4))).tolist()
        perm, worst = pair_boxes(ref, other)
        assert sorted(perm) == list(range(5))
        assert worst == pytest.approx(max(box_diff(ref[i], other[perm[i]]) for i in range(5)))
        assert worst == pytest.approx(_oracle_pairing(ref, other))

    def test_greedy_beyond_the_exact_limit(self):
        ref = [(10.0 * i, 0, 10.0 * i + 5, 5) for i in range(parity._EXACT_PAIRING_MAX + 2)]
        other = list(reversed(ref))
        perm, worst = pair_boxes(ref, other)
        assert worst == 0.0
        assert perm == list(reversed(range(len(ref))))


class TestHamming:
    def test_counts_differing_bits(self):
        assert hamming_hex("00ff", "01fe") == 2
        assert hamming_hex(CODE, CODE) == 0

    def test_lengths_must_match(self):
        with pytest.raises(ValueError, match="different lengths: 4 and 2"):
            hamming_hex("00ff", "00")


class TestCompareImage:
    def test_identical_records_pass(self):
        c = compare_image(_record(), _record())
        assert c.ok and c.max_box_diff == 0.0 and c.code_bits == 0 and c.crop_bits == 0 and c.matches_equal

    def test_sub_tolerance_box_difference_passes(self):
        other = _record()
        other["boxes"][0][2] += BOX_TOL_PX * 0.9
        c = compare_image(_record(), other)
        assert c.ok
        assert c.max_box_diff == pytest.approx(BOX_TOL_PX * 0.9)

    def test_box_beyond_tolerance_fails(self):
        other = _record()
        other["boxes"][1][0] += 0.51
        c = compare_image(_record(), other)
        assert not c.ok
        assert any("boxes differ by up to 0.510 px" in p for p in c.problems)

    def test_box_count_difference_fails(self):
        c = compare_image(_record(), _record(boxes=[(10.0, 20.0, 110.0, 220.0)]))
        assert c.problems[0] == "2 boxes vs 1"
        assert c.max_box_diff is None

    def test_one_flipped_bit_fails(self):
        c = compare_image(_record(), _record(code="1f" + CODE[2:]))
        assert c.code_bits == 1 and c.crop_bits == 1
        assert "whole-image code differs in 1 bit(s)" in c.problems
        assert "best crop's code differs in 1 bit(s)" in c.problems

    def test_different_matches_fail(self):
        other = _record()
        other["matches"][0][1] = [7, 13]
        c = compare_image(_record(), other)
        assert c.matches_equal is False and "gallery matches differ" in c.problems

    def test_same_ids_with_other_labels_fail(self):
        other = _record()
        other["labels"]["7"] = "juice"
        assert compare_image(_record(), other).matches_equal is False

    def test_search_in_one_run_only_fails(self):
        c = compare_image(_record(), _record(search=False))
        assert c.problems == ["only one run searched a gallery"]

    def test_no_detections_on_both(self):
        c = compare_image(_record(boxes=()), _record(boxes=()))
        assert c.ok and c.crop_bits is None and c.max_box_diff == 0.0

    def test_records_of_different_images(self):
        with pytest.raises(ValueError, match="different images"):
            compare_image(_record("a.jpg"), _record("b.jpg"))


class TestCompareRuns:
    def test_agreeing_runs(self):
        rows, problems = compare_runs(_run([_record("a"), _record("b")]), _run([_record("a"), _record("b")], "aarch64"))
        assert problems == [] and all(r.ok for r in rows) and len(rows) == 2

    def test_missing_image_is_a_problem(self):
        rows, problems = compare_runs(_run([_record("a"), _record("b")]), _run([_record("a")], "aarch64"))
        assert problems == ["different images: ['b']"]
        assert len(rows) == 1

    def test_empty_runs_are_a_problem(self):
        assert compare_runs(_run([]), _run([]))[1] == ["no images were compared"]

    def test_wrong_format_is_refused(self):
        bad = _run([_record()])
        bad["format_version"] = 99
        with pytest.raises(ValueError, match="not a edge-shitu-arm-parity v1 run"):
            compare_runs(_run([_record()]), bad)


class TestReport:
    def test_ok_report_states_the_emulation_caveat(self):
        rows, problems = compare_runs(_run([_record()]), _run([_record()], "aarch64", emulated=True))
        text = format_report(rows, problems, {"machine": "x86_64"}, {"machine": "aarch64", "emulated": True})
        assert "| a.jpg" in text and "boxes x86_64/aarch64" in text
        assert "NOTE: the aarch64 run was emulated" in text and "say nothing about device speed" in text
        assert text.splitlines()[-1].startswith("PARITY OK: 1 images, 2 boxes")

    def test_failed_report_names_the_image(self):
        other = _record()
        other["boxes"][0][0] += 3
        rows, problems = compare_runs(_run([_record()]), _run([other], "aarch64"))
        text = format_report(rows, problems, {"machine": "x86_64"}, {"machine": "aarch64"})
        assert "MISMATCH a.jpg: boxes differ by up to 3.000 px" in text
        assert text.splitlines()[-1] == "PARITY FAILED: 1 of 1 image(s) disagree"
        assert "emulated" not in text


class TestCli:
    def _write(self, tmp_path, name, run):
        path = tmp_path / name
        path.write_text(json.dumps(run))
        return str(path)

    def test_compare_exit_codes(self, tmp_path, capsys):
        ref = self._write(tmp_path, "x86.json", _run([_record()]))
        same = self._write(tmp_path, "arm.json", _run([_record()], "aarch64", emulated=True))
        assert main(["compare", ref, same]) == 0
        assert "PARITY OK" in capsys.readouterr().out
        bad_run = _run([copy.deepcopy(_record(code="ff" * 64))], "aarch64")
        bad = self._write(tmp_path, "bad.json", bad_run)
        assert main(["compare", ref, bad]) == 1
        assert "PARITY FAILED" in capsys.readouterr().out


def _bash_array(script: str, name: str) -> list:
    """The words of ``NAME=( ... )`` in a bash script (quoted words as bash reads them)."""
    found = re.search(rf"^{name}=\((.*?)\)\s*$", script, re.S | re.M)
    assert found, f"bench/arm/run has no array {name}"
    return shlex.split(found.group(1))


def test_every_test_id_bench_arm_run_names_is_collected(tmp_path):
    """bench/arm/run deselects tests by id, and pytest ignores a --deselect that matches nothing: a renamed test
    would silently run under emulation, and a sampled list that grew would stop being thinned. Every id it names
    must be a collected test or a parametrised test's name (pytest deselects by prefix, which then takes all its
    cases), and each sampled list's length must be that of the parametrised list."""
    # The kiosk tests skip themselves at import without these, and are then never collected.
    pytest.importorskip("starlette", reason="starlette (the 'kiosk' extra) is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (the 'dev' extra, for Starlette's TestClient) is not installed")
    repo = Path(__file__).resolve().parents[1]
    script = (repo / "bench" / "arm" / "run").read_text(encoding="utf-8")
    ids = _bash_array(script, "DESELECTED_TESTS") + _bash_array(script, "QUICK_DESELECTED")
    found = re.search(r"^QUICK_PHOTOS=(\d+)\s*$", script, re.M)
    assert found, "bench/arm/run has no QUICK_PHOTOS=N"
    photos = int(found.group(1))
    sampled = {}
    for entry in _bash_array(script, "QUICK_SAMPLED"):
        name, count = entry.rsplit(":", 1)
        sampled[name] = int(count)
        ids += [f"{name}[{i}]" for i in range(photos, int(count))]
    files = sorted({i.split("::")[0] for i in ids})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(repo), *files], cwd=repo, capture_output=True, text=True, timeout=600)
    collected = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    names = collected | {c.split("[", 1)[0] for c in collected}
    assert [i for i in ids if i not in names] == []
    for name, count in sampled.items():
        assert sum(1 for c in collected if c.startswith(f"{name}[")) == count, name
