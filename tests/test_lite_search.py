"""Accuracy-aware INT8 for Paddle-Lite bundles (converters/lite_search.py): the search against a linear scan, and
the real search through `convert --format lite-* --precision int8 --verify` on the replica extractor (paddleslim in
the side environment, each candidate checked in simulated INT8 by Paddle Inference)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from edge_shitu.bundle import Bundle
from edge_shitu.errors import ConversionError, InvalidInputError
from edge_shitu_converters import lite_search
from edge_shitu_converters.quantize import BlockDamage


def _ranking(n):
    return [lite_search.RankedWeight(f"conv2d_{i}.w_0", BlockDamage(f"b{i}", (f"n{i}",), 1.0 / (i + 1), 20.0 + i))
            for i in range(n)]


def _search(tmp_path, n, passes_from, first=None, checked=None):
    """A search over ``n`` weights whose candidate passes once its ``passes_from`` most damaging weights are float
    (None: never); returns the result and the candidates quantised, in order. ``checked`` collects the float
    counts of the candidates checked."""
    tried = []
    checked = [] if checked is None else checked

    def quantize(weights, out):
        tried.append(list(weights))
        out.mkdir()
        (out / "floats.json").write_text(json.dumps(list(weights)))
        return out

    def check(program):
        k = len(json.loads((program / "floats.json").read_text()))
        checked.append(k)
        ok = passes_from is not None and k >= passes_from
        return ok, [] if ok else [f"extractor: {k} float"], {"k": k}

    return lite_search.search_lite_int8(_ranking(n), quantize, check, tmp_path, first=first), tried


@pytest.mark.parametrize("n", [2, 3, 7, 12])
def test_search_finds_the_fewest_float_weights_a_linear_scan_finds(tmp_path, n):
    for passes_from in list(range(n)) + [None]:
        work = tmp_path / f"{n}-{passes_from}"
        work.mkdir()
        result, tried = _search(work, n, passes_from)
        assert result.chosen == passes_from  # the linear scan's answer: the first k that passes
        # Each candidate keeps the k most damaging weights float, in ranking order.
        assert all(t == [f"conv2d_{i}.w_0" for i in range(len(t))] for t in tried)
        assert len(tried) == len(set(map(len, tried)))  # no candidate twice
        record = result.record()
        if passes_from is None:
            assert [len(t) for t in tried][-1] == n - 1 and not any(s["passed"] for s in record["steps"])
            assert result.program.name == f"k{n - 1}"
        else:
            assert result.float_weights == tuple(f"conv2d_{i}.w_0" for i in range(passes_from))
            assert result.program.name == f"k{passes_from}"
            assert json.loads((result.program / "floats.json").read_text()) == list(result.float_weights)
        assert record["chosen"] == passes_from and len(record["ranking"]) == n


@pytest.mark.parametrize("first_passes", [False, True])
def test_the_callers_check_of_the_all_int8_program_is_not_made_again(tmp_path, first_passes):
    checked = []
    first = (first_passes, [] if first_passes else ["extractor: given"], {"given": 1})
    result, tried = _search(tmp_path, 5, 3, first=first, checked=checked)
    assert 0 not in checked and tried[0] == []  # the candidate's folder is still asked for
    assert result.steps[0].figures == {"given": 1} and result.steps[0].passed is first_passes
    assert result.chosen == (0 if first_passes else 3)


def test_fewer_than_two_weights_is_nothing_to_search(tmp_path):
    with pytest.raises(InvalidInputError, match="nothing to search"):
        _search(tmp_path, 1, 0)


@pytest.mark.parametrize("bad, match", [({"iters": 0}, "iters must be a whole number >= 1"),
                                        ({"iters": 2, "batch": True}, "batch must be"),
                                        ({"iters": 2, "seed": -1}, "seed must be a whole number >= 0"),
                                        ({"iters": 2, "learning_rate": 0}, "learning_rate must be > 0"),
                                        ({"iters": 2, "scales": "fixed"},
                                         "scales must be one of post_training, moving, got 'fixed'"),
                                        ({"iters": 2, "algo": "median"}, "unknown quantisation algorithm 'median'")])
def test_training_settings_are_checked_before_any_work(bad, match, tmp_path):
    from edge_shitu_converters.lite import quantize_aware_training

    with pytest.raises(InvalidInputError, match=match):
        quantize_aware_training(tmp_path / "absent", tmp_path / "out", feeds=[], **bad)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- the real search


@pytest.fixture(scope="module")
def calib(drink_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    for p in sorted((drink_dir / "gallery").rglob("*.jpg"))[:4]:
        shutil.copy(p, d / p.name)
    return d


def _keep_int8(extractor_dir, n):
    """All the extractor's quantisable weights but the first ``n``: a user skip list that leaves ``n`` to search."""
    from edge_shitu_converters.lite import quantizable_weights

    return quantizable_weights(extractor_dir)[n:]


def _convert(replica_dirs, out, calib, verify_photos, target, skip, int8_layers="auto", **options):
    from edge_shitu_converters.convert import convert

    return convert(None, replica_dirs["extractor"], out, format=f"lite-{target}", precision="int8", calib_dir=calib,
                   calib_count=4, lite_skip=[f"extractor:{w}" for w in skip], int8_layers=int8_layers, verify=True,
                   verify_images=verify_photos, **options)


@pytest.mark.paddle
def test_arm_search_refuses_a_model_that_never_passes_then_keeps_the_fewest_float(replica_dirs, calib, verify_photos,
                                                                                   lite_opt, tmp_path, monkeypatch):
    """An ARM .nb cannot run here, so `--verify` alone would publish it unverified. First a limit no candidate
    reaches: nothing is published and the failure report holds every step. Then a limit between the all-INT8 and
    the most float candidates' agreement: the fewest float weights that pass are kept, and the .nb is rebuilt from
    that candidate."""
    from edge_shitu_converters import verify
    from edge_shitu.backends.paddlelite import read_nb_targets

    monkeypatch.setenv("EDGE_SHITU_LITE_OPT", str(lite_opt))
    limits = verify.THRESHOLDS["int8"]
    monkeypatch.setitem(verify.THRESHOLDS, "int8", replace(limits, extractor_min_cosine=1.5))
    skip = _keep_int8(replica_dirs["extractor"], 4)
    with pytest.raises(ConversionError, match="no INT8 extractor passes"):
        _convert(replica_dirs, tmp_path / "never", calib, verify_photos, "arm", skip)
    assert not (tmp_path / "never").exists()
    report = json.loads((tmp_path / "never.verify-failed.json").read_text())
    search = report["int8_search"]["extractor"]
    assert search["chosen"] is None and search["blocks"] == 4 and "simulated" in search["check"]
    assert [s["float_blocks"] for s in search["steps"]] == [0, 1, 2, 3]
    assert not any(s["passed"] for s in search["steps"])
    assert not {r["weight"] for r in search["ranking"]} & set(skip)  # the user's float weights are not searched
    cosines = [s["figures"]["min_cosine"] for s in search["steps"]]
    assert cosines[-1] > cosines[0]  # more layers float, closer to fp32

    middle = (cosines[0] + cosines[-1]) / 2
    monkeypatch.setitem(verify.THRESHOLDS, "int8", replace(limits, extractor_min_cosine=middle,
                                                           extractor_mean_bit_agreement=0.0,
                                                           extractor_min_bit_agreement=0.0))
    out = _convert(replica_dirs, tmp_path / "arm", calib, verify_photos, "arm", skip)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is None and "cannot run" in report["unverifiable"]
    search = report["int8_search"]["extractor"]
    chosen, steps = search["chosen"], search["steps"]
    assert chosen == next(k for k, c in enumerate(cosines) if c >= middle)  # the same candidates as above
    assert all(not s["passed"] for s in steps if s["float_blocks"] < chosen)
    assert any(s["passed"] and s["float_blocks"] == chosen for s in steps)
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    assert quant["float_weights"] == search["float_weights"] == [r["weight"] for r in search["ranking"][:chosen]]
    assert set(quant["skip_tensors"]) == set(skip) | set(quant["float_weights"])
    assert sorted(search["user_float_weights"]) == sorted(skip)
    assert quant["search"] == {"steps": len(steps), "chosen": chosen} and quant["int8_layers"] == "auto"
    assert read_nb_targets(out / "extractor.nb") == frozenset({"arm"})
    from conftest import run_cli

    code, text, _ = run_cli("bundle", "info", out)
    assert code == 0 and "NOT VERIFIED" in text and f"extractor int8 search: 4 blocks, {chosen} kept float" in text
    assert f"{', ...' if chosen > 8 else ''}), besides the {len(skip)} of --lite-skip; simulated INT8" in text
    assert "simulated INT8" in text and text.count(" float: passed") + text.count(" float: failed") == len(steps)


@pytest.mark.paddle
def test_x86_int8_layers_n_keeps_the_top_n_float_and_verifies_the_file(replica_dirs, calib, verify_photos, lite_opt,
                                                                       lite_python, tmp_path, monkeypatch):
    """--int8-layers N: the N most damaging weights float without a search, ranked before the model is quantised,
    so it is quantised and optimised once; `--verify` checks the .nb in Paddle-Lite itself."""
    from edge_shitu_converters import lite

    monkeypatch.setenv("EDGE_SHITU_LITE_OPT", str(lite_opt))
    monkeypatch.setenv("EDGE_SHITU_LITE_PYTHON", str(lite_python))
    runs = {"quantize": [], "opt": []}

    def counted(name, real):
        def run(*args, **kwargs):
            runs[name].append(kwargs.get("skip"))
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(lite, "quantize_post_training", counted("quantize", lite.quantize_post_training))
    monkeypatch.setattr(lite, "run_opt", counted("opt", lite.run_opt))
    skip = _keep_int8(replica_dirs["extractor"], 6)
    out = _convert(replica_dirs, tmp_path / "x86", calib, verify_photos, "x86", skip, int8_layers=2)
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is True and "int8_search" not in report
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    assert quant["int8_layers"] == 2 and quant["blocks"] == 6 and len(quant["float_weights"]) == 2
    assert set(quant["skip_tensors"]) == set(skip) | set(quant["float_weights"])
    assert quant["quantized_ops"] == 4 and quant["bias_correction"] is False
    assert len(runs["opt"]) == 1 and len(runs["quantize"]) == 1
    assert set(runs["quantize"][0]) == set(quant["skip_tensors"])  # the one quantisation already had its float N


@pytest.mark.paddle
def test_an_arm_model_passing_with_every_layer_int8_records_its_simulated_check(replica_dirs, calib, verify_photos,
                                                                                 lite_opt, tmp_path, monkeypatch):
    """Nothing to search, but for an ARM bundle the simulated check is the only figure this machine can give: it is
    recorded beside 'not verified' and printed by `bundle info`. (With paddleslim's bias correction, which the
    manifest records.)"""
    monkeypatch.setenv("EDGE_SHITU_LITE_OPT", str(lite_opt))
    skip = _keep_int8(replica_dirs["extractor"], 6)
    out = _convert(replica_dirs, tmp_path / "arm", calib, verify_photos, "arm", skip, lite_bias_correction=True)
    report = json.loads((out / "verify.json").read_text())
    search = report["int8_search"]["extractor"]
    assert report["passed"] is None and search["chosen"] == 0 and search["steps"][0]["passed"]
    assert search["steps"][0]["figures"]["min_cosine"] > 0.95
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    assert quant["quantized_ops"] == 6 and quant["bias_correction"] is True
    from conftest import run_cli

    code, text, _ = run_cli("bundle", "info", out)
    assert code == 0 and f"extractor int8 search: passes with every layer but the {len(skip)} of --lite-skip INT8; " \
        "simulated INT8" in text


@pytest.mark.paddle
@pytest.mark.parametrize("int8_layers, floats, refusal",
                         [(2, 2, "with int8_layers 2"), ("all", 0, "with every weight INT8")])
def test_an_arm_model_of_a_fixed_budget_is_checked_simulated_and_refused_when_it_fails(
        int8_layers, floats, refusal, replica_dirs, calib, verify_photos, lite_opt, tmp_path, monkeypatch):
    """--int8-layers N or all chooses the float weights without a search, but an ARM .nb cannot run here: its
    program gets the simulated check all the same (before, it was published with no figure at all), and one that
    fails is not published."""
    from edge_shitu_converters import verify

    monkeypatch.setenv("EDGE_SHITU_LITE_OPT", str(lite_opt))
    skip = _keep_int8(replica_dirs["extractor"], 6)
    out = _convert(replica_dirs, tmp_path / "arm", calib, verify_photos, "arm", skip, int8_layers=int8_layers)
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    report = json.loads((out / "verify.json").read_text())
    check = report["int8_search"]["extractor"]
    assert report["passed"] is None and quant["quantized_ops"] == 6 - floats
    assert check["chosen"] == floats and check["float_weights"] == quant.get("float_weights", [])
    assert [step["float_blocks"] for step in check["steps"]] == [floats] and check["steps"][0]["passed"]
    assert 0.95 < check["steps"][0]["figures"]["min_cosine"] < 1.0

    monkeypatch.setitem(verify.THRESHOLDS, "int8", replace(verify.THRESHOLDS["int8"], extractor_min_cosine=1.5))
    refused = tmp_path / "arm-refused"
    with pytest.raises(ConversionError, match=f"no INT8 extractor passes {refusal} "):
        _convert(replica_dirs, refused, calib, verify_photos, "arm", skip, int8_layers=int8_layers)
    assert not refused.exists()
    failed = json.loads((tmp_path / "arm-refused.verify-failed.json").read_text())["int8_search"]["extractor"]
    assert failed["chosen"] is None and failed["float_weights"] == check["float_weights"]


@pytest.mark.paddle
def test_quantisation_aware_training_trains_checks_and_records_the_model(replica_dirs, calib, verify_photos, lite_opt,
                                                                         tmp_path, monkeypatch):
    """--lite-qat: paddleslim trains the INT8 program against its own fp32 outputs on the calibration photos; the
    trained program is checked in simulated INT8 (an ARM bundle is refused when it fails) and the manifest says how
    it was made."""
    from edge_shitu_converters.convert import convert
    from edge_shitu_converters.lite import QAT_LEARNING_RATE, quantizable_weights

    monkeypatch.setenv("EDGE_SHITU_LITE_OPT", str(lite_opt))

    def qat(out):
        return convert(None, replica_dirs["extractor"], out, format="lite-arm", precision="int8", calib_dir=calib,
                       calib_count=4, lite_qat=2, verify=True, verify_images=verify_photos)

    out = qat(tmp_path / "arm")
    quant = Bundle.load(out).manifest["models"]["extractor"]["quantization"]
    assert quant["tool"].startswith("paddleslim.auto_compression") and quant["algo"] == "qat"
    assert quant["qat"]["frozen_batch_norms"] == len(_batch_norm_statistics(replica_dirs["extractor"])) // 2
    assert quant["qat"]["iters"] == 2 and quant["qat"]["teacher"] == "the fp32 program"
    # What the worker trained with, as it reports it: 4 photos, batch 2, SGD, post-training (avg) scales held.
    assert {k: quant["qat"][k] for k in ("batch", "photos", "optimizer", "seed", "scales", "post_training_algo")} == {
        "batch": 2, "photos": 4, "optimizer": "SGD", "seed": 0, "scales": "post_training", "post_training_algo": "avg"}
    assert quant["qat"]["held_activation_scales"] > 0 and quant["qat"]["learning_rate"] == QAT_LEARNING_RATE
    assert quant["quantized_ops"] == len(quantizable_weights(replica_dirs["extractor"])) and not quant["skip_tensors"]
    report = json.loads((out / "verify.json").read_text())
    check = report["int8_search"]["extractor"]
    assert report["passed"] is None and check["chosen"] == 0 and check["steps"][0]["passed"]
    assert 0.9 < check["steps"][0]["figures"]["min_cosine"] < 1.0  # close to fp32, and really quantised

    # A trained program that fails the check is refused: nothing published, the check in the failure report.
    from edge_shitu_converters import verify

    monkeypatch.setitem(verify.THRESHOLDS, "int8", replace(verify.THRESHOLDS["int8"], extractor_min_cosine=1.5))
    refused = tmp_path / "arm-refused"
    with pytest.raises(ConversionError, match="no INT8 extractor passes after quantisation-aware training"):
        qat(refused)
    assert not refused.exists()
    failed = json.loads((tmp_path / "arm-refused.verify-failed.json").read_text())["int8_search"]["extractor"]
    assert failed["chosen"] is None and failed["steps"][0]["failures"][0].startswith("extractor")


@pytest.mark.paddle
def test_training_keeps_the_batch_norms_running_statistics_and_the_float_weights_float(replica_dirs, tmp_path):
    """Quantisation-aware training learns weights and scales only: each batch norm keeps the fp32 model's running
    statistics, which the teacher normalises by. PicoDet's program is exported with batch norms that would update
    them in training (``use_global_stats`` false), so a step on its one photo moved them (54 of 156 after 100 steps)
    and the detector drifted away from fp32. PP-LCNetV2's are exported frozen, so a copy of the replica extractor
    with them unfrozen stands in for the detector here (a detector run takes minutes). The ops of the weights
    asked to stay float (``--lite-skip``, ``--int8-layers N``) are trained without fake quantisation."""
    from edge_shitu_converters import lite, paddle_io
    from edge_shitu_converters.lite import quantizable_weights

    paddle = paddle_io.import_paddle()
    unfrozen = tmp_path / "unfrozen"
    shutil.copytree(replica_dirs["extractor"], unfrozen)
    program = paddle.static.Program.parse_from_string((unfrozen / "inference.pdmodel").read_bytes())
    norms = [op for op in program.global_block().ops if op.type == "batch_norm"]
    for op in norms:
        op._set_attr("use_global_stats", False)
    (unfrozen / "inference.pdmodel").write_bytes(program.desc.serialize_to_string())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(2, 3, 224, 224)).astype(np.float32)} for _ in range(2)]

    weights = quantizable_weights(unfrozen)
    float_weights = [weights[0], weights[7], weights[-1]]  # the stem, a depthwise convolution and the head
    trained = lite.quantize_aware_training(unfrozen, tmp_path / "trained", feeds=feeds, iters=2, batch=2,
                                           skip=float_weights)
    assert norms and trained.training["frozen_batch_norms"] == len(norms)
    assert trained.skip_tensors == tuple(float_weights) and trained.quantized_ops == len(weights) - 3
    # A quantised weight is saved as whole INT8 levels, a float one as it was trained.
    model = paddle_io.load_inference_model(tmp_path / "trained")
    levels = {name: np.array_equal(value, np.round(value)) and np.abs(value).max() <= 127
              for name in weights for value in [np.array(model.scope.find_var(name).get_tensor())]}
    assert [name for name, whole in levels.items() if not whole] == float_weights
    fp32_stats, trained_stats = _batch_norm_statistics(unfrozen), _batch_norm_statistics(tmp_path / "trained")
    assert len(fp32_stats) == 2 * len(norms) and fp32_stats.keys() == trained_stats.keys()
    assert all(np.array_equal(fp32_stats[name], trained_stats[name]) for name in fp32_stats)
    # The activations kept the scales of post-training quantisation of the same photos (the default): training
    # changed the weights only. paddleslim's moving average, asked for, ends elsewhere after one step.
    lite.quantize_post_training(unfrozen, tmp_path / "post", feeds=feeds, skip=float_weights)
    expected, held = _activation_scales(tmp_path / "post"), _activation_scales(tmp_path / "trained")
    assert trained.training["scales"] == "post_training" and trained.training["post_training_algo"] == "avg"
    assert held and trained.training["held_activation_scales"] == len(held) and held.keys() == expected.keys()
    assert all(np.array_equal(held[name], expected[name]) for name in held)
    moving = lite.quantize_aware_training(unfrozen, tmp_path / "moving", feeds=feeds, iters=1, batch=2,
                                          skip=float_weights, scales="moving")
    assert moving.training["scales"] == "moving" and "post_training_algo" not in moving.training
    moved = _activation_scales(tmp_path / "moving")
    assert moved.keys() == expected.keys() and all(not np.array_equal(moved[n], expected[n]) for n in moved)
    # A weight that no quantisable op reads cannot be kept float: refused, not ignored.
    with pytest.raises(ConversionError, match=r"skip_tensors \['batch_norm2d_0.w_1'\] are not weights of a "):
        lite.quantize_aware_training(unfrozen, tmp_path / "unknown", feeds=feeds, iters=1, skip=["batch_norm2d_0.w_1"])


def _activation_scales(model_dir):
    """``{scale name: value}`` of the activation quantisers of a saved fake-quantisation program (post-training or
    trained)."""
    from edge_shitu_converters import paddle_io

    model = paddle_io.load_inference_model(model_dir)
    names = [op.input("InScale")[0] for op in model.program.global_block().ops
             if op.type in ("fake_quantize_range_abs_max", "fake_quantize_moving_average_abs_max")]
    return {name: np.array(model.scope.find_var(name).get_tensor()) for name in names}


def _batch_norm_statistics(model_dir):
    """``{name: array}`` of the running means and variances of the batch norms of a legacy Paddle program."""
    from edge_shitu_converters import paddle_io

    model = paddle_io.load_inference_model(model_dir)
    names = {name for op in model.program.global_block().ops if op.type == "batch_norm"
             for name in op.input("Mean") + op.input("Variance")}
    return {name: np.array(model.scope.find_var(name).get_tensor()) for name in names}


@pytest.mark.paddle
def test_the_detector_trains_one_photo_per_step(replica_dirs, calib, lite_opt, tmp_path, monkeypatch):
    """The PicoDet detector's program reshapes its heads for exactly one image, so --lite-qat trains it at its fixed
    batch of one (at the default two, paddleslim failed in its first step); the extractor's dynamic batch trains at
    QAT_BATCH (the test above). The user's float weights go with the request. The training itself is replaced:
    what it is asked for is the point."""
    from edge_shitu_converters import lite

    asked = {}

    def training(model_dir, out_dir, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop after the request")

    monkeypatch.setattr(lite, "quantize_aware_training", training)
    with pytest.raises(ConversionError, match="stop after the request"):
        lite.convert_lite(replica_dirs["detector"], None, tmp_path / "b", target="arm", precision="int8",
                          calib_dir=calib, calib_count=2, qat_iters=1, skip=["conv2d_84.w_0"], opt=lite_opt)
    assert asked["batch"] == 1 and asked["iters"] == 1 and asked["skip"] == ("conv2d_84.w_0",)
    assert [feed["image"].shape for feed in asked["feeds"]] == [(1, 3, 640, 640)] * 2


def test_a_failing_worker_is_reported_by_its_own_error_line_first(tmp_path):
    """The worker's report of its exception leads the message (shown on one bounded line), and progress bars that
    rewrote a line with carriage returns leave only their last state in the log's tail."""
    from edge_shitu.cli.common import one_line
    from edge_shitu_converters.lite import _run_slim

    fake = tmp_path / "python"
    bars = "".join(f"\\rAdding OutScale op:|{'#' * i}" for i in range(200))
    fake.write_text("#!/bin/sh\n"
                    f"printf 'I1207 New Executor is Running.\\n{bars}\\n' >&2\n"
                    "printf 'paddleslim_worker: ValueError: (InvalidArgument) the shape in ReshapeOp is invalid\\n' >&2\n"
                    "printf '  [Hint: Expected capacity == in_size]\\n' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ConversionError) as caught:
        _run_slim(fake, ["request.json"], "paddleslim training of m", tmp_path, 60)
    message = str(caught.value)
    assert message.startswith("paddleslim training of m exited with status 1: ValueError: (InvalidArgument) the shape "
                              "in ReshapeOp is invalid; its log ends with:\n")
    assert "Adding OutScale op:|" + "#" * 199 + "\n" in message and "#" * 198 + "\r" not in message
    assert message.count("Adding OutScale") == 1
    assert "ReshapeOp is invalid" in one_line(message)[:200]
