"""Feature extractor: crops -> one batched session call -> L2-normalised features -> packed binary codes.

The codes are the sign bits of the features, or of a learned hash head's outputs when the bundle has
one (:mod:`edge_shitu.hashing`); the head is applied after L2 normalisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

import numpy as np

from edge_shitu.backends import Session, create_session
from edge_shitu.bundle import Bundle, CodeSpec, EmbeddingSpec, ModelSpec
from edge_shitu.codes import binarize, l2_normalize
from edge_shitu.errors import BundleError, ClosedError
from edge_shitu.image import Workspace, load_image
from edge_shitu.options import EmbedderOptions
from edge_shitu.preprocess import image_to_tensor

if TYPE_CHECKING:
    from edge_shitu.hashing import HashHead

__all__ = ["Embedder"]


class Embedder:
    """PP-LCNetV2 (or any embedding) extractor of a bundle. Build it with :meth:`from_bundle`."""

    def __init__(self, spec: ModelSpec, codes: CodeSpec, session: Session, options: EmbedderOptions,
                 head: Optional["HashHead"] = None) -> None:
        if not isinstance(spec.output, EmbeddingSpec):
            raise BundleError(f"{spec.path}: not an extractor (output kind is not embedding)")
        if spec.output.name not in session.output_names:
            raise BundleError(f"{spec.path}: model has no output {spec.output.name!r} named by the manifest")
        if head is not None and (head.dim != spec.output.dim or head.bits != codes.bits):
            raise BundleError(f"{spec.path}: hash head [{head.bits}, {head.dim}] does not fit the extractor "
                              f"({spec.output.dim}-d) and codes ({codes.bits} bits)")
        self.spec = spec
        self.codes = codes
        self.head = head
        self.options = options
        self._session = session
        self._workspace = Workspace()
        batch = spec.input.shape[0]
        # A model exported with a fixed batch (e.g. 1 for Paddle-Lite) is fed that many crops per call.
        self._max_batch = options.max_batch if batch <= 0 else min(batch, options.max_batch)
        self._fixed_batch = batch if batch > 0 else None

    @classmethod
    def from_bundle(cls, bundle, *, options: Optional[EmbedderOptions] = None,
                    session: Optional[Session] = None) -> "Embedder":
        """Create the extractor of a bundle.

        Args:
          bundle: a bundle directory or a loaded :class:`Bundle`.
          options: batching and normalisation settings.
          session: an already created session (tests inject fakes); ``None`` creates one.

        Raises:
          MissingFileError, BundleError, IntegrityError: the bundle is missing, malformed or damaged.
          HashHeadError: the bundle's hash head file is malformed.
          BackendUnavailableError: the backend the bundle needs is not installed.
        """
        bundle = Bundle.load(bundle)
        spec = bundle.require("extractor")
        options = options or EmbedderOptions()
        head = bundle.load_hash_head()
        if session is None:
            session = create_session(spec, name=options.backend.name, threads=options.backend.threads)
        return cls(spec, bundle.codes, session, options, head)

    @property
    def dim(self) -> int:
        return self.spec.output.dim

    def preprocess(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Stretch and normalise crops.

        Args:
          crops: uint8 (h, w, 3) RGB arrays.

        Returns:
          float32 (n, 3, H, W).
        """
        inp = self.spec.input
        out = np.empty((len(crops), 3, inp.height, inp.width), dtype=np.float32)
        for i, crop in enumerate(crops):
            image_to_tensor(crop, inp, out=out[i], workspace=self._workspace)
        return out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on a pre-processed batch, in chunks the model accepts.

        Args:
          batch: float32 (n, 3, H, W).

        Returns:
          float32 (n, dim) raw features.
        """
        n = batch.shape[0]
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, self._max_batch):
            chunk = batch[start:start + self._max_batch]
            real = chunk.shape[0]
            if self._fixed_batch is not None and real < self._fixed_batch:
                pad = np.zeros((self._fixed_batch - real,) + chunk.shape[1:], dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            if self._session is None:
                raise ClosedError(f"{self.spec.path}: this embedder is closed")
            feats = self._session.run({self.spec.input.name: chunk}, [self.spec.output.name])[0]
            out[start:start + real] = np.asarray(feats, dtype=np.float32).reshape(chunk.shape[0], -1)[:real]
        return out

    def postprocess(self, features: np.ndarray) -> np.ndarray:
        """L2-normalise raw features (with an epsilon). Returns float32 (n, dim)."""
        return l2_normalize(features, eps=self.options.epsilon)

    def features(self, images: Sequence) -> np.ndarray:
        """L2-normalised features of whole images or crops.

        Args:
          images: paths, bytes, PIL images or uint8 (h, w, 3) RGB arrays.

        Returns:
          float32 (n, dim); (0, dim) for an empty input.

        Raises:
          MissingFileError, ImageDecodeError: an image cannot be read.
          InvalidInputError, InvalidDtypeError: an array has the wrong shape or dtype.
        """
        crops: List[np.ndarray] = [load_image(im, max_pixels=self.options.max_pixels) for im in images]
        if not crops:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.postprocess(self.infer(self.preprocess(crops)))

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Binary codes of L2-normalised features (as :meth:`postprocess` returns them).

        Bit ``j`` is ``feature[j] > 0`` (plain sign), or ``(features @ W.T + b)[j] > 0`` when the bundle
        has a hash head ``(W, b)``; packed MSB-first.

        Args:
          features: float32 (n, dim).

        Returns:
          uint8 (n, bits // 8).

        Raises:
          InvalidDtypeError, InvalidInputError: ``features`` has the wrong dtype or shape, or holds NaN.
          HashHeadError: ``features`` does not have the head's dimension.
        """
        if self.head is None:
            return binarize(features)
        return self.head.encode(features)

    def embed(self, images: Sequence) -> np.ndarray:
        """Binary codes of whole images or crops (see :meth:`encode`).

        Args:
          images: as for :meth:`features`.

        Returns:
          uint8 (n, bits // 8).

        Raises:
          As :meth:`features`.
        """
        return self.encode(self.features(images))

    def close(self) -> None:
        """Release the session."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
