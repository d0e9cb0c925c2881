"""Enrolment: images on disk -> codes in a gallery, skipping unreadable files with a reason.

A command's change to a gallery is one transaction: :func:`enrol` stages every batch and commits
them together (see :meth:`Gallery.add_batches`), and :func:`build_gallery` writes a private file
that takes the gallery's name only when it is complete.
"""

from __future__ import annotations

import errno
import glob
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from edge_shitu.embedder import Embedder
from edge_shitu.errors import GalleryError, ImageDecodeError, InvalidInputError, MissingFileError
from edge_shitu.gallery import Gallery, ItemBatch, fsync_dir
from edge_shitu.image import load_image
from edge_shitu.labelfile import LabelEntry, check_label
from edge_shitu.thumbnail import make_thumbnail

__all__ = ["EnrolSummary", "embed_files", "enrol", "build_gallery"]

SkipHandler = Callable[[Path, str], None]
ProgressHandler = Callable[[int, int], None]

_SIDE_FILES = ("", "-journal", "-wal", "-shm")


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
                on_skip: Optional[Callable[[int, str], None]] = None,
                on_progress: Optional[ProgressHandler] = None) -> Iterator[Tuple[List[int], np.ndarray, np.ndarray]]:
    """Embed image files batch by batch; files that cannot be read as images are skipped.

    ``on_skip(index, reason)`` is called for each of them, ``on_progress(done, total)`` after each batch.

    Yields:
      ``(indices into paths, codes uint8 (n, bits/8), features float32 (n, dim))`` for the readable images
      of each batch.
    """
    for idx, _, codes, feats in _embed_batches(embedder, paths, batch=batch, on_skip=on_skip,
                                               on_progress=on_progress):
        yield idx, codes, feats


def _embed_batches(embedder: Embedder, paths: Sequence[Path], *, batch: int,
                   on_skip: Optional[Callable[[int, str], None]] = None,
                   on_progress: Optional[ProgressHandler] = None,
                   ) -> Iterator[Tuple[List[int], List[np.ndarray], np.ndarray, np.ndarray]]:
    """:func:`embed_files` that also yields the decoded images (uint8 (H, W, 3) RGB) of each batch."""
    for start in range(0, len(paths), batch):
        idx, crops = [], []
        for i in range(start, min(start + batch, len(paths))):
            try:
                crops.append(load_image(paths[i], max_pixels=embedder.options.max_pixels))
                idx.append(i)
            except (MissingFileError, ImageDecodeError, InvalidInputError) as exc:
                if on_skip is not None:
                    on_skip(i, str(exc))
        if crops:
            feats = embedder.postprocess(embedder.infer(embedder.preprocess(crops)))
            yield idx, crops, embedder.encode(feats), feats
        if on_progress is not None:
            on_progress(min(start + batch, len(paths)), len(paths))


def enrol(gallery: Gallery, embedder: Embedder, paths: Sequence[Path], labels: Sequence[str], *,
          sources: Optional[Sequence[str]] = None, keep_embeddings: bool = False,
          embedding_fingerprint: Optional[str] = None, thumbnails: bool = False,
          on_skip: Optional[SkipHandler] = None, on_progress: Optional[ProgressHandler] = None) -> EnrolSummary:
    """Embed image files and add them to a gallery in one transaction.

    Unreadable images are skipped (and reported); anything else that goes wrong — a bad label, a
    full disk, an interrupted process — leaves the gallery as it was.

    Args:
      gallery: an open, writable gallery made with the embedder's bundle.
      embedder: the extractor.
      paths: image files.
      labels: one label per path.
      sources: what to record as each item's source (default: the path).
      keep_embeddings: also store the float features.
      embedding_fingerprint: ``Bundle.embedding_fingerprint`` of the embedder's bundle; required
        with ``keep_embeddings``.
      thumbnails: also store a JPEG thumbnail of each image (the whole image, as embedded; see
        :func:`~edge_shitu.thumbnail.make_thumbnail`) with its item.
      on_skip: called with ``(path, reason)`` for each unreadable image.
      on_progress: called with ``(done, total)`` after each batch.

    Returns:
      What was added and skipped.

    Raises:
      InvalidInputError: ``labels``/``sources`` lengths differ from ``paths``, or a label is bad
        (checked before any image is read).
      GalleryError: the gallery refuses the items (e.g. read-only) or the write failed; nothing
        was added then.
    """
    if len(labels) != len(paths) or (sources is not None and len(sources) != len(paths)):
        raise InvalidInputError(f"got {len(paths)} paths, {len(labels)} labels"
                                + ("" if sources is None else f" and {len(sources)} sources"))
    for i, label in enumerate(labels):
        check_label(label, f"labels[{i}]")
    summary = EnrolSummary()

    def skip(index: int, reason: str) -> None:
        summary.skipped.append((str(paths[index]), reason))
        if on_skip is not None:
            on_skip(paths[index], reason)

    # One batch of decoded images is alive at a time: the thumbnails are made as the batch is staged.
    batches = (
        ItemBatch(codes, [labels[i] for i in idx], embeddings=feats if keep_embeddings else None,
                  features=feats if gallery.compact is not None else None,
                  sources=[(sources[i] if sources is not None else str(paths[i])) for i in idx],
                  thumbnails=[make_thumbnail(img) for img in images] if thumbnails else None)
        for idx, images, codes, feats in _embed_batches(embedder, paths, batch=embedder.options.max_batch,
                                                        on_skip=skip, on_progress=on_progress)
    )
    ids = gallery.add_batches(batches, embedding_fingerprint=embedding_fingerprint if keep_embeddings else None)
    summary.ids.extend(int(i) for i in ids)
    summary.labels = len(gallery.label_counts())
    return summary


def build_gallery(bundle, image_root: Path, entries: Sequence[LabelEntry], dest: Path, *,
                  embedder: Embedder, keep_embeddings: bool = False, thumbnails: bool = False,
                  compact: Optional[str] = None, overwrite: bool = False, on_skip: Optional[SkipHandler] = None,
                  on_progress: Optional[ProgressHandler] = None) -> EnrolSummary:
    """Build a new gallery from a label file's entries, atomically.

    Everything that can be checked is checked before the first image is read. The gallery is
    written to a private file beside ``dest`` and renamed to ``dest`` only when complete; a failed
    build removes it, and the next build to ``dest`` removes what a killed one left. One build per
    ``dest`` runs at a time.

    Args:
      bundle: the loaded bundle whose extractor ``embedder`` runs (its fingerprints go into the gallery).
      image_root: the folder the entries' paths are relative to.
      entries: label file entries (relative path, label).
      dest: the gallery file to write.
      embedder: the extractor.
      keep_embeddings: also store the float features.
      thumbnails: also store a JPEG thumbnail of each image with its item.
      compact: ``"int8"`` or ``"fp16"``: keep each item's features in that compact form, for re-ranked
        search (see :meth:`Gallery.create`).
      overwrite: replace ``dest`` if it exists.
      on_skip: called with ``(path, reason)`` for each unreadable image.
      on_progress: called with ``(done, total)`` after each batch.

    Returns:
      What was added and skipped.

    Raises:
      InvalidInputError: ``image_root`` is not a directory, ``dest`` is a directory, exists and
        ``overwrite`` is false, or its folder is missing or not writable.
      GalleryError: another build is writing ``dest``, or the write failed (``dest`` is unchanged).
    """
    image_root, dest = Path(image_root), Path(dest)
    if not image_root.is_dir():
        raise InvalidInputError(f"{image_root}: image root is not a directory")
    _check_destination(dest, overwrite)
    with _exclusive_output(dest):
        _remove_stale_partials(dest)
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.partial")
        try:
            with Gallery.create(partial, fingerprint=bundle.code_fingerprint, bits=bundle.codes.bits,
                                compact=compact) as gallery:
                summary = enrol(gallery, embedder, [image_root / e.path for e in entries], [e.label for e in entries],
                                sources=[e.path for e in entries], keep_embeddings=keep_embeddings,
                                embedding_fingerprint=bundle.embedding_fingerprint, thumbnails=thumbnails,
                                on_skip=on_skip, on_progress=on_progress)
            _check_destination(dest, overwrite)
            os.replace(partial, dest)
        except GalleryError as exc:
            # The private file's name means nothing to the user: name the gallery they asked for.
            raise type(exc)(f"{dest}: not built, nothing was written: {exc.__cause__ or exc}") from exc
        finally:
            for suffix in _SIDE_FILES:
                Path(str(partial) + suffix).unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return summary


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.is_dir():
        raise InvalidInputError(f"{dest}: is a directory; give the path of the gallery file to write")
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise InvalidInputError(f"{dest}: already exists; pass --overwrite to replace it")
    if dest.exists() and not dest.is_file():
        raise InvalidInputError(f"{dest}: is not a regular file; give the path of the gallery file to write")
    folder = dest.parent
    if not folder.is_dir():
        raise InvalidInputError(f"{dest}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{dest}: folder {folder} is not writable")


@contextmanager
def _exclusive_output(dest: Path) -> Iterator[None]:
    """Holds ``.<name>.lock`` beside ``dest`` for the block: a second build of ``dest`` fails at once."""
    lock = dest.with_name(f".{dest.name}.lock")
    try:
        import fcntl
    except ImportError:  # no flock on this platform: an exclusively created file serves as the lock
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise GalleryError(f"{dest}: another build is writing it (remove {lock} if none is)") from None
        os.close(fd)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise GalleryError(f"{dest}: cannot create the lock file {lock}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise GalleryError(f"{dest}: another `gallery build` is writing it; wait for it to finish") from None
            raise GalleryError(f"{dest}: cannot lock {lock}: {exc.strerror or exc}") from None
        # The holder before us may have removed the file after we opened it: the lock then guards
        # nothing, so take the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _remove_stale_partials(dest: Path) -> None:
    # Only called under the output's lock: any partial file of dest is then a dead build's.
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.*.partial*"):
        leftover.unlink(missing_ok=True)
