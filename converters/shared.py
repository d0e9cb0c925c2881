"""Locate the project's shared data directory (``../shared`` beside the checkout, or ``$EDGE_SHITU_SHARED``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from edge_shitu.errors import MissingFileError

__all__ = ["find_shared", "DET_GRAPH", "REC_GRAPH", "REC_V1_GRAPH"]

DET_GRAPH = "picodet_PPLCNet_x2_5_mainbody_lite_v1.0_infer"
REC_GRAPH = "general_PPLCNetV2_base_pretrained_v1.0_infer"
REC_V1_GRAPH = "general_PPLCNet_x2_5_lite_v1.0_infer"


def find_shared(explicit: Optional[os.PathLike] = None) -> Path:
    """Return the shared data directory.

    Looks at ``explicit``, then ``$EDGE_SHITU_SHARED``, then ``../shared`` beside the repository
    checkout and beside the current directory.

    Raises:
      MissingFileError: none of those places holds ``models/ppshitu-graphs``.
    """
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    elif os.environ.get("EDGE_SHITU_SHARED"):
        candidates.append(Path(os.environ["EDGE_SHITU_SHARED"]))
    else:
        repo_root = Path(__file__).resolve().parent.parent
        candidates += [repo_root.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"]
    for c in candidates:
        if (c / "models" / "ppshitu-graphs").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise MissingFileError(
        f"shared data not found (tried {tried}); expected a folder with models/ppshitu-graphs and data/ "
        "- set EDGE_SHITU_SHARED to its path"
    )
