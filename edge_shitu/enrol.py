"""Enrolment: images on disk -> codes in a gallery, batch by batch, skipping unreadable files with a reason."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.embedder import Embedder
from edge_shitu.errors import ImageDecodeError, InvalidInputError, MissingFileError
from edge_shitu.gallery import Gallery
from edge_shitu.image import load_image
from edge_shitu.labelfile import LabelEntry

__all__ = ["EnrolSummary", "embed_files", "enrol", "build_gallery"]

SkipHandler = Callable[[Path, str], None]
ProgressHandler = Callable[[int, int], None]


@dataclass
class EnrolSummary:
    """What an enrolment did.

    Attributes:
      ids: ids of the added items, in input order of the readable images.
      skipped: ``(path, reason)`` of every image that could not be read.
      labels: distinct labels in the gallery afterwards.
    """

    ids: List[int] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    labels: int = 0

    @property
    def added(self) -> int:
        return len(self.ids)


def embed_files(embedder: Embedder, paths: Sequence[Path], *, batch: int,
                on_skip: Optional[SkipHandler] = None,
                on_progress: Optional[ProgressHandler] = None) -> Iterator[Tuple[List[int], np.ndarray, np.ndarray]]:
    """Embed image files batch by batch.

    Yields:
      ``(indices into paths, codes uint8 (n, bits/8), features float32 (n, dim))`` for the readable images
      of each batch.
    """
    for start in range(0, len(paths), batch):
        idx, crops = [], []
        for i in range(start, min(start + batch, len(paths))):
            try:
                crops.append(load_image(paths[i]))
                idx.append(i)
            except (MissingFileError, ImageDecodeError, InvalidInputError) as exc:
                if on_skip is not None:
                    on_skip(paths[i], str(exc))
        if crops:
            feats = embedder.postprocess(embedder.infer(embedder.preprocess(crops)))
            yield idx, embedder.encode(feats), feats
        if on_progress is not None:
            on_progress(min(start + batch, len(paths)), len(paths))


def enrol(gallery: Gallery, embedder: Embedder, paths: Sequence[Path], labels: Sequence[str], *,
          sources: Optional[Sequence[str]] = None, keep_embeddings: bool = False,
          on_skip: Optional[SkipHandler] = None, on_progress: Optional[ProgressHandler] = None) -> EnrolSummary:
    """Embed image files and add them to a gallery, one transaction per batch.

    Args:
      gallery: an open, writable gallery made with the embedder's bundle.
      embedder: the extractor.
      paths: image files.
      labels: one label per path.
      sources: what to record as each item's source (default: the path).
      keep_embeddings: also store the float features.
      on_skip: called with ``(path, reason)`` for each unreadable image.
      on_progress: called with ``(done, total)`` after each batch.

    Raises:
      InvalidInputError: ``labels``/``sources`` lengths differ from ``paths``.
      GalleryError: the gallery refuses the items (e.g. read-only).
    """
    if len(labels) != len(paths) or (sources is not None and len(sources) != len(paths)):
        raise InvalidInputError(f"got {len(paths)} paths, {len(labels)} labels"
                                + ("" if sources is None else f" and {len(sources)} sources"))
    summary = EnrolSummary()

    def skip(path: Path, reason: str) -> None:
        summary.skipped.append((str(path), reason))
        if on_skip is not None:
            on_skip(path, reason)

    for idx, codes, feats in embed_files(embedder, paths, batch=embedder.options.max_batch,
                                         on_skip=skip, on_progress=on_progress):
        ids = gallery.add(codes, [labels[i] for i in idx],
                          embeddings=feats if keep_embeddings else None,
                          sources=[(sources[i] if sources is not None else str(paths[i])) for i in idx])
        summary.ids.extend(int(i) for i in ids)
    summary.labels = len(gallery.label_counts())
    return summary


def build_gallery(bundle, image_root: Path, entries: Sequence[LabelEntry], dest: Path, *,
                  embedder: Embedder, keep_embeddings: bool = False, overwrite: bool = False,
                  on_skip: Optional[SkipHandler] = None,
                  on_progress: Optional[ProgressHandler] = None) -> EnrolSummary:
    """Build a new gallery from a label file's entries, atomically.

    The gallery is written to ``dest.partial`` and renamed to ``dest`` only when complete, so an
    interrupted build never leaves a half gallery under the final name.

    Raises:
      InvalidInputError: ``dest`` exists and ``overwrite`` is false, or ``image_root`` is not a directory.
    """
    image_root, dest = Path(image_root), Path(dest)
    if not image_root.is_dir():
        raise InvalidInputError(f"{image_root}: image root is not a directory")
    if dest.exists() and not overwrite:
        raise InvalidInputError(f"{dest}: already exists; pass --overwrite to replace it")
    partial = dest.with_name(dest.name + ".partial")
    for suffix in ("", "-wal", "-shm", "-journal"):
        leftover = Path(str(partial) + suffix)
        if leftover.exists():
            leftover.unlink()
    with Gallery.create(partial, fingerprint=bundle.code_fingerprint, bits=bundle.codes.bits) as gallery:
        summary = enrol(gallery, embedder, [image_root / e.path for e in entries], [e.label for e in entries],
                        sources=[e.path for e in entries], keep_embeddings=keep_embeddings,
                        on_skip=on_skip, on_progress=on_progress)
    os.replace(partial, dest)
    return summary
