"""Paddle -> Paddle-Lite (.nb) bundle conversion: finding paddle_lite_opt, the manifest, the targets
compiled into the files, reproducible files, INT8 post-training quantisation (paddleslim in the side
environment, its skip list), the flatten XShape fix, the refusals (PIR programs, an x86 INT8 detector,
a side environment without paddleslim) and opt crashes.

``paddle_lite_opt`` lives in a Python 3.10 side environment: ``$EDGE_SHITU_LITE_OPT``, else
``<repo>/.venv-lite/bin/paddle_lite_opt`` (made by ``scripts/setup-lite-env``). Checks that run a
``.nb`` file use that environment's Python (``$EDGE_SHITU_LITE_PYTHON``, else the one next to opt).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_shitu.errors import (
    BackendUnavailableError,
    ConversionError,
    InvalidInputError,
    MissingFileError,
)

_REPO = Path(__file__).resolve().parents[1]
_SETUP = "scripts/setup-lite-env"

# Runs in the side environment: load a .nb, run it on each input of an .npz, save the outputs by name.
_LITE_RUNNER = r"""
import json, sys
import numpy as np
import paddlelite.lite as lite
nb, inputs, out = sys.argv[1:4]
config = lite.MobileConfig()
config.set_model_from_file(nb)
predictor = lite.create_paddle_predictor(config)
names = list(predictor.get_output_names())
results = {n: [] for n in names}
for x in np.load(inputs)["x"]:
    predictor.get_input(0).from_numpy(np.ascontiguousarray(x[None], dtype=np.float32))
    predictor.run()
    for n in names:
        results[n].append(predictor.get_output_by_name(n).numpy().copy())
np.savez(out, **{n: np.concatenate(v) for n, v in results.items()})
print(json.dumps({"inputs": list(predictor.get_input_names()), "outputs": names}))
"""


@pytest.fixture(scope="module")
def opt(lite_opt) -> Path:
    return lite_opt


def _run_in_lite(python: Path, nb: Path, x: np.ndarray, tmp: Path):
    """Run ``nb`` with paddlelite on each row of ``x`` (batch 1); return (io names, outputs by name)."""
    inputs, outputs = tmp / f"{nb.stem}-in.npz", tmp / f"{nb.stem}-out.npz"
    np.savez(inputs, x=x.astype(np.float32))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        [str(python), "-c", _LITE_RUNNER, str(nb), str(inputs), str(outputs)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(outputs) as data:
        return names, {k: data[k] for k in data.files}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _photos(paths, spec) -> np.ndarray:
    from edge_shitu.image import load_image
    from edge_shitu.preprocess import image_to_tensor

    return np.stack([image_to_tensor(load_image(p), spec) for p in paths])


def _flatten_has_xshape(program_bytes: bytes) -> list:
    """For each flatten_contiguous_range op of the program: whether it has an XShape output."""
    from edge_shitu_converters import paddle_io

    paddle_io.import_paddle()
    from paddle.base import core

    # Op handles point into the ProgramDesc: read them while it is alive, return plain Python values.
    desc = core.ProgramDesc(program_bytes)
    block = desc.block(0)
    ops = [block.op(i) for i in range(block.op_size())]
    return [("XShape" in op.output_names()) for op in ops if op.type() == "flatten_contiguous_range"]


@pytest.fixture(scope="module")
def gallery(drink_dir) -> Path:
    return drink_dir / "gallery"


@pytest.fixture(scope="module")
def lite_bundles(replica_dirs, opt, tmp_path_factory) -> dict:
    """fp32 bundles (detector + extractor) from the replicas, for each target."""
    from edge_shitu_converters.lite import convert_lite

    root = tmp_path_factory.mktemp("lite")
    return {
        target: convert_lite(replica_dirs["detector"], replica_dirs["extractor"], root / target, target=target, opt=opt)
        for target in ("x86", "arm")
    }


@pytest.fixture(scope="module")
def int8_x86_extractor(replica_dirs, opt, gallery, tmp_path_factory) -> Path:
    from edge_shitu_converters.lite import convert_lite

    out = tmp_path_factory.mktemp("lite-int8") / "x86"
    return convert_lite(
        None, replica_dirs["extractor"], out, target="x86", precision="int8", calib_dir=gallery, calib_count=4,
        algo="avg", opt=opt,
    )


@pytest.fixture(scope="module")
def resaved_extractor(replica_dirs, tmp_path_factory) -> Path:
    """The extractor replica loaded and saved again by Paddle 3.3 (which drops flatten's XShape)."""
    from edge_shitu_converters import paddle_io

    paddle = paddle_io.import_paddle()
    out = tmp_path_factory.mktemp("resaved")
    model = paddle_io.load_inference_model(replica_dirs["extractor"])
    block = model.program.global_block()
    with paddle.static.scope_guard(model.scope):
        paddle.static.save_inference_model(
            str(out / "inference"), [block.var(n) for n in model.feed_names], model.fetch_targets, model.executor,
            program=model.program,
        )
    return out


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_opt_prefers_the_argument_then_the_environment_then_path(tmp_path, monkeypatch):
    from edge_shitu_converters.lite import OPT_ENV, find_opt

    on_path = _executable(tmp_path / "path" / "paddle_lite_opt")
    in_env = _executable(tmp_path / "env" / "opt")
    given = _executable(tmp_path / "given" / "opt")
    monkeypatch.setenv("PATH", str(on_path.parent))
    monkeypatch.delenv(OPT_ENV, raising=False)
    assert find_opt() == on_path
    monkeypatch.setenv(OPT_ENV, str(in_env))
    assert find_opt() == in_env
    assert find_opt(given) == given
    assert find_opt(str(given)) == given


def _assert_install_hint(message: str) -> None:
    assert "python3.10 -m venv" in message
    assert 'pip install paddlelite==2.13rc0 "numpy<2"' in message
    assert _SETUP in message
    assert "EDGE_SHITU_LITE_OPT" in message and "--lite-opt" in message


def test_missing_opt_says_how_to_install_it(tmp_path, monkeypatch):
    from edge_shitu_converters.lite import OPT_ENV, find_opt

    from edge_shitu_converters import lite_worker

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(OPT_ENV, raising=False)
    monkeypatch.setattr(lite_worker, "_repo_root", lambda: tmp_path / "repo")
    with pytest.raises(BackendUnavailableError, match="paddle_lite_opt was not found") as info:
        find_opt()
    _assert_install_hint(str(info.value))
    assert isinstance(info.value, ImportError)
    # The side environment scripts/setup-lite-env makes is found last.
    made = _executable(tmp_path / "repo" / ".venv-lite" / "bin" / "paddle_lite_opt")
    assert find_opt() == made


def test_a_named_opt_that_is_missing_is_not_replaced_by_another(tmp_path, monkeypatch):
    from edge_shitu_converters.lite import OPT_ENV, find_opt

    monkeypatch.setenv("PATH", str(_executable(tmp_path / "path" / "paddle_lite_opt").parent))
    monkeypatch.setenv(OPT_ENV, str(tmp_path / "absent"))
    with pytest.raises(BackendUnavailableError, match=r"\$EDGE_SHITU_LITE_OPT names .*absent, which does not exist"):
        find_opt()
    plain = tmp_path / "not-executable"
    plain.write_text("")
    with pytest.raises(BackendUnavailableError, match="lite_opt names .*not-executable, which is not an executable file") as info:
        find_opt(plain)
    _assert_install_hint(str(info.value))


def test_convert_without_opt_fails_before_any_work(tmp_path, monkeypatch):
    from edge_shitu_converters import lite_worker
    from edge_shitu_converters.convert import convert
    from edge_shitu_converters.lite import OPT_ENV

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(OPT_ENV, raising=False)
    monkeypatch.setattr(lite_worker, "_repo_root", lambda: tmp_path / "repo")
    with pytest.raises(BackendUnavailableError, match="setup-lite-env"):
        convert(None, tmp_path / "rec", tmp_path / "out", format="lite-arm")
    assert not (tmp_path / "out").exists()


def test_the_formats_table_has_the_lite_formats():
    from edge_shitu_converters.convert import EXPORT_FORMATS, validate_export

    for target in ("x86", "arm"):
        spec = validate_export(f"lite-{target}", "int8", None)
        assert spec is EXPORT_FORMATS[f"lite-{target}"]
        assert (spec.suffix, spec.backend, spec.target, spec.precisions) == (".nb", "paddlelite", target, ("fp32", "int8"))
    with pytest.raises(ConversionError, match="'fp16' is not supported yet for lite-arm"):
        validate_export("lite-arm", "fp16", None)
    with pytest.raises(ConversionError, match="unknown export format 'lite-riscv'"):
        validate_export("lite-riscv", "fp32", None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target": "riscv"}, InvalidInputError, "unknown Paddle-Lite target 'riscv'"),
        ({"target": "x86", "precision": "fp16"}, ConversionError, "not supported yet"),
        ({"target": "arm", "precision": "int8"}, InvalidInputError, "int8 needs calibration photos"),
        ({"target": "arm", "precision": "int8", "calib_dir": "absent"}, MissingFileError, "calibration photo folder"),
        ({"target": "arm", "calib_dir": "."}, InvalidInputError, "for int8 bundles"),
        ({"target": "arm", "algo": "avg"}, InvalidInputError, "for int8 bundles"),
        ({"target": "arm", "skip": ["conv2d_0.w_0"]}, InvalidInputError, "^skip is for int8 bundles"),
        ({"target": "arm", "bias_correction": True}, InvalidInputError, "^bias_correction is for int8 bundles"),
        ({"target": "arm", "algo": "avg", "skip": ["w"]}, InvalidInputError, "^algo and skip are for int8 bundles"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "calib_count": 0}, InvalidInputError, "calib_count"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "calib_count": True}, InvalidInputError, "calib_count"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "algo": "percentile"}, InvalidInputError,
         "algorithm 'percentile'; expected one of avg, abs_max, hist, KL, mse, emd"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "skip": "conv2d_0.w_0"}, InvalidInputError,
         "not the single string"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "skip": ["conv2d_0.w_0", ""]}, InvalidInputError,
         "skip must hold weight names"),
        ({"target": "arm", "name": "../evil"}, InvalidInputError, "bundle name"),
        ({"target": "arm", "int8_layers": 2}, InvalidInputError, "int8_layers is for int8 bundles"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "int8_layers": "some"}, InvalidInputError,
         "int8_layers must be"),
        ({"target": "arm", "qat_iters": 5}, InvalidInputError, "qat_iters is for int8 bundles"),
        ({"target": "arm", "precision": "int8", "calib_dir": ".", "qat_iters": 0}, InvalidInputError,
         "qat_iters must be a whole number"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, error, match, tmp_path, monkeypatch):
    from edge_shitu_converters.lite import convert_lite

    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        convert_lite(None, tmp_path / "rec", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_convert_rejects_options_of_other_formats(tmp_path):
    from edge_shitu_converters.convert import convert

    for option in ("lite_opt", "lite_algo", "lite_skip", "lite_qat", "lite_bias_correction", "lite_python"):
        with pytest.raises(InvalidInputError, match=f"^{option} is for the Paddle-Lite formats, not onnx"):
            convert(None, tmp_path, tmp_path / "out", **{option: "x"})
    with pytest.raises(InvalidInputError, match="^lite_algo and lite_opt are for the Paddle-Lite formats, not onnx"):
        convert(None, tmp_path, tmp_path / "out", lite_algo="avg", lite_opt="x")
    with pytest.raises(InvalidInputError, match="calib_dir and calib_count are for int8"):
        convert(None, tmp_path, tmp_path / "out", format="lite-x86", calib_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="verify needs a folder of real photos"):
        convert(None, tmp_path, tmp_path / "out", format="lite-x86", verify=True)


def test_an_x86_int8_detector_is_refused(tmp_path):
    from edge_shitu_converters.lite import convert_lite

    with pytest.raises(ConversionError, match="x86 INT8 kernels compute the detector wrongly"):
        convert_lite(tmp_path, None, tmp_path / "out", target="x86", precision="int8", calib_dir=tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.paddle
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_pir_json_programs_are_refused(precision, tmp_path, opt, gallery):
    from edge_shitu_converters.lite import convert_lite, quantize_post_training

    pir = tmp_path / "rec"
    pir.mkdir()
    (pir / "inference.json").write_text("{}")
    (pir / "inference.pdiparams").write_bytes(b"")
    calib = {"calib_dir": gallery} if precision == "int8" else {}
    with pytest.raises(ConversionError, match="needs the legacy inference.pdmodel program of the extractor.*PIR.*no tool"):
        convert_lite(None, pir, tmp_path / "out", target="arm", precision=precision, opt=opt, **calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]
    with pytest.raises(ConversionError, match="legacy inference.pdmodel"):
        quantize_post_training(pir, tmp_path / "q", feeds=[{"x": np.zeros((1, 3, 224, 224), np.float32)}])


@pytest.mark.paddle
@pytest.mark.parametrize("target", ["x86", "arm"])
def test_fp32_bundle_manifest(target, lite_bundles, replica_bundle):
    from edge_shitu.bundle import Bundle

    root = lite_bundles[target]
    assert sorted(p.name for p in root.iterdir()) == ["detector.nb", "extractor.nb", "manifest.json"]
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    onnx = json.loads((replica_bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["name"] == f"ppshituv2-replica-s0-lite-{target}-fp32"
    assert set(manifest["tools"]) == {"edge_shitu", "paddlepaddle", "paddlelite_opt"}
    assert manifest["tools"]["paddlelite_opt"] == "v2.13-rc"
    for role in ("detector", "extractor"):
        model, reference = manifest["models"][role], onnx["models"][role]
        assert model["file"] == f"{role}.nb"
        assert (model["backend"], model["target"], model["precision"]) == ("paddlelite", target, "fp32")
        # Everything but the file itself is what the ONNX bundle says: same inputs, outputs, provenance.
        for key in set(reference) - {"file", "sha256", "backend"}:
            assert model[key] == reference[key], key
        assert set(model) == set(reference) | {"target"}
    assert manifest["models"]["detector"]["output"]["scores"][0] == "scores_stride8"
    bundle = Bundle.load(root)
    bundle.verify()
    assert {spec.target for spec in bundle.models.values()} == {target}
    assert {spec.backend for spec in bundle.models.values()} == {"paddlelite"}


@pytest.mark.paddle
@pytest.mark.parametrize("target", ["x86", "arm"])
def test_nb_files_hold_kernels_of_their_target_only(target, lite_bundles):
    from edge_shitu.backends.paddlelite import read_nb_targets

    for role in ("detector", "extractor"):
        path = lite_bundles[target] / f"{role}.nb"
        assert read_nb_targets(path) == frozenset({target})
        # The version field's bytes after the NUL are zeroed (opt leaves them uninitialised).
        assert path.read_bytes()[2:18] == b"v2.13-rc" + bytes(8)


@pytest.mark.paddle
def test_fp32_sizes(lite_bundles):
    sizes = {(t, r): (lite_bundles[t] / f"{r}.nb").stat().st_size for t in ("x86", "arm") for r in ("detector", "extractor")}
    for (target, role), size in sizes.items():
        assert {"detector": 20e6, "extractor": 14e6}[role] < size < {"detector": 32e6, "extractor": 22e6}[role], sizes


@pytest.mark.paddle
def test_identical_inputs_give_identical_files(lite_bundles, replica_dirs, opt, tmp_path):
    from edge_shitu_converters.convert import convert

    # Through convert(): the format table dispatches to convert_lite.
    again = convert(None, replica_dirs["extractor"], tmp_path / "again", format="lite-x86", lite_opt=opt)
    first = lite_bundles["x86"]
    assert (again / "extractor.nb").read_bytes() == (first / "extractor.nb").read_bytes()
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["name"] == "ppshituv2-rec-replica-s0-lite-x86-fp32"
    assert manifest["models"]["extractor"] == json.loads((first / "manifest.json").read_text())["models"]["extractor"]


@pytest.mark.paddle
def test_the_same_program_gives_the_same_file_wherever_it_is_written(replica_dirs, opt, tmp_path):
    """opt's bytes depend on the output path it is given and on address-space randomisation: run_opt writes one
    relative name with randomisation off. 16 runs into folders of other names and lengths give one file."""
    from edge_shitu_converters import lite
    from edge_shitu_converters.convert import cut_detector_heads
    from edge_shitu_converters.lite import run_opt

    # Without setarch -R the file varies from run to run (docs/benchmarks.md): fail plainly rather than by chance.
    assert lite._fixed_layout(), "setarch -R is not usable on this machine"
    heads = cut_detector_heads(replica_dirs["detector"], tmp_path / "heads").files
    files = set()
    for folder in [f"{r}{name}" for r in "12" for name in ("a", "bb", "ccc", "opt1", "optr0", "zz9",
                                                              "long-name-of-a-folder", ".x.opt-0123456789ab")]:
        out = run_opt(heads.program, heads.params, tmp_path / folder / "detector.nb", target="arm", opt=opt)
        files.add(out.read_bytes())
        assert sorted(p.name for p in out.parent.iterdir()) == ["detector.nb"]  # no work folder left behind
    assert len(files) == 1


@pytest.mark.parametrize("setarch", [None, "#!/bin/sh\necho 'setarch: failed to set personality' >&2\nexit 1\n"])
def test_without_a_usable_setarch_opt_gets_no_prefix_and_a_warning(setarch, tmp_path, monkeypatch, caplog):
    from edge_shitu_converters import lite

    if setarch is not None:  # a sandbox that refuses the personality change
        fake = tmp_path / "setarch"
        fake.write_text(setarch)
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    lite._fixed_layout.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="edge_shitu_converters.lite"):
            assert lite._fixed_layout() == ()
        assert "setarch -R is not available" in caplog.text
    finally:
        lite._fixed_layout.cache_clear()


@pytest.mark.paddle
def test_x86_fp32_bundle_runs_in_paddle_lite_like_paddle_inference(
    lite_bundles, replica_dirs, lite_python, test_images, tmp_path
):
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.convert import cut_detector_heads
    from edge_shitu.bundle import Bundle

    bundle = Bundle.load(lite_bundles["x86"])
    rec, det = bundle.extractor, bundle.detector

    x = _photos(test_images[:2], rec.input)
    names, lite_out = _run_in_lite(lite_python, rec.path, x, tmp_path)
    assert names == {"inputs": [rec.input.name], "outputs": [rec.output.name]}
    predictor = paddle_io.create_predictor(paddle_io.find_model_files(replica_dirs["extractor"]))
    reference = paddle_io.run_predictor(predictor, {rec.input.name: x})[rec.output.name]
    np.testing.assert_allclose(lite_out[rec.output.name], reference, rtol=1e-4, atol=1e-5)

    image = _photos(test_images[:1], det.input)
    names, lite_out = _run_in_lite(lite_python, det.path, image, tmp_path)
    assert names == {"inputs": [det.input.name], "outputs": list(det.output.scores + det.output.boxes)}
    heads = cut_detector_heads(replica_dirs["detector"], tmp_path / "heads")
    reference = paddle_io.run_predictor(paddle_io.create_predictor(heads.files), {"image": image})
    for name in names["outputs"]:
        np.testing.assert_allclose(lite_out[name], reference[name], rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.paddle
def test_int8_x86_extractor_bundle(int8_x86_extractor, lite_bundles):
    from edge_shitu.backends.paddlelite import read_nb_targets
    from edge_shitu.bundle import Bundle

    manifest = json.loads((int8_x86_extractor / "manifest.json").read_text())
    assert manifest["name"] == "ppshituv2-rec-replica-s0-lite-x86-int8"
    model = manifest["models"]["extractor"]
    assert (model["backend"], model["target"], model["precision"]) == ("paddlelite", "x86", "int8")
    assert model["output"]["name"] == json.loads((lite_bundles["x86"] / "manifest.json").read_text())["models"][
        "extractor"]["output"]["name"]
    path = int8_x86_extractor / "extractor.nb"
    assert read_nb_targets(path) == frozenset({"x86"})
    assert path.stat().st_size < 0.35 * (lite_bundles["x86"] / "extractor.nb").stat().st_size
    Bundle.load(int8_x86_extractor).verify()


@pytest.mark.paddle
def test_int8_x86_extractor_stays_close_to_fp32(int8_x86_extractor, lite_bundles, lite_python, test_images, tmp_path):
    from edge_shitu.bundle import Bundle

    spec = Bundle.load(int8_x86_extractor).extractor
    x = _photos(test_images[:3], spec.input)
    _, fp32 = _run_in_lite(lite_python, lite_bundles["x86"] / "extractor.nb", x, tmp_path)
    names, int8 = _run_in_lite(lite_python, spec.path, x, tmp_path)
    assert names["outputs"] == [spec.output.name]
    a, b = fp32[spec.output.name], int8[spec.output.name]
    assert np.isfinite(b).all()
    cos = _cosines(a, b)
    assert (cos > 0.97).all() and (cos < 1 - 1e-6).all(), cos  # close, and really quantised


@pytest.mark.paddle
def test_int8_arm_detector_bundle(replica_dirs, opt, gallery, lite_bundles, tmp_path):
    """ARM INT8 cannot run here: checked structurally (targets, size, manifest) only."""
    from edge_shitu_converters.lite import convert_lite
    from edge_shitu.backends.paddlelite import read_nb_targets
    from edge_shitu.bundle import Bundle

    out = convert_lite(
        replica_dirs["detector"], None, tmp_path / "b", target="arm", precision="int8", calib_dir=gallery,
        calib_count=2, algo="AVG", opt=opt, skip=["conv2d_87.w_0"],
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "ppshitu-det-replica-s0-lite-arm-int8"
    assert manifest["models"]["detector"]["precision"] == "int8"
    quantization = manifest["models"]["detector"]["quantization"]
    assert quantization["tool"] == "paddleslim.quant_post_static" and quantization["algo"] == "avg"
    assert quantization["skip_tensors"] == ["conv2d_87.w_0"] and quantization["quantized_ops"] == 85
    assert read_nb_targets(out / "detector.nb") == frozenset({"arm"})
    assert (out / "detector.nb").stat().st_size < 0.35 * (lite_bundles["arm"] / "detector.nb").stat().st_size
    assert Bundle.load(out).detector.output.scores[0] == "scores_stride8"


@pytest.mark.paddle
def test_flatten_xshape_fix_keeps_paddle_outputs_identical(resaved_extractor, replica_dirs, tmp_path, rng):
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.lite import restore_flatten_xshape

    original = (replica_dirs["extractor"] / "inference.pdmodel").read_bytes()
    assert restore_flatten_xshape(original) == (original, 0)  # official programs keep XShape
    resaved = (resaved_extractor / "inference.pdmodel").read_bytes()
    assert _flatten_has_xshape(resaved) == [False, False]

    fixed, count = restore_flatten_xshape(resaved)
    assert count == 2
    assert _flatten_has_xshape(fixed) == [True, True]
    assert restore_flatten_xshape(fixed) == (fixed, 0)

    folder = tmp_path / "fixed"
    folder.mkdir()
    (folder / "inference.pdmodel").write_bytes(fixed)
    (folder / "inference.pdiparams").write_bytes((resaved_extractor / "inference.pdiparams").read_bytes())
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    outputs = []
    for model_dir in (resaved_extractor, folder):
        predictor = paddle_io.create_predictor(paddle_io.find_model_files(model_dir))
        (out,) = paddle_io.run_predictor(predictor, {"x": x}).values()
        outputs.append(out)
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.paddle
def test_opt_crash_is_a_conversion_error_and_the_fix_avoids_it(resaved_extractor, opt, tmp_path):
    from edge_shitu_converters.lite import restore_flatten_xshape, run_opt
    from edge_shitu.backends.paddlelite import read_nb_targets

    program, params = resaved_extractor / "inference.pdmodel", resaved_extractor / "inference.pdiparams"
    out = tmp_path / "nb" / "extractor.nb"
    with pytest.raises(ConversionError, match=r"(?s)opt \(arm\) on .*inference.pdmodel was killed by SIGSEGV.*Model is successfully loaded") as info:
        run_opt(program, params, out, target="arm", opt=opt)
    assert str(resaved_extractor) in str(info.value)
    assert list(out.parent.iterdir()) == []  # no partial file left behind

    fixed = tmp_path / "fixed.pdmodel"
    fixed.write_bytes(restore_flatten_xshape(program.read_bytes())[0])
    assert run_opt(fixed, params, out, target="arm", opt=opt) == out
    assert read_nb_targets(out) == frozenset({"arm"})
    assert sorted(p.name for p in out.parent.iterdir()) == ["extractor.nb"]  # not extractor.nb.nb


@pytest.mark.paddle
def test_convert_lite_restores_flatten_xshape_of_paddle3_saved_programs(resaved_extractor, opt, tmp_path):
    from edge_shitu_converters.lite import convert_lite
    from edge_shitu.backends.paddlelite import read_nb_targets

    out = convert_lite(None, resaved_extractor, tmp_path / "b", target="x86", opt=opt)
    assert read_nb_targets(out / "extractor.nb") == frozenset({"x86"})
    # The model folder itself is left as it was.
    assert _flatten_has_xshape((resaved_extractor / "inference.pdmodel").read_bytes()) == [False, False]


@pytest.mark.paddle
def test_corrupt_program_is_a_conversion_error(replica_dirs, opt, tmp_path, rng):
    from edge_shitu_converters.lite import convert_lite, run_opt

    corrupt = tmp_path / "inference.pdmodel"
    corrupt.write_bytes(rng.bytes(4096))
    with pytest.raises(ConversionError, match=r"opt \(x86\) on .*inference.pdmodel was killed by SIG.*log ends with"):
        run_opt(corrupt, replica_dirs["extractor"] / "inference.pdiparams", tmp_path / "x.nb", target="x86", opt=opt)
    with pytest.raises(InvalidInputError, match="must end in .nb"):
        run_opt(corrupt, corrupt, tmp_path / "x.bin", target="x86", opt=opt)
    with pytest.raises(MissingFileError, match="params file not found"):
        run_opt(corrupt, tmp_path / "absent", tmp_path / "x.nb", target="x86", opt=opt)

    # Inside convert_lite, the failure names the step and the model folder, and nothing is published.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "inference.pdmodel").write_bytes((replica_dirs["extractor"] / "inference.pdmodel").read_bytes())
    (broken / "inference.pdiparams").write_bytes(b"\0" * 64)
    with pytest.raises(ConversionError, match=r"step 'extractor: paddle_lite_opt arm' failed for .*broken"):
        convert_lite(None, broken, tmp_path / "out", target="arm", opt=opt)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "inference.pdmodel"]


def test_opt_is_found_on_path_and_a_non_executable_one_is_unavailable(tmp_path, monkeypatch):
    from edge_shitu_converters.lite import run_opt

    fake = tmp_path / "fake_opt"
    fake.write_text("#!/bin/sh\necho 'usage: paddle_lite_opt ...'\nexit 0\n")
    (tmp_path / "m.pdmodel").write_bytes(b"x")
    with pytest.raises(BackendUnavailableError, match="cannot run .*fake_opt: not an executable file"):
        run_opt(tmp_path / "m.pdmodel", tmp_path / "m.pdmodel", tmp_path / "m.nb", target="arm", opt=fake)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # A bare name is looked up on PATH, and a relative path is taken from here, not from opt's own work folder
    # (both run: this fake writes nothing).
    with pytest.raises(ConversionError, match="wrote no model"):
        run_opt(tmp_path / "m.pdmodel", tmp_path / "m.pdmodel", tmp_path / "m.nb", target="arm", opt="fake_opt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match="wrote no model"):
        run_opt(tmp_path / "m.pdmodel", tmp_path / "m.pdmodel", tmp_path / "m.nb", target="arm", opt="./fake_opt")


def test_opt_that_writes_nothing_is_a_conversion_error(tmp_path):
    from edge_shitu_converters.lite import run_opt

    fake = tmp_path / "opt"
    fake.write_text("#!/bin/sh\necho 'usage: paddle_lite_opt ...'\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "m.pdmodel").write_bytes(b"x")
    with pytest.raises(ConversionError, match="(?s)wrote no model.*usage: paddle_lite_opt"):
        run_opt(tmp_path / "m.pdmodel", tmp_path / "m.pdmodel", tmp_path / "m.nb", target="arm", opt=fake)


@pytest.mark.paddle
def test_int8_manifest_records_paddleslim(int8_x86_extractor, replica_dirs, lite_python):
    from edge_shitu_converters.lite import paddleslim_versions, quantizable_weights

    versions = paddleslim_versions(lite_python)
    manifest = json.loads((int8_x86_extractor / "manifest.json").read_text())
    assert manifest["tools"]["paddleslim"] == versions["paddleslim"]
    assert manifest["models"]["extractor"]["quantization"] == {
        "tool": "paddleslim.quant_post_static",
        "version": versions["paddleslim"],
        "paddlepaddle": versions["paddlepaddle"],
        "algo": "avg",
        "skip_tensors": [],
        "quantized_ops": len(quantizable_weights(replica_dirs["extractor"])),
        "calibration_images": 4,
        "calibration_folder": "gallery",
        "preprocessing": "edge_shitu runtime",
        "bias_correction": False,
    }


def _quantised_and_weights(model_dir: Path):
    """For each weight of a quantisable op: whether the op's output is dequantised (INT8 weights), and its values."""
    from edge_shitu_converters import paddle_io
    from edge_shitu_converters.lite import quantizable_weights

    model = paddle_io.load_inference_model(model_dir)
    block = model.program.global_block()
    consumers: dict = {}
    for op in block.ops:
        for name in op.input_arg_names:
            consumers.setdefault(name, []).append(op.type)
    weights = set(quantizable_weights(model_dir))
    quantised, values = {}, {}
    for op in block.ops:
        for name in (n for n in op.input_arg_names if n in weights):
            (out,) = op.output_arg_names
            quantised[name] = any(t.startswith("fake_") and "dequantize" in t for t in consumers.get(out, []))
            values[name] = np.array(model.scope.find_var(name).get_tensor())
    return quantised, values


def _fetch_names(model_dir: Path) -> list:
    from edge_shitu_converters import paddle_io

    return [v.name for v in paddle_io.load_inference_model(model_dir).fetch_targets]


@pytest.mark.paddle
def test_skip_list_keeps_those_weights_float(replica_dirs, lite_python, rng, tmp_path):
    from edge_shitu_converters.lite import quantizable_weights, quantize_post_training

    rec = replica_dirs["extractor"]
    names = quantizable_weights(rec)
    skip = [names[0], names[1], names[-1]]  # the stem conv, a depthwise conv, the last layer
    feeds = [{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)]
    result = quantize_post_training(rec, tmp_path / "q", feeds=feeds, algo="abs_max", skip=skip, python=lite_python)
    assert result.skip_tensors == tuple(skip) and result.algo == "abs_max"
    assert result.quantized_ops == len(names) - len(skip)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["inference.pdiparams", "inference.pdmodel"]

    quantised, values = _quantised_and_weights(tmp_path / "q")
    _, original = _quantised_and_weights(rec)
    # Paddle 2.6's save adds scale ops that rename the outputs; the worker removes them.
    assert _fetch_names(tmp_path / "q") == _fetch_names(rec) == ["batch_norm_25.tmp_2"]
    assert sorted(quantised) == sorted(names)
    for name in names:
        if name in skip:
            assert not quantised[name], name
            np.testing.assert_array_equal(values[name], original[name], err_msg=name)
        else:
            assert quantised[name], name
            # Weights stored as INT8 levels (in float32) in the fake-quant format.
            assert np.array_equal(values[name], np.round(values[name])) and np.abs(values[name]).max() <= 127, name


@pytest.mark.paddle
def test_bias_correction_keeps_whole_int8_levels_and_moves_some(replica_dirs, lite_python, rng, tmp_path):
    """paddleslim's bias correction changes the quantised weights, which stay whole INT8 levels (what `opt` compiles;
    paddleslim's AdaRound is not offered because it saves fractional ones in this format)."""
    from edge_shitu_converters.lite import quantizable_weights, quantize_post_training

    rec = replica_dirs["extractor"]
    names = quantizable_weights(rec)
    keep = names[1:4]  # a depthwise and two pointwise convolutions; the rest float, for speed
    skip = [n for n in names if n not in keep]
    feeds = [{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)]
    levels = {}
    for corrected in (False, True):
        quantize_post_training(rec, tmp_path / str(corrected), feeds=feeds, skip=skip, bias_correction=corrected,
                               python=lite_python)
        quantised, values = _quantised_and_weights(tmp_path / str(corrected))
        assert sorted(n for n in quantised if quantised[n]) == sorted(keep)
        levels[corrected] = {n: values[n] for n in keep}
    moved = 0
    for name in keep:
        plain, corrected = levels[False][name], levels[True][name]
        assert np.array_equal(corrected, np.round(corrected)) and np.abs(corrected).max() <= 127, name
        moved += int(np.count_nonzero(plain != corrected))
    assert moved > 0


@pytest.mark.paddle
def test_skip_names_are_checked_against_the_models_before_any_work(replica_dirs, opt, lite_python, gallery, tmp_path):
    from edge_shitu_converters.lite import convert_lite

    both = {"target": "arm", "precision": "int8", "calib_dir": gallery, "opt": opt, "python": lite_python}
    det, rec = replica_dirs["detector"], replica_dirs["extractor"]
    cases = [
        (det, rec, ["conv2d_0.w_0"], "a weight of both the detector and the extractor: write detector:conv2d_0.w_0"),
        (None, rec, ["extractor:absent.w_0"], "skip names extractor:absent.w_0, which is not a weight of a quantised "
                                              "op .* in the extractor; expected names like extractor:conv2d_0.w_0"),
        (None, rec, ["detector:conv2d_0.w_0"], "no detector is being converted"),
        (None, rec, ["batch_norm2d_0.w_0"], "not a weight of a quantised op"),
    ]
    for det_dir, rec_dir, skip, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            convert_lite(det_dir, rec_dir, tmp_path / "out", skip=skip, **both)
        assert not (tmp_path / "out").exists()


@pytest.mark.paddle
def test_a_side_environment_without_paddleslim_is_refused_in_one_line(replica_dirs, opt, gallery, tmp_path):
    import sys

    from edge_shitu_converters.lite import convert_lite

    # This environment's own Python has Paddle 3 but no paddleslim (which would pin numpy < 2 and OpenCV 4.6).
    with pytest.raises(BackendUnavailableError, match="cannot quantise .*paddleslim.*run scripts/setup-lite-env") as info:
        convert_lite(None, replica_dirs["extractor"], tmp_path / "out", target="x86", precision="int8",
                     calib_dir=gallery, opt=opt, python=sys.executable)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_converter_does_not_depend_on_paddleslim_or_its_pins():
    from importlib import metadata

    requirements = " ".join(metadata.requires("edge-shitu") or []).lower()
    assert "paddleslim" not in requirements and "opencv-python==4.6" not in requirements
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("paddleslim")


def test_cli_lite_skip(tmp_path):
    import io

    from edge_shitu.cli import main

    base = ["convert", "--rec", str(tmp_path), "--out", str(tmp_path / "out"), "--precision", "int8",
            "--calib", str(tmp_path)]
    for extra, message in ((["--format", "lite-arm", "--lite-skip", "conv2d_0.w_0,,conv2d_1.w_0"],
                            "--lite-skip takes comma-separated names without empty ones"),
                           (["--format", "onnx", "--lite-skip", "conv2d_0.w_0"],
                            "lite_skip is for the Paddle-Lite formats, not onnx")):
        err = io.StringIO()
        assert main(base + extra, stdout=io.StringIO(), stderr=err) == 2
        assert message in err.getvalue()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    # An option of the other format is refused, not dropped.
    (["--format", "onnx", "--precision", "int8", "--lite-algo", "hist"],
     "lite_algo is for the Paddle-Lite formats, not onnx"),
    (["--format", "onnx", "--precision", "int8", "--lite-bias-correction"],
     "lite_bias_correction is for the Paddle-Lite formats"),
    (["--format", "lite-arm", "--precision", "int8", "--calib-method", "percentile"],
     "calib_method and quant_mode are for onnx int8 bundles"),
    (["--format", "lite-arm", "--lite-bias-correction"], "bias_correction is for int8 bundles"),
    (["--format", "lite-arm", "--precision", "int8", "--lite-qat", "2", "--lite-bias-correction"],
     "bias_correction is a post-training quantisation setting"),
])
def test_cli_quantisation_options_of_another_format_or_precision_are_refused(tmp_path, extra, message):
    import io

    from edge_shitu.cli import main

    err = io.StringIO()
    calib = ["--calib", str(tmp_path)] if "int8" in extra else []
    assert main(["convert", "--rec", str(tmp_path), "--out", str(tmp_path / "out"), *calib, *extra],
                stdout=io.StringIO(), stderr=err) == 2
    assert message in err.getvalue().strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_bias_correction_is_checked_before_any_work(tmp_path):
    from edge_shitu_converters.lite import convert_lite, quantize_post_training

    match = "bias_correction must be True or False"
    with pytest.raises(InvalidInputError, match=match):
        convert_lite(None, tmp_path, tmp_path / "out", target="arm", precision="int8", calib_dir=tmp_path,
                     bias_correction=1)
    with pytest.raises(InvalidInputError, match=match):
        quantize_post_training(tmp_path / "absent", tmp_path / "q", feeds=[{"x": np.zeros((1, 3, 4, 4), np.float32)}],
                               bias_correction=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()
