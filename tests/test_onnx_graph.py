"""ONNX graph helpers (edge_shitu_converters.onnx_graph): constants folded into initializers, and the graph index
the converter's rewrites share."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_shitu_converters.onnx_graph import GraphIndex, constants_to_initializers, drop_unread  # noqa: E402


def _model(nodes, inputs=("x",), initializers=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _const(name, values):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, np.float32)))


def test_constants_become_initializers_and_identities_of_them_on_request():
    nodes = [_const("c", [1, 2]), helper.make_node("Identity", ["c"], ["i"]),
             helper.make_node("Add", ["x", "i"], ["y"])]
    plain = _model(nodes)
    assert constants_to_initializers(plain) == 1
    assert [n.op_type for n in plain.graph.node] == ["Identity", "Add"]
    assert numpy_helper.to_array(plain.graph.initializer[0]).tolist() == [1, 2]
    folded = _model(nodes)
    assert constants_to_initializers(folded, identities=True) == 2
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert {i.name for i in folded.graph.initializer} == {"c", "i"}
    onnx.checker.check_model(folded)


def test_a_constant_of_another_form_or_domain_and_an_overridable_input_stay():
    """``value_float`` Constants are not tensors of ``value``; an initializer that is also a graph input is a default
    the caller may feed, so an Identity of it is no constant."""
    nodes = [helper.make_node("Constant", [], ["f"], value_float=2.0),
             helper.make_node("Identity", ["d"], ["i"]),
             helper.make_node("Constant", [], ["o"], domain="custom.domain",
                              value=numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Add", ["x", "i"], ["y"])]
    model = _model(nodes, inputs=("x", "d"), initializers=[numpy_helper.from_array(np.ones(2, np.float32), "d")])
    before = model.SerializeToString()
    assert constants_to_initializers(model, identities=True) == 0
    assert model.SerializeToString() == before


def test_graph_index_maps_fresh_names_and_subgraphs():
    nodes = [_const("c", [3.0]), helper.make_node("Add", ["x", "c"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "a"], ["y"], name="mul")]
    model = _model(nodes, initializers=[numpy_helper.from_array(np.array([1, 2], np.int8), "w")])
    index = GraphIndex(model)
    assert index.producer["a"].name == "add" and [n.name for n in index.consumers["a"]] == ["mul", "mul"]
    assert index.boundary == {"x", "y"} and not index.has_subgraphs
    assert index.scalar("w") is None and index.array("w").tolist() == [1, 2] and index.array("a") is None
    index.set_array("w", np.array([5], np.int8))
    assert index.scalar("w").tolist() == [5]
    assert index.fresh("add") == "add_" and index.fresh("add") == "add__" and index.fresh("new") == "new"
    branch = helper.make_graph([helper.make_node("Identity", ["a"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["picked"], then_branch=branch, else_branch=branch))
    assert GraphIndex(model).has_subgraphs


def test_drop_unread_removes_only_what_nothing_reads_within_its_candidates():
    """A chain nothing reads goes link by link; a graph output and a read tensor stay; only candidates may go;
    recorded shapes of the tensors that went go with them."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"), helper.make_node("Relu", ["a"], ["b"], name="b"),
             helper.make_node("Relu", ["x"], ["c"], name="c"), helper.make_node("Relu", ["x"], ["y"], name="y"),
             helper.make_node("Relu", ["w"], ["d"], name="d")]
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("w", "unused", "kept")]
    model = _model(nodes, initializers=inits)
    model.graph.value_info.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "c")])
    scoped = onnx.ModelProto()
    scoped.CopyFrom(model)
    drop_unread(scoped.graph, nodes=["a", "b", "d"], initializers=["unused", "w"])
    assert [n.name for n in scoped.graph.node] == ["c", "y"]
    assert [i.name for i in scoped.graph.initializer] == ["kept"]
    assert [v.name for v in scoped.graph.value_info] == ["c"]
    drop_unread(model.graph)
    assert [n.name for n in model.graph.node] == ["y"] and not model.graph.initializer and not model.graph.value_info
