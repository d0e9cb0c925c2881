"""Locate the project's shared data directory (``../shared`` beside the checkout, or ``$EDGE_SHITU_SHARED``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from edge_shitu.errors import MissingFileError

__all__ = ["find_shared", "SHARED_ENV_VAR", "GRAPHS", "DRINK", "DET_GRAPH", "REC_GRAPH", "REC_V1_GRAPH"]

SHARED_ENV_VAR = "EDGE_SHITU_SHARED"
"""Environment variable naming the shared data folder."""

GRAPHS = "models/ppshitu-graphs"
"""The official graphs (without weights), relative to the shared folder."""

DRINK = "data/drink_dataset_v1.0"
"""The unpacked drink demo data set, relative to the shared folder."""

DET_GRAPH = "picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer"
REC_GRAPH = "general_PPLCNetV2_base_pretrained_v1.0_infer"
REC_V1_GRAPH = "general_PPLCNet_x2_5_lite_v1.0_infer"


def find_shared(explicit: Optional[os.PathLike] = None, *, needs: Sequence[str] = (GRAPHS,)) -> Path:
    """Return the shared data directory.

    Looks at ``explicit``, then ``$EDGE_SHITU_SHARED``, then ``../shared`` beside the repository
    checkout and beside the current directory. A folder given explicitly or by the variable is
    the only one tried.

    Args:
      explicit: the folder the caller named, if any.
      needs: folders (relative POSIX paths) the shared folder must hold, e.g. ``GRAPHS`` or ``DRINK``.

    Raises:
      MissingFileError: none of those places holds every folder of ``needs``.
    """
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get(SHARED_ENV_VAR):
        candidates.append(Path(os.environ[SHARED_ENV_VAR]))
    else:
        repo_root = Path(__file__).resolve().parent.parent
        candidates += [repo_root.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for c in candidates:
        if all((c / need).is_dir() for need in needs):
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise MissingFileError(
        f"shared data not found (tried {tried}); expected a folder with {' and '.join(needs)} "
        f"- set {SHARED_ENV_VAR} to its path"
    )
