"""Exception hierarchy of edge-shitu.

Every error raised on purpose by the SDK derives from :class:`EdgeShituError` *and* from the
builtin exception a caller would naturally catch (``ValueError`` for bad values,
``FileNotFoundError`` for missing paths, ``ImportError`` for a missing optional backend...),
so ``except ValueError`` keeps working for code that does not know about edge-shitu.
"""

from __future__ import annotations

__all__ = [
    "EdgeShituError",
    "MissingFileError",
    "ImageDecodeError",
    "InvalidInputError",
    "InvalidDtypeError",
    "MissingEmbeddingsError",
    "BundleError",
    "IntegrityError",
    "BackendUnavailableError",
    "TargetMismatchError",
    "GalleryError",
    "GalleryCorruptError",
    "UnknownItemError",
    "FingerprintMismatchError",
    "LabelFileError",
    "FetchError",
    "ConversionError",
    "HashHeadError",
    "ClosedError",
]


class EdgeShituError(Exception):
    """Base class of every error edge-shitu raises on purpose."""


class MissingFileError(EdgeShituError, FileNotFoundError):
    """A file or directory the caller named does not exist."""


class ImageDecodeError(EdgeShituError, ValueError):
    """An image file cannot be read (permissions, a link loop, an I/O error), or is empty, truncated, of an
    unsupported format or too large to decode."""


class InvalidInputError(EdgeShituError, ValueError):
    """An argument has the wrong shape, range or value."""


class InvalidDtypeError(EdgeShituError, TypeError):
    """An array argument has the wrong dtype; edge-shitu never casts codes silently."""


class BundleError(EdgeShituError, ValueError):
    """A model bundle is malformed: bad manifest, unknown keys, missing model files."""


class IntegrityError(BundleError):
    """A file's sha256 does not match the digest recorded for it."""


class BackendUnavailableError(EdgeShituError, ImportError):
    """The inference backend asked for is not installed; the message names the extra to install."""


class TargetMismatchError(BundleError):
    """A bundle was built for another machine (e.g. an ARM Paddle-Lite model on x86)."""


class GalleryError(EdgeShituError, ValueError):
    """A gallery operation was given bad arguments (unknown id, duplicate id, wrong code length)."""


class MissingEmbeddingsError(GalleryError):
    """Some gallery items have no stored float embedding, so a float index cannot hold them."""


class GalleryCorruptError(GalleryError):
    """A gallery file is not a gallery, or its contents are inconsistent."""


class UnknownItemError(GalleryError, KeyError):
    """An item id is not in the gallery (also a ``KeyError``, as for a missing mapping key)."""

    # KeyError would quote the message (str(KeyError("x")) is "'x'"): keep the plain one.
    __str__ = Exception.__str__


class FingerprintMismatchError(GalleryError):
    """A gallery's codes were made by another model than the one used to query it."""


class LabelFileError(EdgeShituError, ValueError):
    """A label file (``relative/path<TAB>label`` per line) is malformed."""


class FetchError(EdgeShituError, OSError):
    """A model archive could not be downloaded, copied from a mirror, verified or unpacked."""


class ConversionError(EdgeShituError, RuntimeError):
    """A model conversion step failed; the message names the step and the model."""


class ClosedError(EdgeShituError, ValueError):
    """A detector, embedder, recogniser or gallery was used after :meth:`close` (as Python's files do,
    this is a ``ValueError``)."""


class HashHeadError(EdgeShituError, ValueError):
    """A hash head file (``weight`` [bits, d], ``bias`` [bits]) is malformed or does not fit the features."""
