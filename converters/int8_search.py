"""Accuracy-aware INT8: the fastest quantisation of one bundle model that still passes ``convert --verify``.

Quantising every activation of the PP-ShiTu detector to 8 bits moves its boxes too far from the fp32
model's (``docs/benchmarks.md``). The search keeps part of the model float, the part that does the most
damage, and no more than needed:

1. Each block of :func:`~edge_shitu_converters.quantize.quantizable_blocks` (a weighted layer and the
   plain ops after it) is quantised *alone* and the float model's outputs on a few calibration photos
   are compared with the result (:meth:`ModelQuantizer.block_damage`). Quantisation noise of separate
   tensors adds up, so the blocks are ranked by their output noise, most damaging first.
2. The model is quantised with the first ``k`` blocks of that ranking kept float, for ``k = 0, 1, 2, 4,
   8, ...`` up to every block but one (an INT8 model keeps one INT8 block at least), until a candidate
   passes the verification (``check``: ``convert --verify``'s comparison with Paddle Inference on photos
   separate from the calibration ones); then
   ``k`` is bisected between the last failure and the first pass. Fewer float blocks is faster, so the
   smallest passing ``k`` is the fastest candidate that passes.

When every block INT8 fails, the two halves of its error are also verified apart, once
(:meth:`ModelQuantizer.quantize_part`): the model with only its weights INT8, and the model with only its
activations INT8. Weights alone failing means no calibration can make the whole model pass: only float
blocks can.

Every step tried is recorded (float blocks, size, inference time on one thread, the verification's
figures), and so is the ranking: ``verify.json`` and the manifest say which blocks stayed float and why.
On a replica (random weights) the ranking and the blocks kept float are those of the replica; real
weights may need another set, which the same command finds.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from edge_shitu.backends.onnxruntime import session_options
from edge_shitu.errors import InvalidInputError
from edge_shitu_converters.int8_parts import INT8_PARTS
from edge_shitu_converters.quantize import TAIL_WEIGHTS, BlockDamage, ModelQuantizer, QuantReport

__all__ = ["INT8_LAYERS", "SearchStep", "SearchResult", "parse_int8_layers", "search_int8", "rank_blocks",
           "fewest_passing", "block_weights", "verify_parts"]

_LOG = logging.getLogger(__name__)

INT8_LAYERS = ("auto", "all")
"""Named budgets of ``--int8-layers``; a whole number ``N`` keeps the ``N`` most damaging blocks float."""

# Calibration feeds the blocks are ranked on, and timing runs per candidate (median taken).
_PROBE_FEEDS = 3
_TIMING_RUNS = 3

Check = Callable[[Path], Tuple[bool, Sequence[str], Mapping[str, Any]]]


def parse_int8_layers(value: object) -> Union[str, int]:
    """``"auto"``, ``"all"`` or a whole number of blocks to keep float.

    Raises:
      InvalidInputError: anything else.
    """
    if isinstance(value, str) and value in INT8_LAYERS:
        return value
    if isinstance(value, bool):
        raise InvalidInputError(f"int8_layers must be 'auto', 'all' or a whole number, got {value!r}")
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise InvalidInputError(f"int8_layers must be 'auto', 'all' or a whole number of blocks kept float, got {value!r}")


@dataclass(frozen=True)
class SearchStep:
    """One candidate the search tried.

    Attributes:
      float_blocks: how many of the ranked blocks stayed float.
      passed: whether the candidate passed the verification.
      failures: the verification's failures for this model (empty when it passed).
      figures: the verification's figures for this model (e.g. match rate, cosine).
      int8_bytes: size of the candidate model file (None when the candidate is not the deployed file:
        :mod:`edge_shitu_converters.lite_search` checks a fake-quantisation program).
      ms: median inference time of one input on one thread (a detector photo or an extractor batch); None
        when not timed (Paddle-Lite candidates).
    """

    float_blocks: int
    passed: bool
    failures: Tuple[str, ...]
    figures: Mapping[str, Any]
    int8_bytes: Optional[int]
    ms: Optional[float]

    def record(self) -> Dict[str, Any]:
        """A JSON-ready copy, as in ``verify.json``."""
        return {**asdict(self), "failures": list(self.failures), "figures": dict(self.figures)}


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_int8` found.

    Attributes:
      ranking: every block, most damaging first.
      steps: the candidates tried, in order.
      chosen: the passing step written to the output (None when even the most float one failed).
      written: how many of the ranking's first units the written model keeps float (the chosen step's, else
        the most float candidate's).
      report: the :class:`QuantReport` of the written model.
      weights: block -> the name of its weighted layer's weight, which paddle2onnx keeps from the Paddle
        program (e.g. ``conv2d_24.w_0``): the same blocks can be kept float in a Paddle-Lite conversion
        (``--lite-skip``).
      parts: when every block INT8 failed: ``"weights"``/``"activations"`` -> the verification of the model with
        only that part INT8 (:func:`verify_parts`); empty otherwise.
    """

    ranking: Tuple[BlockDamage, ...]
    steps: Tuple[SearchStep, ...]
    chosen: Optional[SearchStep]
    written: int
    report: QuantReport
    weights: Mapping[str, str]
    parts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def float_blocks(self) -> Tuple[str, ...]:
        """Names of the blocks the written model keeps float."""
        return tuple(d.block for d in self.ranking[:self.written])

    def record(self) -> Dict[str, Any]:
        """A JSON-ready summary for ``verify.json`` and the manifest."""
        return {
            "blocks": len(self.ranking),
            "float_blocks": list(self.float_blocks),
            "float_weights": [self.weights[b] for b in self.float_blocks if b in self.weights],
            "ranking": [{"block": d.block, "nodes": len(d.nodes), **d.record()} for d in self.ranking],
            "steps": [s.record() for s in self.steps],
            "chosen": None if self.chosen is None else self.chosen.float_blocks,
            "int8_parts": {part: dict(result) for part, result in self.parts.items()},
        }


def rank_blocks(quantizer: ModelQuantizer, feeds: Optional[Sequence[Mapping[str, np.ndarray]]] = None
                ) -> List[BlockDamage]:
    """The quantiser's blocks, most damaging first (:meth:`ModelQuantizer.block_damage` on one thread), measured on
    ``feeds``; default the first few calibration feeds."""
    if feeds is None:
        feeds = quantizer.probe_feeds(_PROBE_FEEDS)
    return quantizer.block_damage(feeds, threads=1)


def _time_ms(path: Path, feed: Mapping[str, np.ndarray]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=session_options(ort, threads=1),
                                   providers=["CPUExecutionProvider"])
    session.run(None, dict(feed))  # warm-up: the first run allocates
    times = []
    for _ in range(_TIMING_RUNS):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def search_int8(
    quantizer: ModelQuantizer,
    out: Path,
    check: Check,
    *,
    ranking: Optional[Sequence[BlockDamage]] = None,
    on_step: Optional[Callable[[SearchStep], None]] = None,
    first: Optional[Tuple[bool, Sequence[str], Mapping[str, Any]]] = None,
) -> SearchResult:
    """Finds the fewest float blocks whose INT8 model passes ``check``, and writes that model to ``out``.

    Args:
      quantizer: the prepared, calibrated model.
      out: where each candidate is written (the chosen one stays there).
      check: ``check(path) -> (passed, failures, figures)``: the verification of the model at ``path``
        on photos other than the calibration ones.
      ranking: the blocks, most damaging first; default :func:`rank_blocks`.
      on_step: called after each candidate (e.g. to print it).
      first: ``check``'s result for the model already at ``out`` with every block INT8, when the caller has it:
        the first candidate is then not checked again, and quantised again only if it is the one written (its
        :class:`QuantReport` is the caller's).

    Returns:
      The :class:`SearchResult`; ``chosen`` is None when even the candidate with every block but one
      float fails (``out`` then holds that candidate). When every block INT8 fails, its ``parts`` hold
      :func:`verify_parts` of that candidate (static QDQ quantisation only).

    Raises:
      InvalidInputError: the model has no quantisable block (nothing to search).
      ConversionError: a quantisation step failed.
    """
    if ranking is None:
        ranking = rank_blocks(quantizer)
    ranking = tuple(ranking)
    names = [d.block for d in ranking]
    timing_feed = quantizer.probe_feeds(1)[0]
    steps: List[SearchStep] = []
    reports: Dict[int, QuantReport] = {}
    parts: Dict[str, Dict[str, Any]] = {}
    last = -1

    def trial(k: int) -> SearchStep:
        nonlocal last
        if k == 0 and first is not None:
            passed, failures, figures = first
        else:
            reports[k] = quantizer.quantize(out, float_blocks=names[:k])
            passed, failures, figures = check(out)
        last = k
        step = SearchStep(float_blocks=k, passed=bool(passed), failures=tuple(failures), figures=dict(figures),
                          int8_bytes=out.stat().st_size, ms=round(_time_ms(out, timing_feed), 2))
        steps.append(step)
        _LOG.info("int8 search %s: %d of %d blocks float: %s, %.2f MB, %.1f ms%s", quantizer.source.name, k,
                  len(names), "passed" if passed else "failed", step.int8_bytes / 1e6, step.ms,
                  "" if passed else f" ({'; '.join(failures)})")
        if on_step is not None:
            on_step(step)
        if k == 0 and not passed and quantizer.has_parts:
            parts.update(verify_parts(quantizer, out, check))
        return step

    # At least one block stays INT8: with every block float the model would be float. The float tail's weights
    # (a unit of the ranking too) do not count as a block.
    most = max((i for i, name in enumerate(names) if name != TAIL_WEIGHTS), default=None)
    if most is None:
        raise InvalidInputError(f"{quantizer.source}: no quantisable block outside the float tail: nothing to search")
    passing = fewest_passing(most, lambda k: trial(k).passed)
    written = passing if passing is not None else most
    if last != written or written not in reports:
        reports[written] = quantizer.quantize(out, float_blocks=names[:written])
    chosen = next((s for s in steps if s.float_blocks == passing and s.passed), None)
    return SearchResult(ranking=ranking, steps=tuple(steps), chosen=chosen, written=written,
                        report=reports[written], weights=block_weights(quantizer), parts=parts)


def verify_parts(quantizer: ModelQuantizer, out: Path, check: Check) -> Dict[str, Dict[str, Any]]:
    """``check`` of the model with only its weights INT8 and of the model with only its activations INT8, every
    block quantised (:meth:`ModelQuantizer.quantize_part`).

    Each is written to ``out`` in turn (``check`` verifies the model there); the model ``out`` held is put back
    after, byte for byte.

    Returns:
      ``"weights"``/``"activations"`` -> ``{"passed", "failures", "figures"}`` as ``check`` gave them.

    Raises:
      InvalidInputError: the quantiser is not static QDQ.
      ConversionError: a quantisation failed.
    """
    kept = out.with_name(f".{out.name}.searched")
    shutil.copyfile(out, kept)
    results: Dict[str, Dict[str, Any]] = {}
    try:
        for part in INT8_PARTS:
            quantizer.quantize_part(out, part)
            passed, failures, figures = check(out)
            results[part] = {"passed": bool(passed), "failures": list(failures), "figures": dict(figures)}
            _LOG.info("int8 search %s: only the %s INT8: %s%s", quantizer.source.name, part,
                      "passed" if passed else "failed", "" if passed else f" ({'; '.join(failures)})")
    finally:
        os.replace(kept, out)
    return results


def fewest_passing(most: int, passes: Callable[[int], bool]) -> Optional[int]:
    """The smallest ``k`` in ``0..most`` with ``passes(k)``, for a ``passes`` that stays true once true.

    Tries ``k = 0, 1, 2, 4, 8, ...`` (then ``most``) until one passes, then bisects between the last
    failure and that pass: about ``2 log2(k)`` calls instead of ``k``.

    Returns:
      That ``k``, or None when ``passes(most)`` is false.
    """
    failing, k = -1, 0
    while not passes(k):
        failing = k
        if k == most:
            return None
        k = min(most, max(1, 2 * k))
    passing = k
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    return passing


def block_weights(quantizer: ModelQuantizer) -> Dict[str, str]:
    """Block -> the name of its weighted layer's weight, as in the Paddle program paddle2onnx converted."""
    # onnxruntime's pre-processing renames a weight it folds a batch norm into; the Paddle name follows the prefix.
    return {n.name: n.input[1].replace("ConvBnFusion_W_", "", 1)
            for n in quantizer.model.graph.node if n.name in quantizer.blocks and len(n.input) > 1}
