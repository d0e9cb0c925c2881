"""Model bundles: a directory with ``manifest.json`` and the model files it names, or the same files
packed into one file (``.esb``, see :mod:`edge_shitu.bundlefile`).

The manifest says everything the runtime needs (input size, resize kind, mean/std, output meaning,
default thresholds, code layout, provenance); nothing is guessed. It is parsed strictly: unknown,
missing or duplicate keys are errors, every value's type and range is checked at load (the
defaults by building the :mod:`edge_shitu.options` dataclasses they configure), sizes are bounded
so a manifest cannot make the runtime allocate without limit, and every model file's sha256 is
checked at load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union

from edge_shitu.errors import BundleError, IntegrityError, InvalidInputError, MissingFileError
from edge_shitu.options import DetectorOptions, RecognizerOptions

if TYPE_CHECKING:
    from edge_shitu.bundlefile import BundleArchive, Member

__all__ = [
    "MANIFEST_NAME",
    "VERIFY_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_JSON_BYTES",
    "MAX_INPUT_SIDE",
    "MAX_FIXED_BATCH",
    "MAX_INPUT_BYTES",
    "MAX_FEATURE_DIM",
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

MAX_JSON_BYTES = 1 << 20
"""Largest ``manifest.json`` or ``verify.json`` read; the converter's are a few KiB."""
_MAX_JSON_DEPTH = 32
MAX_INPUT_SIDE = 4096
"""Largest input height or width a manifest may declare."""
MAX_FIXED_BATCH = 256
"""Largest fixed batch a manifest may declare (-1, any batch, is always allowed): a fixed batch is
padded to on every call."""
MAX_INPUT_BYTES = 256 << 20
"""Largest float32 input tensor a fixed shape may describe (one 4096x4096 image is 192 MiB)."""
MAX_FEATURE_DIM = 8192
"""Largest embedding dimension (and so plain sign code length) a manifest may declare."""
_MAX_LEVELS = 8
_MAX_REG_MAX = 64
_MAX_CLASSES = 10_000
_MAX_PIXEL = 255.0


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


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Refused(ValueError):
    """A JSON text the strict reader refuses (duplicate key, non-finite number)."""


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {_short(key)} in one object")
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _read_json(path: Path, *, finite: bool = True) -> Any:
    """The value of a bundle's small JSON file, read strictly.

    Args:
      path: the file.
      finite: refuse NaN, Infinity and numbers beyond float range (a manifest); verify.json, which
        the converter writes with Python's json, may hold NaN figures.

    Raises:
      FileNotFoundError: no such file (callers say what was missing).
      BundleError: a one-line message naming the file: not a regular file, over
        :data:`MAX_JSON_BYTES`, not UTF-8, not JSON, a duplicate key, a non-finite number, or
        nesting deeper than 32 levels.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise BundleError(f"{path}: {info.st_size} bytes, more than the {MAX_JSON_BYTES} a bundle's JSON file "
                              "may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise BundleError(f"{path}: more than the {MAX_JSON_BYTES} bytes a bundle's JSON file may have")
    return _parse_json(raw, path, finite=finite)


def _parse_json(raw: bytes, path: Union[Path, str, "Member"], *, finite: bool = True) -> Any:
    """The value of a bundle's JSON text, read strictly (see :func:`_read_json`); ``path`` names it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    hooks = {"parse_constant": _no_constant, "parse_float": _finite_float} if finite else {}
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, **hooks)
    except RecursionError:
        data = None
    except _Refused as exc:
        raise BundleError(f"{path}: not valid JSON for a bundle ({exc})") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    else:
        if not _too_deep(data, _MAX_JSON_DEPTH):
            return data
    raise BundleError(f"{path}: not valid JSON for a bundle (nested deeper than {_MAX_JSON_DEPTH} levels)")


def _relative_file(r: "_Reader", key: str) -> str:
    file = r.get(key, str)
    parts = Path(file).parts
    if not file or "\0" in file or Path(file).is_absolute() or ".." in parts or not parts:
        raise r._err(key, f"must be a path inside the bundle, got {_short(file)}")
    return file


def _sha256(r: "_Reader", key: str) -> str:
    sha = r.get(key, str)
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise r._err(key, f"must be 64 lowercase hex digits, got {_short(sha)}")
    return sha


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

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key, int)
        if not low <= value <= high:
            raise self._err(key, f"must be an integer from {low} to {high}, got {value}")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = float(self.get(key, (int, float)))
        if not low <= value <= high:
            raise self._err(key, f"must be a number from {low} to {high}, got {value}")
        return value

    def name(self, key: str) -> str:
        value = self.get(key, str)
        if not value:
            raise self._err(key, "must be a non-empty string")
        return value

    def numbers(self, key: str, length: Optional[int] = None, kind: type = float) -> Tuple:
        values = self.get(key, list)
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if kind is int:
            ok = ok and all(isinstance(v, int) for v in values)
        if not ok or (length is not None and len(values) != length):
            n = f"{length} " if length is not None else ""
            raise self._err(key, f"must be a list of {n}{kind.__name__}s, got {_short(values)}")
        return tuple(kind(v) for v in values)

    def strings(self, key: str) -> Tuple[str, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, str) and v for v in values):
            raise self._err(key, f"must be a list of non-empty strings, got {_short(values)}")
        return tuple(values)

    def choice(self, key: str, choices: Tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise self._err(key, f"must be one of {', '.join(choices)}, got {_short(value)}")
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
      shape: (N, 3, H, W); N = -1 for a dynamic batch, else at most :data:`MAX_FIXED_BATCH`; H and W
        at most :data:`MAX_INPUT_SIDE`; a fixed shape at most :data:`MAX_INPUT_BYTES` of float32.
      resize: "stretch" (aspect ratio not kept, as the reference).
      interpolation: "cubic" (cv2 INTER_CUBIC semantics) or "linear" (cv2 INTER_LINEAR semantics).
      channel_order: "RGB" or "BGR".
      scale: pixel multiplier applied before mean/std (1/255), in (0, 1].
      mean: per-channel mean, in ``channel_order``, each in [-255, 255].
      std: per-channel standard deviation, in ``channel_order``, each in (0, 255].
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
            name=r.name("name"),
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
        n, c, h, w = spec.shape
        batch_ok = n == -1 or 1 <= n <= MAX_FIXED_BATCH
        if c != 3 or not batch_ok or not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise r._err("shape", f"must be [N, 3, H, W] with N = -1 (any batch) or 1 to {MAX_FIXED_BATCH} and "
                                  f"H, W from 1 to {MAX_INPUT_SIDE}, got {list(spec.shape)}")
        if max(n, 1) * c * h * w * 4 > MAX_INPUT_BYTES:
            raise r._err("shape", f"{list(spec.shape)} describes a float32 input of {max(n, 1) * c * h * w * 4} bytes, "
                                  f"more than {MAX_INPUT_BYTES}")
        if not 0 < spec.scale <= 1:
            raise r._err("scale", f"must be in (0, 1], got {spec.scale}")
        if not all(-_MAX_PIXEL <= m <= _MAX_PIXEL for m in spec.mean):
            raise r._err("mean", f"must be numbers in [-255, 255], got {list(spec.mean)}")
        if not all(0 < v <= _MAX_PIXEL for v in spec.std):
            raise r._err("std", f"must be positive numbers at most 255, got {list(spec.std)}")
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
            reg_max=r.integer("reg_max", 1, _MAX_REG_MAX),
            cell_offset=r.number("cell_offset", 0.0, 1.0),
            num_classes=r.integer("num_classes", 1, _MAX_CLASSES),
        )
        r.done()
        n = len(spec.strides)
        if n == 0 or len(spec.scores) != n or len(spec.boxes) != n:
            raise BundleError(f"{r.manifest}: {r.where} needs one scores and one boxes output per stride")
        if n > _MAX_LEVELS or not all(1 <= s <= MAX_INPUT_SIDE for s in spec.strides):
            raise r._err("strides", f"must be 1 to {_MAX_LEVELS} strides from 1 to {MAX_INPUT_SIDE}, "
                                    f"got {list(spec.strides)}")
        if len(set(spec.scores + spec.boxes)) != 2 * n:
            raise BundleError(f"{r.manifest}: {r.where} names an output twice")
        return spec


@dataclass(frozen=True)
class EmbeddingSpec:
    """A feature extractor's output.

    Attributes:
      name: output tensor name, float32 (N, dim).
      dim: embedding dimension, from 8 to :data:`MAX_FEATURE_DIM`.
      normalized: whether the model already L2-normalises (the official models do not).
    """

    name: str
    dim: int
    normalized: bool

    @classmethod
    def _parse(cls, r: _Reader) -> "EmbeddingSpec":
        r.choice("kind", ("embedding",))
        spec = cls(name=r.name("name"), dim=r.integer("dim", 8, MAX_FEATURE_DIM), normalized=r.get("normalized", bool))
        r.done()
        return spec


@dataclass(frozen=True)
class ModelSpec:
    """One model of a bundle.

    Attributes:
      role: "detector" or "extractor".
      path: absolute path of the model file; in a one-file bundle ``<bundle.esb>:<member>``, which
        names the model in messages but is no file: read the model with :meth:`read_bytes`.
      sha256: hex digest recorded by the converter (verified at load).
      backend: backend that runs the file ("onnxruntime" or "paddlelite").
      precision: "fp32", "fp16" or "int8".
      target: machine the file was built for ("any", "x86", "arm").
      input: how images become inputs.
      output: what the outputs mean.
      labels: detector class names (empty for an extractor).
      defaults: detector post-processing defaults (keys of :class:`DetectorOptions`, checked by
        building one at load; ``backend`` is not among them).
      source: provenance as written by the converter (official archive or replica + seed).
      quantization: how an int8 model was quantised (tool, method, calibration photos), else empty.
      manifest: the manifest that describes the model, for messages.
      member: where the model lies in a one-file bundle, or None in a bundle directory.
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
    manifest: Optional[Path] = None
    member: Optional["Member"] = None

    @property
    def is_replica(self) -> bool:
        return self.source.get("kind") == "replica"

    @property
    def nbytes(self) -> int:
        """Size of the model file in bytes.

        Raises:
          MissingFileError: the model file (or the one-file bundle) is missing.
        """
        if self.member is not None:
            return self.member.size
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            raise MissingFileError(f"{self.path}: {self.role} model file is missing") from None

    def read_bytes(self) -> bytes:
        """Return the model file's bytes (from a one-file bundle, without unpacking it to disk).

        Raises:
          MissingFileError: the model file (or the one-file bundle) is missing.
          BundleError: the one-file bundle changed since it was loaded.
        """
        if self.member is not None:
            return self.member.read()
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise MissingFileError(f"{self.path}: {self.role} model file is missing") from None


@dataclass(frozen=True)
class CodeSpec:
    """Binary code layout.

    Attributes:
      bits: code length in bits (a multiple of 8, at most :data:`MAX_FEATURE_DIM`).
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
      path: absolute path of the head file (``hash.npz``); in a one-file bundle ``<bundle.esb>:<member>``.
      sha256: hex digest recorded in the manifest (verified at load; part of the code fingerprint).
      bits: code length the head gives (rows of its weight).
      dim: feature dimension it takes (columns of its weight; the extractor's dim).
      source: provenance (e.g. training method, seed, data) as recorded when it was installed.
      member: where the head lies in a one-file bundle, or None in a bundle directory.
    """

    path: Path
    sha256: str
    bits: int
    dim: int
    source: Mapping[str, Any]
    member: Optional["Member"] = None

    @classmethod
    def _parse(cls, r: _Reader, root: Path, archive: Optional["BundleArchive"]) -> "HashSpec":
        from edge_shitu.hashing import MAX_BITS, MAX_DIM

        file = _relative_file(r, "file")
        sha = _sha256(r, "sha256")
        path, member = _locate(r, "file", file, root, archive)
        spec = cls(path=path, sha256=sha, bits=r.get("bits", int), dim=r.get("dim", int),
                   source=dict(r.get("source", dict, optional=True, default={})), member=member)
        r.done()
        if not 0 < spec.bits <= MAX_BITS or spec.bits % 8 or not 1 <= spec.dim <= MAX_DIM:
            raise BundleError(f"{r.manifest}: {r.where} must have bits a positive multiple of 8 up to {MAX_BITS} and "
                              f"dim from 1 to {MAX_DIM}, got bits {spec.bits}, dim {spec.dim}")
        return spec


@dataclass(frozen=True)
class RecognitionDefaults:
    """Recogniser defaults recorded in the bundle.

    Checked at load by building the :class:`edge_shitu.options.RecognizerOptions` they configure.

    Attributes:
      max_distance: Hamming acceptance radius in bits, from 0 to :data:`MAX_FEATURE_DIM`.
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
      path: the bundle directory, or the one-file bundle (``.esb``).
      name: bundle name.
      models: role -> :class:`ModelSpec`.
      codes: code layout.
      recognition: recogniser defaults.
      tools: versions of the tools that built the bundle.
      manifest: the raw manifest mapping.
      hash: the learned hash head, or None for plain sign codes of the features.
      archive: the member index of a one-file bundle, or None for a bundle directory.
    """

    path: Path
    name: str
    models: Mapping[str, ModelSpec]
    codes: CodeSpec
    recognition: RecognitionDefaults
    tools: Mapping[str, str]
    manifest: Mapping[str, Any]
    hash: Optional[HashSpec] = None
    archive: Optional["BundleArchive"] = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: Union[str, os.PathLike, "Bundle"], *, verify: bool = True) -> "Bundle":
        """Read and check ``path/manifest.json`` and the model files it names.

        A one-file bundle (``.esb``, told by its content: a zip) is read in place, never unpacked; the
        loaded bundle has the same API, its models read from the file by their backends.

        Args:
          path: the bundle directory or one-file bundle (or an already loaded bundle, returned as is).
          verify: check every model file's sha256 against the manifest.

        Raises:
          MissingFileError: the directory or file, its manifest or a model file is missing.
          BundleError: the manifest is larger than :data:`MAX_JSON_BYTES`, not UTF-8, not valid JSON
            (duplicate keys, NaN/Infinity and nesting deeper than 32 levels included), or breaks the
            schema: a missing or unknown key, or a value of the wrong type or out of range. The
            message names the manifest and the key. For a file: it is not a zip, its zip structure
            is not that of a one-file bundle (see :mod:`edge_shitu.bundlefile`), it holds a member
            the manifest does not name, or lacks one it names.
          IntegrityError: a model file's (or the hash head's) sha256 differs from the manifest; the
            manifest or ``verify.json`` of a one-file bundle differs from its CRC-32.
        """
        if isinstance(path, Bundle):
            return path
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        if root.is_file():
            return cls._load_file(root, verify=verify)
        if not root.is_dir():
            raise MissingFileError(f"{root}: bundle directory not found (expected a folder with {MANIFEST_NAME}, "
                                   "or a one-file bundle)")
        try:
            data = _read_json(manifest_path)
        except FileNotFoundError:
            raise MissingFileError(f"{manifest_path}: no manifest; {root} is not an edge-shitu bundle") from None
        bundle = cls._parse(data, root.resolve(), manifest_path)
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def _load_file(cls, path: Path, *, verify: bool) -> "Bundle":
        from edge_shitu.bundlefile import BundleArchive

        archive = BundleArchive.open(path.resolve())
        first = next(iter(archive))
        if first != MANIFEST_NAME:
            raise BundleError(f"{archive.path}: its first member is {first!r}, expected {MANIFEST_NAME}")
        manifest = archive[MANIFEST_NAME]
        data = _parse_json(manifest.read_checked(MAX_JSON_BYTES), manifest)
        bundle = cls._parse(data, archive.path, Path(str(manifest)), archive)
        named = {MANIFEST_NAME, VERIFY_NAME} | {m.member.name for m in bundle.models.values()}
        if bundle.hash is not None:
            named.add(bundle.hash.member.name)
        for name in archive:
            if name not in named:
                raise BundleError(f"{archive.path}:{name}: not named by the manifest; a one-file bundle holds only "
                                  f"{MANIFEST_NAME}, the files it names and {VERIFY_NAME}")
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def _parse(cls, data: Any, root: Path, manifest_path: Path,
               archive: Optional["BundleArchive"] = None) -> "Bundle":
        r = _Reader(data, "manifest", manifest_path)
        fmt = r.get("format", str)
        if fmt != FORMAT:
            raise BundleError(f"{manifest_path}: format is {_short(fmt)}, expected {FORMAT!r}")
        version = r.get("format_version", int)
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {version} is not supported by this edge-shitu "
                f"(supports {FORMAT_VERSION}); convert the models again or upgrade edge-shitu"
            )
        name = r.name("name")
        models_r = r.sub("models")
        models: Dict[str, ModelSpec] = {}
        for role in ROLES:
            m = models_r.sub(role, optional=True)
            if m is not None:
                models[role] = _parse_model(role, m, root, archive)
        models_r.done()
        if not models:
            raise BundleError(f"{manifest_path}: models must hold a detector, an extractor or both")

        c = r.sub("codes")
        codes = CodeSpec(bits=c.get("bits", int), method=c.choice("method", ("sign",)), bit_order=c.choice("bit_order", ("big",)))
        c.done()
        if not 0 < codes.bits <= MAX_FEATURE_DIM or codes.bits % 8:
            raise BundleError(f"{manifest_path}: codes.bits must be a positive multiple of 8 up to {MAX_FEATURE_DIM}, "
                              f"got {codes.bits}")
        ext = models.get("extractor")
        h = r.sub("hash", optional=True)
        head = None if h is None else HashSpec._parse(h, root, archive)
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
            max_distance=g.integer("max_distance", 0, MAX_FEATURE_DIM),
            final_nms_iou=float(g.get("final_nms_iou", (int, float))),
            whole_image=g.choice("whole_image", ("if_none", "always", "never")),
            top_k=g.get("top_k", int),
        )
        g.done()
        try:
            RecognizerOptions(max_distance=recognition.max_distance, top_k=recognition.top_k,
                              whole_image=recognition.whole_image, final_nms_iou=recognition.final_nms_iou)
        except InvalidInputError as exc:
            raise BundleError(f"{manifest_path}: manifest.recognition: {exc}") from None
        tools = r.get("tools", dict)
        if not all(isinstance(v, str) for v in tools.values()):
            raise BundleError(f"{manifest_path}: manifest.tools must map tool names to version strings")
        r.done()
        return cls(root, name, models, codes, recognition, dict(tools), data, head, archive)

    def verify(self) -> None:
        """Check every model file (and the hash head) against its recorded sha256.

        Raises:
          MissingFileError: a model file or the hash head file is missing.
          IntegrityError: a digest differs.
        """
        files = [(spec.path, spec.sha256, spec.member, "model") for spec in self.models.values()]
        if self.hash is not None:
            files.append((self.hash.path, self.hash.sha256, self.hash.member, "hash head"))
        for path, sha, member, what in files:
            if member is not None:
                seen = member.sha256()
            elif not path.is_file():
                raise MissingFileError(f"{path}: {what} file named by {self.path / MANIFEST_NAME} is missing")
            else:
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
          HashHeadError: the file is malformed, or larger than the largest head
            (:data:`edge_shitu.hashing.MAX_FILE_BYTES`).
          BundleError: its shape differs from what the manifest records.
        """
        if self.hash is None:
            return None
        from edge_shitu.errors import HashHeadError
        from edge_shitu.hashing import MAX_FILE_BYTES, HashHead

        spec = self.hash
        if spec.member is None and not spec.path.is_file():
            raise MissingFileError(f"{spec.path}: hash head file named by {self.path / MANIFEST_NAME} is missing")
        size = spec.path.stat().st_size if spec.member is None else spec.member.size
        if size > MAX_FILE_BYTES:
            raise HashHeadError(f"{spec.path}: {size} bytes, more than the {MAX_FILE_BYTES} the largest hash head "
                                "takes")
        data = spec.path.read_bytes() if spec.member is None else spec.member.read()
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
          BundleError: the file exists but is not valid JSON (or is larger than :data:`MAX_JSON_BYTES`).
          IntegrityError: in a one-file bundle, it differs from its CRC-32.
        """
        if self.archive is not None:
            member = self.archive.members.get(VERIFY_NAME)
            if member is None:
                return None
            return _parse_json(member.read_checked(MAX_JSON_BYTES), member, finite=False)
        try:
            return _read_json(self.path / VERIFY_NAME, finite=False)
        except FileNotFoundError:
            return None

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
        return self._code_fingerprint(with_head=True)

    def _code_fingerprint(self, *, with_head: bool) -> str:
        ext = self.require("extractor")
        fields = {"extractor_sha256": ext.sha256, "bits": self.codes.bits, "method": self.codes.method,
                  "bit_order": self.codes.bit_order}
        if with_head and self.hash is not None:
            fields["hash_sha256"] = self.hash.sha256
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]

    @property
    def embedding_fingerprint(self) -> str:
        """Identity of the float features this bundle's extractor makes (galleries record it beside
        stored embeddings, so they are never re-hashed with another model's head).

        It depends on the extractor file and the feature size only: bundles that differ only in
        their hash head share it.

        Raises:
          BundleError: the bundle has no extractor.
        """
        ext = self.require("extractor")
        payload = json.dumps({"extractor_sha256": ext.sha256, "dim": ext.output.dim, "kind": "embedding"},
                             sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]

    @property
    def plain_code_fingerprint(self) -> str:
        """The code fingerprint this bundle's extractor has with plain sign codes (no hash head).

        Raises:
          BundleError: the bundle has no extractor.
        """
        return self._code_fingerprint(with_head=False)


def _locate(r: _Reader, key: str, file: str, root: Path,
            archive: Optional["BundleArchive"]) -> Tuple[Path, Optional["Member"]]:
    """Where a file the manifest names lies: a path in a directory, or a member of a one-file bundle."""
    if archive is None:
        return root / file, None
    from edge_shitu.bundlefile import _canonical

    name = _canonical(file)
    if name not in archive:
        raise r._err(key, f"names {_short(file)}, which {archive.path.name} does not hold")
    return Path(f"{archive.path}:{name}"), archive[name]


def _parse_model(role: str, r: _Reader, root: Path, archive: Optional["BundleArchive"] = None) -> ModelSpec:
    file = _relative_file(r, "file")
    sha = _sha256(r, "sha256")
    backend = r.choice("backend", ("onnxruntime", "paddlelite"))
    precision = r.choice("precision", ("fp32", "fp16", "int8"))
    target = r.get("target", str, optional=True, default="any")
    if target not in ("any", "x86", "arm"):
        raise BundleError(f"{r.manifest}: {r.where}.target must be any, x86 or arm, got {_short(target)}")
    inp = InputSpec._parse(r.sub("input"))
    out_r = r.sub("output")
    if role == "detector":
        output: Union[HeadsSpec, EmbeddingSpec] = HeadsSpec._parse(out_r)
        labels = r.strings("labels")
        defaults = r.get("defaults", dict)
        if len(labels) != output.num_classes:
            raise BundleError(f"{r.manifest}: {r.where}.labels has {len(labels)} names for {output.num_classes} classes")
        device_keys = sorted({"backend", "max_pixels"} & set(defaults))
        if device_keys:
            raise BundleError(f"{r.manifest}: unknown key(s) in {r.where}.defaults: {', '.join(device_keys)} (sessions "
                              "and image limits are chosen by the device, not the manifest)")
        try:
            DetectorOptions.from_mapping(defaults)
        except InvalidInputError as exc:
            raise BundleError(f"{r.manifest}: {r.where}.defaults: {exc}") from None
    else:
        output = EmbeddingSpec._parse(out_r)
        labels, defaults = (), {}
    source = r.get("source", dict)
    quantization = r.get("quantization", dict, optional=True, default={})
    r.done()
    if precision == "int8" and not quantization:
        raise BundleError(f"{r.manifest}: {r.where} is int8 but does not say how it was quantised (quantization)")
    path, member = _locate(r, "file", file, root, archive)
    return ModelSpec(role, path, sha, backend, precision, target, inp, output, labels, dict(defaults),
                     dict(source), dict(quantization), r.manifest, member)
