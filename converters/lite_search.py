"""Accuracy-aware INT8 for Paddle-Lite bundles: the fewest weights kept float with which paddleslim's quantised
program still passes ``convert --verify``'s comparison.

The search is that of :mod:`edge_shitu_converters.int8_search` (``k = 0, 1, 2, 4, ...`` most damaging layers
float until a candidate passes, then bisection); two of its parts differ for Paddle-Lite:

- **Ranking.** Quantising each layer alone with paddleslim costs one ``quant_post_static`` run per layer (over a
  minute each for the detector), so the layers are ranked on the paddle2onnx conversion of the same fp32 program
  with onnxruntime's quantiser (:meth:`~edge_shitu_converters.quantize.ModelQuantizer.block_damage`: each weighted
  layer quantised alone, ranked by the output noise it adds on calibration photos). paddle2onnx keeps Paddle's
  weight names, so each ranked layer is the weight a paddleslim skip list names. The two quantisers choose
  activation scales differently, so the ranking is an estimate; the check of every candidate is not.
- **Check.** Each candidate is paddleslim's fake-quantisation program run by Paddle Inference (simulated INT8:
  the rounding ``opt`` compiles into the ``.nb``), through the same comparison with the fp32 source as
  ``--verify``. So the search also runs for ARM bundles, whose ``.nb`` cannot run here; the chosen ``.nb`` is
  checked by ``--verify`` itself where it can run (x86), and on the device otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from edge_shitu.errors import InvalidInputError
from edge_shitu_converters.int8_search import Check, SearchStep, block_weights, fewest_passing, rank_blocks
from edge_shitu_converters.quantize import BlockDamage, ModelQuantizer, QuantizeOptions

__all__ = ["CHECK", "RankedWeight", "LiteSearchResult", "rank_weights", "search_lite_int8",
           "single_check_record"]

_LOG = logging.getLogger(__name__)

CHECK = "simulated INT8: paddleslim's fake-quantisation program in Paddle Inference"
"""How a Paddle-Lite candidate is checked (recorded with the search)."""

# Calibration photos of the ranking (onnxruntime calibration of the fp32 conversion).
_RANK_CALIB = 8


@dataclass(frozen=True)
class RankedWeight:
    """One quantisable weight of a Paddle program, with the damage its layer does quantised alone.

    Attributes:
      weight: the Paddle weight name (what ``--lite-skip`` takes).
      damage: the ranking figures of its layer in the ONNX conversion.
    """

    weight: str
    damage: BlockDamage


@dataclass(frozen=True)
class LiteSearchResult:
    """What :func:`search_lite_int8` found.

    Attributes:
      ranking: the weights, most damaging first.
      steps: the candidates tried, in order (``int8_bytes`` and ``ms`` None: the candidates are programs, not
        ``.nb`` files).
      chosen: the number of most damaging weights kept float in the passing candidate written last, or None when
        even the most float candidate failed.
      program: the fake-quantisation program of the chosen candidate (of the most float one when none passed).
    """

    ranking: Tuple[RankedWeight, ...]
    steps: Tuple[SearchStep, ...]
    chosen: Optional[int]
    program: Path

    @property
    def float_weights(self) -> Tuple[str, ...]:
        """The weights the written program keeps float (those of the search; a user's skip list comes on top)."""
        k = self.chosen if self.chosen is not None else len(self.ranking) - 1
        return tuple(r.weight for r in self.ranking[:k])

    def record(self) -> Dict[str, Any]:
        """A JSON-ready summary for ``verify.json`` and the manifest."""
        return {
            "check": CHECK,
            "ranking_from": "onnxruntime quantisation of the paddle2onnx conversion, each layer alone",
            "blocks": len(self.ranking),
            "float_weights": list(self.float_weights),
            "ranking": [{"weight": r.weight, **r.damage.record()} for r in self.ranking],
            "steps": [s.record() for s in self.steps],
            "chosen": self.chosen,
        }


def single_check_record(passed: bool, failures: Sequence[str], figures: Mapping[str, Any],
                        float_weights: Sequence[str] = ()) -> Dict[str, Any]:
    """The record of a model whose program was checked once, nothing searched: it passed with every weight INT8,
    it came from quantisation-aware training, or the user chose its ``float_weights`` (``int8_layers`` N). For an
    ARM model, the only numerical check this machine can make; ``chosen`` is the number of float weights when it
    passed, None when not."""
    step = SearchStep(float_blocks=len(float_weights), passed=bool(passed), failures=tuple(failures),
                      figures=dict(figures), int8_bytes=None, ms=None)
    return {"check": CHECK, "blocks": None, "float_weights": list(float_weights), "ranking": [],
            "chosen": len(float_weights) if passed else None, "steps": [step.record()]}


def rank_weights(role: str, onnx_fp32: Path, input_spec: Any, calib_dir: Path, work: Path,
                 weights: Sequence[str]) -> List[RankedWeight]:
    """The program's quantisable ``weights``, most damaging first (see the module docstring).

    Args:
      role: "detector" or "extractor" (its quantisation defaults, without the float tail: paddleslim has none).
      onnx_fp32: the paddle2onnx conversion of the same fp32 program.
      input_spec: its :class:`edge_shitu.bundle.InputSpec`.
      calib_dir: calibration photos.
      work: an existing scratch folder.
      weights: the weights paddleslim can quantise (:func:`edge_shitu_converters.lite.quantizable_weights`);
        layers of the ONNX model with another weight are left out.

    Raises:
      InvalidInputError: no weight of ``weights`` is a layer of the ONNX model.
      ConversionError: a quantisation step failed.
    """
    options = QuantizeOptions.for_role(role, calib_count=_RANK_CALIB, float_tail=0)
    quantizer = ModelQuantizer.prepare(onnx_fp32, work, input_spec=input_spec, calib_dir=calib_dir, options=options)
    names = block_weights(quantizer)
    wanted = set(weights)
    ranked = [RankedWeight(names[d.block], d) for d in rank_blocks(quantizer)
              if names.get(d.block) in wanted]
    if not ranked:
        raise InvalidInputError(f"{onnx_fp32}: none of the program's quantisable weights is a layer of its ONNX "
                                "conversion: nothing to rank")
    return ranked


def search_lite_int8(
    ranking: Sequence[RankedWeight],
    quantize: Callable[[Sequence[str], Path], Path],
    check: Check,
    work: Path,
    *,
    first: Optional[Tuple[bool, Sequence[str], Mapping[str, Any]]] = None,
    on_step: Optional[Callable[[SearchStep], None]] = None,
) -> LiteSearchResult:
    """Finds the fewest of the ``ranking``'s weights to keep float for the quantised program to pass ``check``.

    Args:
      ranking: the weights, most damaging first (:func:`rank_weights`).
      quantize: ``quantize(float_weights, out_dir) -> program folder``: paddleslim with those weights skipped.
      check: ``check(program folder) -> (passed, failures, figures)``.
      work: an existing folder for the candidates' programs.
      first: ``check``'s result for the program with every weight INT8, when the caller has it: that candidate is
        then not checked again (``quantize`` is still asked for its folder, with no weight float).
      on_step: called after each candidate (e.g. to print it).

    Returns:
      The :class:`LiteSearchResult`.

    Raises:
      InvalidInputError: fewer than two weights (one must stay INT8 and one be searched).
      ConversionError: a quantisation failed.
    """
    names = [r.weight for r in ranking]
    if len(names) < 2:
        raise InvalidInputError(f"{len(names)} quantisable weight(s): nothing to search")
    steps: List[SearchStep] = []
    programs: Dict[int, Path] = {}

    def passes(k: int) -> bool:
        start = time.perf_counter()
        programs[k] = quantize(names[:k], work / f"k{k}")
        passed, failures, figures = first if k == 0 and first is not None else check(programs[k])
        step = SearchStep(float_blocks=k, passed=bool(passed), failures=tuple(failures), figures=dict(figures),
                          int8_bytes=None, ms=None)
        steps.append(step)
        _LOG.info("lite int8 search: %d of %d weights float: %s (%.0f s)%s", k, len(names),
                  "passed" if passed else "failed", time.perf_counter() - start,
                  "" if passed else f" ({'; '.join(failures)})")
        if on_step is not None:
            on_step(step)
        return step.passed

    most = len(names) - 1  # one weight stays INT8, or the model would be float
    chosen = fewest_passing(most, passes)
    return LiteSearchResult(ranking=tuple(ranking), steps=tuple(steps), chosen=chosen,
                            program=programs[chosen if chosen is not None else most])
