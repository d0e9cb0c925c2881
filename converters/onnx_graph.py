"""Helpers for ONNX graphs: an index for the converter's rewrites (who produces and who reads each tensor,
the initializers as arrays, fresh names; :mod:`edge_shitu_converters.integer_ops`,
:mod:`edge_shitu_converters.kernel_shapes`), and constants turned into initializers (the quantiser, the
benchmark's MAC count)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set

import numpy as np

__all__ = ["GraphIndex", "constants_to_initializers", "drop_unread"]


class GraphIndex:
    """Producer/consumer maps, initializers and names of one ``onnx.ModelProto``'s main graph.

    The maps are built once: a rewrite that adds or removes nodes must not rely on them afterwards
    (changing an initializer's values through :meth:`set_array` keeps them valid).

    Attributes:
      graph: the model's ``GraphProto``.
      inits: initializer name -> ``TensorProto``.
      producer: tensor name -> the node that writes it.
      consumers: tensor name -> the nodes that read it, in graph order (a node reading it twice is listed twice).
      boundary: names of the graph's inputs and outputs.
      has_subgraphs: some node holds a subgraph (``If``, ``Loop``, ``Scan``), whose reads of outer tensors the
        maps do not see; rewrites that rely on :attr:`consumers` leave such graphs alone.
    """

    def __init__(self, model: Any) -> None:
        from onnx import AttributeProto, numpy_helper

        self._np = numpy_helper
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: Dict[str, List[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.boundary = {v.name for v in self.graph.input} | {v.name for v in self.graph.output}
        self.has_subgraphs = any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
                                 for node in self.graph.node for a in node.attribute)
        self._taken = ({n.name for n in self.graph.node} | set(self.producer) | set(self.inits) | self.boundary
                       | {v.name for v in self.graph.value_info})
        self._arrays: Dict[str, np.ndarray] = {}

    def array(self, name: str) -> Optional[np.ndarray]:
        """The values of initializer ``name`` (converted once; read-only), or None when it is not one."""
        if name not in self._arrays:
            init = self.inits.get(name)
            if init is None:
                return None
            value = self._np.to_array(init)
            value.setflags(write=False)
            self._arrays[name] = value
        return self._arrays[name]

    def scalar(self, name: str) -> Optional[np.ndarray]:
        """The values of initializer ``name`` when it holds exactly one value, else None."""
        value = self.array(name)
        return value if value is not None and value.size == 1 else None

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace the values of initializer ``name`` (its dtype is ``value``'s)."""
        self.inits[name].CopyFrom(self._np.from_array(value, name))
        self._arrays.pop(name, None)

    def fresh(self, base: str) -> str:
        """A name no node, tensor or initializer of the graph has (``base``, then ``base_``, ...); it is taken."""
        name = base
        while name in self._taken:
            name += "_"
        self._taken.add(name)
        return name


def constants_to_initializers(model: Any, *, identities: bool = False) -> int:
    """Turn tensor-valued ``Constant`` nodes into initializers of the same name (in place).

    paddle2onnx feeds every weight and ``Reshape`` target through a ``Constant``: onnxruntime's quantiser
    stores only initializers in int8, and onnx's shape inference does not see through them.

    Args:
      model: an ``onnx.ModelProto``.
      identities: also fold an ``Identity`` of a constant (paddle2onnx writes ``Constant -> Identity``); an
        initializer that is also a graph input is no constant.

    Returns:
      How many nodes became initializers.
    """
    from onnx import numpy_helper

    graph = model.graph
    # An initializer that is also a graph input is a default the caller may override: not a constant.
    values = {t.name: t for t in graph.initializer}
    constants = set(values) - {i.name for i in graph.input}
    kept, moved = [], 0
    for node in graph.node:
        value = None
        if node.domain in ("", "ai.onnx"):
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                value = numpy_helper.to_array(node.attribute[0].t)
            elif identities and node.op_type == "Identity" and node.input[0] in constants:
                value = numpy_helper.to_array(values[node.input[0]])
        if value is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(np.asarray(value), node.output[0])
        graph.initializer.append(tensor)
        constants.add(node.output[0])
        values[node.output[0]] = tensor
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def drop_unread(graph: Any, *, nodes: Optional[Iterable[str]] = None, initializers: Optional[Iterable[str]] = None
                ) -> None:
    """Remove, until none is left, the nodes whose outputs no node reads and no graph output is; then the
    initializers no node reads; and the shapes recorded for the tensors that went (in place).

    Only reads by the main graph's nodes count: a caller with subgraphs (``If``, ``Loop``) must not rely on it.

    Args:
      graph: an ``onnx.GraphProto``.
      nodes: first outputs of the nodes that may go; None: any node.
      initializers: names of the initializers that may go; None: any.
    """
    may_go = None if nodes is None else set(nodes)
    outputs = {o.name for o in graph.output}
    gone: Set[str] = set()
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        kept = [n for n in graph.node
                if any(o in read for o in n.output) or (may_go is not None and n.output[0] not in may_go)]
        if len(kept) == len(graph.node):
            break
        gone |= {o for n in graph.node for o in n.output} - {o for n in kept for o in n.output}
        del graph.node[:]
        graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input} | outputs
    inits_may_go = None if initializers is None else set(initializers)
    for field, dropped in ((graph.initializer, lambda i: i.name not in read and (
            inits_may_go is None or i.name in inits_may_go)), (graph.value_info, lambda v: v.name in gone)):
        kept_items = [item for item in field if not dropped(item)]
        if len(kept_items) != len(field):
            del field[:]
            field.extend(kept_items)
