"""Accuracy-aware INT8 (edge_shitu_converters.int8_search, issue 17): blocks of a graph against an oracle, the
blocks' noise, and the search for the fewest float blocks against a linear scan of every candidate, on small real
ONNX models quantised by onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization needs ml_dtypes")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_shitu.errors import InvalidInputError  # noqa: E402
from edge_shitu_converters.int8_search import parse_int8_layers, rank_blocks, search_int8  # noqa: E402
from edge_shitu_converters.quantize import (  # noqa: E402
    TAIL_WEIGHTS,
    ModelQuantizer,
    QuantizeOptions,
    compare_outputs,
    quantizable_blocks,
)
from test_quantize import _spec, _write_photos  # noqa: E402

DEPTH = 6


def _chain_model(path: Path, rng: np.random.Generator, depth: int = DEPTH) -> Path:
    """x (N,3,16,16) -> depth x [conv 3x3 (8 ch) -> LeakyRelu -> HardSigmoid gate Mul] -> GAP -> flatten = "feat".

    The blocks differ in scale (some convs have much larger weights), so their quantisation noise differs."""
    nodes, inits = [], []
    prev, channels = "x", 3
    for i in range(depth):
        scale = 0.4 if i % 3 else 1.5
        inits += [numpy_helper.from_array(rng.normal(0, scale, (8, channels, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node("LeakyRelu", [f"c{i}"], [f"a{i}"], name=f"act{i}", alpha=0.1),
            helper.make_node("HardSigmoid", [f"a{i}"], [f"g{i}"], name=f"gate{i}"),
            helper.make_node("Mul", [f"a{i}", f"g{i}"], [f"m{i}"], name=f"mul{i}"),
        ]
        prev, channels = f"m{i}", 8
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["pool"], name="gap"),
              helper.make_node("Flatten", ["pool"], ["feat"], name="flatten")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 8])], inits)
    return _save(graph, path)


def _save(graph, path: Path) -> Path:
    """Writes ``graph`` as an opset-13 model, as the converter's quantiser takes it."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def chain(tmp_path, rng) -> Path:
    return _chain_model(tmp_path / "chain.onnx", rng)


@pytest.fixture
def photos(tmp_path, rng) -> Path:
    root = tmp_path / "photos"
    _write_photos(root, rng, n=12)
    return root


def _quantizer(chain, photos, tmp_path, name="q", **overrides) -> ModelQuantizer:
    work = tmp_path / name
    work.mkdir()
    options = QuantizeOptions(**{"calib_count": 8, "calib_batch": 4, "method": "minmax", "float_tail": 0, **overrides})
    return ModelQuantizer.prepare(chain, work, input_spec=_spec(), calib_dir=photos, options=options)


def _blocks_oracle(model, float_nodes):
    """Slow and obvious: a plain node belongs to the first weighted node (in graph order) from which a path of plain
    nodes leads to it; a weighted node heads its own block; float nodes and nodes no weighted node reaches belong
    to none."""
    weighted = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    nodes = list(model.graph.node)
    children = {n.name: [c for c in nodes if set(n.output) & set(c.input)] for n in nodes}

    def reaches(start, goal):
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            for child in children[node.name]:
                if child.name in seen or child.name in float_nodes:
                    continue
                if child.name == goal.name:
                    return True
                if child.op_type not in weighted:
                    seen.add(child.name)
                    stack.append(child)
        return False

    heads = [n for n in nodes if n.op_type in weighted and n.name not in float_nodes]
    blocks = {h.name: [h.name] for h in heads}
    for node in nodes:
        if node.op_type in weighted or node.name in float_nodes:
            continue
        owner = next((h for h in heads if reaches(h, node)), None)
        if owner is not None:
            blocks[owner.name].append(node.name)
    return {k: tuple(v) for k, v in blocks.items()}


def test_blocks_match_the_oracle(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    assert q.blocks == _blocks_oracle(q.model, set(q.tail))
    assert list(q.blocks) == [f"conv{i}" for i in range(DEPTH)]
    assert q.blocks["conv2"] == ("conv2", "act2", "gate2", "mul2")
    # The tail (ops after the last weighted layer, float_tail=0) joins no block.
    last = DEPTH - 1
    assert set(q.tail) == {f"act{last}", f"gate{last}", f"mul{last}", "gap", "flatten"}
    assert q.blocks[f"conv{last}"] == (f"conv{last}",) and not set(q.tail) & {n for b in q.blocks.values() for n in b}


def test_blocks_of_a_branching_graph_match_the_oracle(rng):
    # conv a feeds two branches that meet again; conv b sits on one of them: its successors are b's block.
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"], name="a"),
             helper.make_node("Relu", ["ca"], ["ra"], name="ra"),
             helper.make_node("Conv", ["ra", "wb"], ["cb"], name="b"),
             helper.make_node("Sigmoid", ["ra"], ["sa"], name="sa"),
             helper.make_node("Add", ["cb", "sa"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="out")]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "wb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph)
    got = quantizable_blocks(model, [])
    assert got == _blocks_oracle(model, set())
    assert got == {"a": ("a", "ra", "sa", "add", "out"), "b": ("b",)}
    assert quantizable_blocks(model, ["out"]) == {"a": ("a", "ra", "sa", "add"), "b": ("b",)}


def test_block_damage_ranks_blocks_and_adds_up(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    feeds = q.probe_feeds(2)
    ranking = rank_blocks(q, feeds)
    assert sorted(d.block for d in ranking) == sorted(q.blocks)
    shares = [d.noise_share for d in ranking]
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) - 1) < 1e-9
    assert all(np.isfinite(d.sqnr_db) for d in ranking)
    # Keeping the most damaging half float leaves less noise than keeping the least damaging half float.
    half = len(ranking) // 2
    worst, best = [d.block for d in ranking[:half]], [d.block for d in ranking[-half:]]
    q.quantize(tmp_path / "worst.onnx", float_blocks=worst)
    q.quantize(tmp_path / "best.onnx", float_blocks=best)
    sqnr = {name: compare_outputs(chain, tmp_path / f"{name}.onnx", feeds)["feat"].sqnr_db for name in ("worst", "best")}
    assert sqnr["worst"] > sqnr["best"], sqnr


def _sqnr_check(chain, feeds, threshold):
    calls = []

    def check(path):
        value = compare_outputs(chain, path, feeds)["feat"].sqnr_db
        calls.append(value)
        passed = value >= threshold
        return passed, [] if passed else [f"sqnr {value:.2f} < {threshold:.2f}"], {"sqnr_db": value}

    return check, calls


def test_search_finds_the_fewest_float_blocks_that_pass(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    feeds = q.probe_feeds(2)
    ranking = rank_blocks(q, feeds)
    names = [d.block for d in ranking]
    # Oracle: every candidate, 0..all blocks float, in order.
    scan = []
    for k in range(len(names)):
        q.quantize(tmp_path / f"k{k}.onnx", float_blocks=names[:k])
        scan.append(compare_outputs(chain, tmp_path / f"k{k}.onnx", feeds)["feat"].sqnr_db)
    # A threshold between two candidates that are not the first: the smallest passing k is that second one.
    want = next(k for k in range(2, len(scan)) if scan[k] > max(scan[:k]))
    threshold = (max(scan[:want]) + scan[want]) / 2
    smallest = next(k for k in range(len(scan)) if scan[k] >= threshold)
    check, calls = _sqnr_check(chain, feeds, threshold)
    result = search_int8(q, tmp_path / "out.onnx", check, ranking=ranking)
    assert result.chosen is not None and result.chosen.float_blocks == smallest
    assert result.float_blocks == tuple(names[:smallest])
    tried = [s.float_blocks for s in result.steps]
    assert tried[0] == 0 and len(tried) == len(set(tried)) and len(tried) <= len(names)
    assert all(s.passed == (scan[s.float_blocks] >= threshold) for s in result.steps)
    # One verification per candidate, none repeated, and one of each part of the failing all-INT8 model.
    assert set(result.parts) == {"weights", "activations"} and len(calls) == len(tried) + 2
    # The written model is the chosen candidate, byte for byte.
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / f"k{smallest}.onnx").read_bytes()
    record = json.loads(json.dumps(result.record()))
    assert record["chosen"] == smallest and record["float_blocks"] == names[:smallest]
    assert record["float_weights"] == [f"w{name[len('conv'):]}" for name in names[:smallest]]
    assert [r["block"] for r in record["ranking"]] == names and len(record["steps"]) == len(tried)
    assert all(s["int8_bytes"] > 0 and s["ms"] > 0 for s in record["steps"])


def test_search_stops_at_once_when_everything_quantised_passes(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    check, calls = _sqnr_check(chain, q.probe_feeds(1), threshold=-1000.0)
    result = search_int8(q, tmp_path / "out.onnx", check)
    assert [s.float_blocks for s in result.steps] == [0] and result.float_blocks == ()


def test_search_without_a_passing_candidate(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    steps = []
    result = search_int8(q, tmp_path / "out.onnx", lambda path: (False, ["never"], {}), on_step=steps.append)
    # Up to every block but one (an INT8 model keeps one block INT8 at least).
    assert result.chosen is None and [s.float_blocks for s in result.steps] == [0, 1, 2, 4, DEPTH - 1]
    assert steps == list(result.steps) and result.float_blocks == tuple(d.block for d in result.ranking[:-1])
    last = result.ranking[-1]
    assert set(result.report.float_nodes) >= {n for b in q.blocks.values() for n in b} - set(last.nodes)


def test_the_float_tails_int8_weights_are_a_unit_of_their_own(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path, float_tail=1)
    ranking = rank_blocks(q, q.probe_feeds(2))
    units = {d.block: d for d in ranking}
    assert set(units) == set(q.blocks) | {TAIL_WEIGHTS} and units[TAIL_WEIGHTS].nodes == (f"conv{DEPTH - 1}",)
    assert units[TAIL_WEIGHTS].sqnr_db > 0
    assert q.quantize(tmp_path / "a.onnx").weight_only_nodes == (f"conv{DEPTH - 1}",)
    assert q.quantize(tmp_path / "b.onnx", float_blocks=[TAIL_WEIGHTS]).weight_only_nodes == ()
    # However the tail's weights rank (first, among the blocks, last), the search never keeps every block float,
    # and what it reports float is what the written model keeps float.
    tail = units[TAIL_WEIGHTS]
    blocks = [d for d in ranking if d is not tail]
    for order in ([tail] + blocks, blocks[:2] + [tail] + blocks[2:], blocks + [tail]):
        out = tmp_path / "out.onnx"
        result = search_int8(q, out, lambda path: (False, ["never"], {}), ranking=order)
        assert result.chosen is None and len(set(q.blocks) - set(result.float_blocks)) == 1
        written = q.quantize(tmp_path / "same.onnx", float_blocks=list(result.float_blocks))
        assert result.report.float_nodes == written.float_nodes and out.read_bytes() == (tmp_path / "same.onnx").read_bytes()


def test_a_first_candidate_checked_by_the_caller_is_not_quantised_or_checked_again(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    out = tmp_path / "out.onnx"
    q.quantize(out)
    checked = []

    def check(path):
        checked.append(path)
        return False, ["never"], {}

    quantized = []
    real = q.quantize
    q.quantize = lambda path, float_blocks=(): quantized.append(len(float_blocks)) or real(path, float_blocks=float_blocks)
    result = search_int8(q, out, check, first=(False, ["as built"], {"x": 1.0}))
    assert result.steps[0].failures == ("as built",) and result.steps[0].figures == {"x": 1.0}
    # Every later step is checked once, and each part of the failing first candidate.
    assert len(checked) == len(result.steps) - 1 + len(result.parts) and set(result.parts) == {"weights", "activations"}
    assert quantized and 0 not in quantized  # every quantisation keeps some block float: none redoes step 0


def test_unknown_float_block_and_budget_values(chain, photos, tmp_path):
    q = _quantizer(chain, photos, tmp_path)
    with pytest.raises(InvalidInputError, match="no quantisable block named nosuch"):
        q.quantize(tmp_path / "x.onnx", float_blocks=["nosuch"])
    assert [parse_int8_layers(v) for v in ("auto", "all", "3", 0, 5)] == ["auto", "all", 3, 0, 5]
    for bad in ("some", -1, True, 1.5, "-2"):
        with pytest.raises(InvalidInputError, match="int8_layers"):
            parse_int8_layers(bad)


def test_convert_flag_is_checked(tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli("convert", "--rec", tmp_path, "--out", tmp_path / "b", "--precision", "int8",
                           "--int8-layers", "many")
    assert code == 2 and "--int8-layers" in err and "must be 'auto', 'all' or a whole number" in err
    for fmt in ("onnx", "lite-x86"):
        code, _, err = run_cli("convert", "--rec", tmp_path, "--out", tmp_path / "b", "--format", fmt,
                               "--int8-layers", "3")
        assert code == 2 and "int8_layers is for int8 bundles" in err


def test_an_onnxruntime_without_a_calibration_cache_calibrates_each_time_and_says_so(chain, photos, tmp_path,
                                                                                      monkeypatch, caplog):
    import edge_shitu_converters.quantize as quantize_module

    q = _quantizer(chain, photos, tmp_path)
    reads = []
    real_reader = quantize_module._reader

    def counting_reader(feeds):
        reader = real_reader(feeds)
        real_next = reader.get_next
        reader.get_next = lambda: (reads.append(1), real_next())[1]
        return reader

    monkeypatch.setattr(quantize_module, "_reader", counting_reader)
    q.quantize(tmp_path / "first.onnx")
    calibrated = len(reads)
    cached = q.quantize(tmp_path / "cached.onnx", float_blocks=["conv1"])
    assert calibrated > 0 and len(reads) == calibrated  # the cache: the second quantisation read no photo
    monkeypatch.setattr(quantize_module, "_quantize_static_accepts_cache", lambda module: False)
    fresh = _quantizer(chain, photos, tmp_path, name="fresh")
    with caplog.at_level("WARNING", logger="edge_shitu_converters.quantize"):
        fresh.quantize(tmp_path / "a.onnx")
        after_first = len(reads)
        again = fresh.quantize(tmp_path / "b.onnx", float_blocks=["conv1"])
    assert after_first > calibrated and len(reads) > after_first  # each quantisation calibrated
    warnings = [r for r in caplog.records if "cannot reuse a calibration" in r.getMessage()]
    assert len(warnings) == 1 and str(chain) in warnings[0].getMessage()
    # Calibrating again gives the same ranges: the same model as with the cache.
    assert again.output.read_bytes() == cached.output.read_bytes()
