"""The paddleslim worker's own checks, which run before Paddle is imported: the request, the feeds file, the
command line; and its answer where paddleslim is missing (this environment). Quantisation itself is tested
through the side environment in tests/test_lite_convert.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge_shitu_converters import paddleslim_worker as worker


def _request(tmp_path, **changes):
    request = {
        "model_dir": str(tmp_path), "model_filename": "inference.pdmodel", "params_filename": "inference.pdiparams",
        "out_dir": str(tmp_path / "out"), "feeds": str(tmp_path / "feeds.npz"), "algo": "avg", "skip_tensors": [],
        "quantizable_op_types": ["conv2d"], "result": str(tmp_path / "result.json"),
    }
    request.update(changes)
    return {k: v for k, v in request.items() if v is not None}


@pytest.mark.parametrize("changes, match", [
    ({"extra": 1}, r"unknown keys \['extra'\], missing keys \[\]"),
    ({"result": None}, r"unknown keys \[\], missing keys \['result'\]"),
    ({"algo": "percentile"}, "unknown algorithm 'percentile'; expected one of avg, abs_max, hist, KL, mse, emd"),
    ({"qat": {"iters": 2}}, r"bad qat request \{'iters': 2\}"),
    ({"bias_correction": "yes"}, "bias_correction must be true or false, got 'yes'"),
    ({"qat": {"iters": 2, "batch": 2, "learning_rate": 1e-4, "seed": 0}},
     r"\(iters, batch, learning_rate, seed, scales;"),
    ({"qat": {"iters": 2, "batch": 2, "learning_rate": 1e-4, "seed": 0, "scales": "post_training"},
      "bias_correction": True}, "no bias_correction"),
    ({"qat": {"iters": 2, "batch": 2, "learning_rate": 1e-4, "seed": 0, "scales": "fixed"}},
     "qat scales must be one of post_training, moving, got 'fixed'"),
])
def test_malformed_requests_are_refused(changes, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        worker.quantize(_request(tmp_path, **changes))


def test_feeds_must_have_one_batch_count(tmp_path):
    np.savez(tmp_path / "feeds.npz", a=np.zeros((2, 1, 3, 4, 4), np.float32), b=np.zeros((3, 1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"same batch count; got \{'a': 2, 'b': 3\}"):
        worker.quantize(_request(tmp_path))
    np.savez(tmp_path / "feeds.npz", x=np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 1, 3, 2, 2))
    batches = worker._batches(tmp_path / "feeds.npz")
    assert len(batches) == 2 and batches[1]["x"].dtype == np.float32 and batches[1]["x"].shape == (1, 3, 2, 2)


def test_command_line(tmp_path, capsys):
    assert worker.main(["a.json", "b.json"]) == 1
    assert "usage: paddleslim_worker --versions" in capsys.readouterr().err
    assert worker.main([str(tmp_path / "absent.json")]) == 1
    assert "FileNotFoundError" in capsys.readouterr().err


def test_versions_without_paddleslim_exit_with_the_missing_status():
    # paddleslim lives in the Paddle-Lite side environment only (it pins numpy < 2 and OpenCV 4.6). A subprocess,
    # as the converter runs it: importing Paddle here would fix its program mode for the other tests.
    done = subprocess.run([sys.executable, "-I", "-m", "edge_shitu_converters.paddleslim_worker", "--versions"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == worker.EXIT_MISSING, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("paddleslim_worker: cannot import paddle and paddleslim")
