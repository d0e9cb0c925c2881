"""Model bundles: a directory with ``manifest.json`` and the model files it names.

The manifest says everything the runtime needs (input size, resize kind, mean/std, output meaning,
default thresholds, code layout, provenance); nothing is guessed. It is parsed strictly: unknown or
missing keys are errors, and every model file's sha256 is checked at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from edge_shitu.errors import BundleError, IntegrityError, MissingFileError

__all__ = [
    "MANIFEST_NAME",
    "VERIFY_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "InputSpec",
    "HeadsSpec",
    "EmbeddingSpec",
    "ModelSpec",
    "CodeSpec",
    "HashSpec",
    "RecognitionDefaults",
    "Bundle",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
VERIFY_NAME = "verify.json"
FORMAT = "edge-shitu-bundle"
FORMAT_VERSION = 1
ROLES = ("detector", "extractor")


def sha256_file(path: Union[str, os.PathLike], *, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks.

    Raises:
      MissingFileError: the file does not exist.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    return h.hexdigest()


class _Reader:
    """Strict access to one JSON object of the manifest; every message names the manifest and key path."""

    def __init__(self, data: Any, where: str, manifest: Path):
        if not isinstance(data, dict):
            raise BundleError(f"{manifest}: {where} must be an object, got {type(data).__name__}")
        self.data, self.where, self.manifest = data, where, manifest
        self.seen: set = set()

    def _err(self, key: str, msg: str) -> BundleError:
        return BundleError(f"{self.manifest}: {self.where}.{key} {msg}")

    def get(self, key: str, kind: Union[type, Tuple[type, ...]], *, optional: bool = False, default: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if optional:
                return default
            raise self._err(key, "is missing")
        value = self.data[key]
        if value is None and optional:
            return default
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self._err(key, f"must be {getattr(kind, '__name__', 'a number')}, got a boolean")
        if not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self._err(key, f"must be {want}, got {type(value).__name__}")
        return value

    def numbers(self, key: str, length: Optional[int] = None, kind: type = float) -> Tuple:
        values = self.get(key, list)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if kind is int:
            ok = ok and all(isinstance(v, int) for v in values)
        if not ok or (length is not None and len(values) != length):
            n = f"{length} " if length is not None else ""
            raise self._err(key, f"must be a list of {n}{kind.__name__}s, got {values!r}")
        return tuple(kind(v) for v in values)

    def strings(self, key: str) -> Tuple[str, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, str) for v in values):
            raise self._err(key, f"must be a list of strings, got {values!r}")
        return tuple(values)

    def choice(self, key: str, choices: Tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def sub(self, key: str, *, optional: bool = False) -> Optional["_Reader"]:
        value = self.get(key, dict, optional=optional)
        return None if value is None else _Reader(value, f"{self.where}.{key}", self.manifest)

    def done(self) -> None:
        unknown = set(self.data) - self.seen
        if unknown:
            raise BundleError(f"{self.manifest}: unknown key(s) in {self.where}: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input.

    Attributes:
      name: the model's input tensor name.
      shape: (N, 3, H, W); N = -1 for a dynamic batch.
      resize: "stretch" (aspect ratio not kept, as the reference).
      interpolation: "cubic" (cv2 INTER_CUBIC semantics) or "linear" (cv2 INTER_LINEAR semantics).
      channel_order: "RGB" or "BGR".
      scale: pixel multiplier applied before mean/std (1/255).
      mean: per-channel mean, in ``channel_order``.
      std: per-channel standard deviation, in ``channel_order``.
      layout: "NCHW".
    """

    name: str
    shape: Tuple[int, int, int, int]
    resize: str
    interpolation: str
    channel_order: str
    scale: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    layout: str

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]

    @classmethod
    def _parse(cls, r: _Reader) -> "InputSpec":
        spec = cls(
            name=r.get("name", str),
            shape=r.numbers("shape", 4, int),
            resize=r.choice("resize", ("stretch",)),
            interpolation=r.choice("interpolation", ("cubic", "linear")),
            channel_order=r.choice("channel_order", ("RGB", "BGR")),
            scale=float(r.get("scale", (int, float))),
            mean=r.numbers("mean", 3),
            std=r.numbers("std", 3),
            layout=r.choice("layout", ("NCHW",)),
        )
        r.done()
        if spec.shape[1] != 3 or spec.shape[2] < 1 or spec.shape[3] < 1:
            raise BundleError(f"{r.manifest}: {r.where}.shape must be [N, 3, H, W], got {list(spec.shape)}")
        if any(s <= 0 for s in spec.std):
            raise BundleError(f"{r.manifest}: {r.where}.std must be positive, got {list(spec.std)}")
        return spec


@dataclass(frozen=True)
class HeadsSpec:
    """Raw PicoDet head outputs of a detector cut before its in-graph post-process.

    Attributes:
      scores: output names of the per-level sigmoid scores, float32 (1, H*W, num_classes), one per stride.
      boxes: output names of the per-level box logits, float32 (1, H*W, 4*(reg_max+1)), one per stride.
      strides: feature-map strides in input pixels, e.g. (8, 16, 32, 64).
      reg_max: largest distance bin of the distribution-focal box regression (7).
      cell_offset: anchor centre offset within a cell (0.5).
      num_classes: detector classes.
    """

    scores: Tuple[str, ...]
    boxes: Tuple[str, ...]
    strides: Tuple[int, ...]
    reg_max: int
    cell_offset: float
    num_classes: int

    @classmethod
    def _parse(cls, r: _Reader) -> "HeadsSpec":
        r.choice("kind", ("picodet_heads",))
        spec = cls(
            scores=r.strings("scores"),
            boxes=r.strings("boxes"),
            strides=r.numbers("strides", None, int),
            reg_max=r.get("reg_max", int),
            cell_offset=float(r.get("cell_offset", (int, float))),
            num_classes=r.get("num_classes", int),
        )
        r.done()
        n = len(spec.strides)
        if n == 0 or len(spec.scores) != n or len(spec.boxes) != n:
            raise BundleError(f"{r.manifest}: {r.where} needs one scores and one boxes output per stride")
        if spec.reg_max < 1 or spec.num_classes < 1 or min(spec.strides) < 1:
            raise BundleError(f"{r.manifest}: {r.where} has a non-positive reg_max, num_classes or stride")
        return spec


@dataclass(frozen=True)
class EmbeddingSpec:
    """A feature extractor's output.

    Attributes:
      name: output tensor name, float32 (N, dim).
      dim: embedding dimension.
      normalized: whether the model already L2-normalises (the official models do not).
    """

    name: str
    dim: int
    normalized: bool

    @classmethod
    def _parse(cls, r: _Reader) -> "EmbeddingSpec":
        r.choice("kind", ("embedding",))
        spec = cls(name=r.get("name", str), dim=r.get("dim", int), normalized=r.get("normalized", bool))
        r.done()
        if spec.dim < 8:
            raise BundleError(f"{r.manifest}: {r.where}.dim must be >= 8, got {spec.dim}")
        return spec


@dataclass(frozen=True)
class ModelSpec:
    """One model of a bundle.

    Attributes:
      role: "detector" or "extractor".
      path: absolute path of the model file.
      sha256: hex digest recorded by the converter (verified at load).
      backend: backend that runs the file ("onnxruntime" or "paddlelite").
      precision: "fp32", "fp16" or "int8".
      target: machine the file was built for ("any", "x86", "arm").
      input: how images become inputs.
      output: what the outputs mean.
      labels: detector class names (empty for an extractor).
      defaults: detector post-processing defaults (keys of :class:`DetectorOptions`).
      source: provenance as written by the converter (official archive or replica + seed).
      quantization: how an int8 model was quantised (tool, method, calibration photos), else empty.
    """

    role: str
    path: Path
    sha256: str
    backend: str
    precision: str
    target: str
    input: InputSpec
    output: Union[HeadsSpec, EmbeddingSpec]
    labels: Tuple[str, ...]
    defaults: Mapping[str, Any]
    source: Mapping[str, Any]
    quantization: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_replica(self) -> bool:
        return self.source.get("kind") == "replica"


@dataclass(frozen=True)
class CodeSpec:
    """Binary code layout.

    Attributes:
      bits: code length in bits (a multiple of 8).
      method: "sign" (bit = feature > 0).
      bit_order: "big" (MSB-first, the reference's packing).
    """

    bits: int
    method: str
    bit_order: str

    @property
    def nbytes(self) -> int:
        return self.bits // 8


@dataclass(frozen=True)
class HashSpec:
    """A learned hash head between the L2-normalised feature and its code (see :mod:`edge_shitu.hashing`).

    Attributes:
      path: absolute path of the head file (``hash.npz``).
      sha256: hex digest recorded in the manifest (verified at load; part of the code fingerprint).
      bits: code length the head gives (rows of its weight).
      dim: feature dimension it takes (columns of its weight; the extractor's dim).
      source: provenance (e.g. training method, seed, data) as recorded when it was installed.
    """

    path: Path
    sha256: str
    bits: int
    dim: int
    source: Mapping[str, Any]

    @classmethod
    def _parse(cls, r: _Reader, root: Path) -> "HashSpec":
        file = r.get("file", str)
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise BundleError(f"{r.manifest}: {r.where}.file must be a path inside the bundle, got {file!r}")
        sha = r.get("sha256", str)
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise BundleError(f"{r.manifest}: {r.where}.sha256 must be 64 lowercase hex digits, got {sha!r}")
        spec = cls(path=root / file, sha256=sha, bits=r.get("bits", int), dim=r.get("dim", int),
                   source=dict(r.get("source", dict, optional=True, default={})))
        r.done()
        if spec.bits <= 0 or spec.bits % 8 or spec.dim <= 0:
            raise BundleError(f"{r.manifest}: {r.where} must have bits a positive multiple of 8 and dim >= 1, "
                              f"got bits {spec.bits}, dim {spec.dim}")
        return spec


@dataclass(frozen=True)
class RecognitionDefaults:
    """Recogniser defaults recorded in the bundle.

    Attributes:
      max_distance: Hamming acceptance radius in bits.
      final_nms_iou: IoU of the final NMS.
      whole_image: whole-image policy name.
      top_k: candidates per region.
    """

    max_distance: int
    final_nms_iou: float
    whole_image: str
    top_k: int


@dataclass(frozen=True)
class Bundle:
    """A parsed, verified model bundle. Build it with :meth:`Bundle.load`.

    Attributes:
      path: the bundle directory.
      name: bundle name.
      models: role -> :class:`ModelSpec`.
      codes: code layout.
      recognition: recogniser defaults.
      tools: versions of the tools that built the bundle.
      manifest: the raw manifest mapping.
      hash: the learned hash head, or None for plain sign codes of the features.
    """

    path: Path
    name: str
    models: Mapping[str, ModelSpec]
    codes: CodeSpec
    recognition: RecognitionDefaults
    tools: Mapping[str, str]
    manifest: Mapping[str, Any]
    hash: Optional[HashSpec] = None

    @classmethod
    def load(cls, path: Union[str, os.PathLike, "Bundle"], *, verify: bool = True) -> "Bundle":
        """Read and check ``path/manifest.json`` and the model files it names.

        Args:
          path: the bundle directory (or an already loaded bundle, returned as is).
          verify: check every model file's sha256 against the manifest.

        Raises:
          MissingFileError: the directory, its manifest or a model file is missing.
          BundleError: the manifest is not valid JSON or breaks the schema.
          IntegrityError: a model file's (or the hash head's) sha256 differs from the manifest.
        """
        if isinstance(path, Bundle):
            return path
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        if not root.is_dir():
            raise MissingFileError(f"{root}: bundle directory not found (expected a folder with {MANIFEST_NAME})")
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MissingFileError(f"{manifest_path}: no manifest; {root} is not an edge-shitu bundle") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
        bundle = cls._parse(data, root.resolve(), manifest_path)
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def _parse(cls, data: Any, root: Path, manifest_path: Path) -> "Bundle":
        r = _Reader(data, "manifest", manifest_path)
        fmt = r.get("format", str)
        if fmt != FORMAT:
            raise BundleError(f"{manifest_path}: format is {fmt!r}, expected {FORMAT!r}")
        version = r.get("format_version", int)
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {version} is not supported by this edge-shitu "
                f"(supports {FORMAT_VERSION}); convert the models again or upgrade edge-shitu"
            )
        name = r.get("name", str)
        models_r = r.sub("models")
        models: Dict[str, ModelSpec] = {}
        for role in ROLES:
            m = models_r.sub(role, optional=True)
            if m is not None:
                models[role] = _parse_model(role, m, root)
        models_r.done()
        if not models:
            raise BundleError(f"{manifest_path}: models must hold a detector, an extractor or both")

        c = r.sub("codes")
        codes = CodeSpec(bits=c.get("bits", int), method=c.choice("method", ("sign",)), bit_order=c.choice("bit_order", ("big",)))
        c.done()
        if codes.bits <= 0 or codes.bits % 8:
            raise BundleError(f"{manifest_path}: codes.bits must be a positive multiple of 8, got {codes.bits}")
        ext = models.get("extractor")
        h = r.sub("hash", optional=True)
        head = None if h is None else HashSpec._parse(h, root)
        if head is None:
            if ext is not None and ext.output.dim != codes.bits:
                raise BundleError(
                    f"{manifest_path}: codes.bits ({codes.bits}) differs from the extractor dim ({ext.output.dim})"
                )
        else:
            if ext is None:
                raise BundleError(f"{manifest_path}: a hash head needs an extractor, and the bundle has none")
            if head.bits != codes.bits:
                raise BundleError(f"{manifest_path}: codes.bits ({codes.bits}) differs from the hash head's bits "
                                  f"({head.bits})")
            if head.dim != ext.output.dim:
                raise BundleError(f"{manifest_path}: hash.dim ({head.dim}) differs from the extractor dim "
                                  f"({ext.output.dim})")

        g = r.sub("recognition")
        recognition = RecognitionDefaults(
            max_distance=g.get("max_distance", int),
            final_nms_iou=float(g.get("final_nms_iou", (int, float))),
            whole_image=g.choice("whole_image", ("if_none", "always", "never")),
            top_k=g.get("top_k", int),
        )
        g.done()
        tools = r.get("tools", dict)
        r.done()
        return cls(root, name, models, codes, recognition, dict(tools), data, head)

    def verify(self) -> None:
        """Check every model file (and the hash head) against its recorded sha256.

        Raises:
          MissingFileError: a model file or the hash head file is missing.
          IntegrityError: a digest differs.
        """
        files = [(spec.path, spec.sha256, "model") for spec in self.models.values()]
        if self.hash is not None:
            files.append((self.hash.path, self.hash.sha256, "hash head"))
        for path, sha, what in files:
            if not path.is_file():
                raise MissingFileError(f"{path}: {what} file named by {self.path / MANIFEST_NAME} is missing")
            seen = sha256_file(path)
            if seen != sha:
                raise IntegrityError(
                    f"{path}: sha256 is {seen}, but {MANIFEST_NAME} records {sha}; "
                    "the file was changed or damaged after conversion"
                )

    def load_hash_head(self):
        """The bundle's hash head (:class:`edge_shitu.hashing.HashHead`), or None for plain sign codes.

        The file's sha256 is checked again here, so the head used is the one the fingerprint names.

        Raises:
          MissingFileError: the head file is missing.
          IntegrityError: its sha256 differs from the manifest.
          HashHeadError: the file is malformed.
          BundleError: its shape differs from what the manifest records.
        """
        if self.hash is None:
            return None
        from edge_shitu.hashing import HashHead

        spec = self.hash
        if not spec.path.is_file():
            raise MissingFileError(f"{spec.path}: hash head file named by {self.path / MANIFEST_NAME} is missing")
        data = spec.path.read_bytes()
        seen = hashlib.sha256(data).hexdigest()
        if seen != spec.sha256:
            raise IntegrityError(
                f"{spec.path}: sha256 is {seen}, but {MANIFEST_NAME} records {spec.sha256}; "
                "the file was changed or damaged after it was installed"
            )
        head = HashHead.from_bytes(data, where=str(spec.path))
        if (head.bits, head.dim) != (spec.bits, spec.dim):
            raise BundleError(f"{spec.path}: weight is [{head.bits}, {head.dim}], but {MANIFEST_NAME} records "
                              f"bits {spec.bits}, dim {spec.dim}")
        return head

    @property
    def verification(self) -> Optional[Mapping[str, Any]]:
        """The converter's ``verify.json`` (agreement with the source models), or None if never verified.

        Raises:
          BundleError: the file exists but is not valid JSON.
        """
        path = self.path / VERIFY_NAME
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None

    @property
    def detector(self) -> Optional[ModelSpec]:
        return self.models.get("detector")

    @property
    def extractor(self) -> Optional[ModelSpec]:
        return self.models.get("extractor")

    @property
    def is_replica(self) -> bool:
        """True when any model has random weights (a replica): its outputs carry no meaning."""
        return any(m.is_replica for m in self.models.values())

    def require(self, role: str) -> ModelSpec:
        """Return the model of ``role``.

        Raises:
          BundleError: the bundle has no such model.
        """
        spec = self.models.get(role)
        if spec is None:
            raise BundleError(f"{self.path}: bundle has no {role} model (it has: {', '.join(self.models)})")
        return spec

    @property
    def code_fingerprint(self) -> str:
        """Identity of the codes this bundle makes: galleries record it and refuse other models' queries.

        It depends on the extractor file, the code layout and the hash head file (when there is one),
        not on the detector. A bundle without a head has the fingerprint it always had.

        Raises:
          BundleError: the bundle has no extractor.
        """
        ext = self.require("extractor")
        fields = {"extractor_sha256": ext.sha256, "bits": self.codes.bits, "method": self.codes.method,
                  "bit_order": self.codes.bit_order}
        if self.hash is not None:
            fields["hash_sha256"] = self.hash.sha256
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _parse_model(role: str, r: _Reader, root: Path) -> ModelSpec:
    file = r.get("file", str)
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise BundleError(f"{r.manifest}: {r.where}.file must be a path inside the bundle, got {file!r}")
    sha = r.get("sha256", str)
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise BundleError(f"{r.manifest}: {r.where}.sha256 must be 64 lowercase hex digits, got {sha!r}")
    backend = r.choice("backend", ("onnxruntime", "paddlelite"))
    precision = r.choice("precision", ("fp32", "fp16", "int8"))
    target = r.get("target", str, optional=True, default="any")
    if target not in ("any", "x86", "arm"):
        raise BundleError(f"{r.manifest}: {r.where}.target must be any, x86 or arm, got {target!r}")
    inp = InputSpec._parse(r.sub("input"))
    out_r = r.sub("output")
    if role == "detector":
        output: Union[HeadsSpec, EmbeddingSpec] = HeadsSpec._parse(out_r)
        labels = r.strings("labels")
        defaults = r.get("defaults", dict)
        if len(labels) != output.num_classes:
            raise BundleError(f"{r.manifest}: {r.where}.labels has {len(labels)} names for {output.num_classes} classes")
    else:
        output = EmbeddingSpec._parse(out_r)
        labels, defaults = (), {}
    source = r.get("source", dict)
    quantization = r.get("quantization", dict, optional=True, default={})
    r.done()
    if precision == "int8" and not quantization:
        raise BundleError(f"{r.manifest}: {r.where} is int8 but does not say how it was quantised (quantization)")
    return ModelSpec(role, root / file, sha, backend, precision, target, inp, output, labels, dict(defaults),
                     dict(source), dict(quantization))
