"""The one small interface every inference backend implements."""

from __future__ import annotations

from typing import List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

__all__ = ["Session"]


@runtime_checkable
class Session(Protocol):
    """A loaded model that maps named float32 arrays to named float32 arrays.

    Tests inject fakes that satisfy this protocol; the runtime never depends on a backend's own types.
    """

    @property
    def input_names(self) -> Tuple[str, ...]:
        """Names of the model inputs."""

    @property
    def output_names(self) -> Tuple[str, ...]:
        """Names of the model outputs."""

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Run the model.

        Args:
          feeds: input name -> array.
          outputs: names of the outputs to return, in this order; ``None`` for all, in model order.

        Returns:
          The requested outputs as numpy arrays.
        """

    def close(self) -> None:
        """Release the model; the session must not be used afterwards."""
