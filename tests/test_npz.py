"""Archives from users are read with every size checked before the bytes it describes (edge_shitu.npz)."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from edge_shitu.cli import main
from edge_shitu.errors import HashHeadError, InvalidInputError
from edge_shitu_converters.hash_training import load_embeddings
from edge_shitu.hashing import HashHead
from edge_shitu_converters.hash_heads import head_bytes
from edge_shitu.npz import MAX_MEMBERS, ArraySpec, read_npz

GIB = 1 << 30


def _header(shape, descr="<f4", fortran=False, version=(1, 0)) -> bytes:
    buf = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(buf, {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return path


def _bomb(path, name, header: bytes, inflated: int, others=()):
    """A deflated member of ``header`` + ``inflated`` zero bytes: about 1 MB on disk per GiB inflated."""
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(name, "w", force_zip64=True) as f:
            f.write(header)
            for _ in range(inflated // len(chunk)):
                f.write(chunk)
        for other, body in others:
            zf.writestr(other, body)
    return path


def _peak(fn):
    """Run ``fn`` and return (its exception, the peak of traced allocations in bytes)."""
    tracemalloc.start()
    try:
        fn()
    except Exception as exc:  # the caller checks which
        error = exc
    else:
        error = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return error, peak


@pytest.fixture(scope="module")
def head_bomb(tmp_path_factory):
    """hash install's attack: weight.npy declares [16384, 16384] float32 and inflates to 1 GiB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    return _bomb(path, "weight.npy", _header((16384, 16384)), GIB, others=[("bias.npy", _npy(np.zeros(8, np.float32)))])


def test_head_deflate_bomb_is_refused_before_it_inflates(head_bomb):
    assert head_bomb.stat().st_size < 4 << 20
    error, peak = _peak(lambda: HashHead.load(head_bomb))
    assert isinstance(error, HashHeadError), error
    assert str(head_bomb) in str(error) and "weight" in str(error) and "\n" not in str(error)
    assert peak < 16 << 20, f"{peak} bytes allocated"


def test_hash_install_cli_refuses_the_bomb_in_one_line(head_bomb, fake_bundle):
    out, err = io.StringIO(), io.StringIO()
    codes = []
    _, peak = _peak(lambda: codes.append(main(["hash", "install", str(head_bomb), "--bundle", str(fake_bundle)],
                                              stdout=out, stderr=err)))
    assert codes == [2] and str(head_bomb) in err.getvalue()
    assert err.getvalue().count("\n") == 1
    assert peak < 16 << 20


def test_member_larger_than_its_header_says_is_refused(tmp_path):
    w, b = np.ones((8, 16), np.float32), np.zeros(8, np.float32)
    padded = _zip(tmp_path / "padded.npz", {"weight.npy": _npy(w) + bytes(100), "bias.npy": _npy(b)})
    with pytest.raises(HashHeadError, match=r"weight declares \d+ bytes in the archive, but its header describes"):
        HashHead.load(padded)
    short = _zip(tmp_path / "short.npz", {"weight.npy": _npy(w)[:-4], "bias.npy": _npy(b)})
    with pytest.raises(HashHeadError, match="weight declares"):
        HashHead.load(short)
    # Within the per-array cap, but 64 MiB for an [8, 16] header: refused from the zip entry, unread.
    big = _bomb(tmp_path / "big.npz", "weight.npy", _npy(w), 64 << 20, others=[("bias.npy", _npy(b))])
    error, peak = _peak(lambda: HashHead.load(big))
    assert isinstance(error, HashHeadError) and "weight" in str(error)
    assert peak < 16 << 20


def test_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"import pathlib; pathlib.Path({str(marker)!r}).touch()",)

    obj = np.array([Payload()], dtype=object)
    path = _zip(tmp_path / "obj.npz", {"weight.npy": _npy(obj), "bias.npy": _npy(np.zeros(8, np.float32))})
    with pytest.raises(HashHeadError, match="weight has dtype object, expected float32"):
        HashHead.load(path)
    emb = _zip(tmp_path / "emb.npz", {"embeddings.npy": _npy(np.ones((2, 8), np.float32)), "labels.npy": _npy(obj)})
    with pytest.raises(InvalidInputError, match="labels has dtype object"):
        load_embeddings(emb)
    assert not marker.exists()


@pytest.mark.parametrize("body, message", [
    (_header((3,), descr=[("a", "<f4")]) + bytes(12), r"weight has dtype .*, expected float32"),
    (_header((8, 16), descr="<f8") + bytes(8 * 16 * 8), r"weight has dtype float64, expected float32"),
    (_header((8, 16, 2)) + bytes(8 * 16 * 2 * 4), r"weight has shape \[8, 16, 2\], expected 2-D"),
    (_header((8, 100_000)), r"weight has shape \[8, 100000\], beyond the largest allowed \[4096, 8192\]"),
    (b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 20) + b" " * (1 << 20),
     r"weight has a \.npy header of 1048576 bytes"),
    (b"\x93NUMPY\x03\x00" + _header((8, 16))[8:] + bytes(512), r"weight uses \.npy format version 3\.0"),
    (b"not an npy file at all", r"weight is not a \.npy array"),
])
def test_bad_member_headers(tmp_path, body, message):
    path = _zip(tmp_path / "bad.npz", {"weight.npy": body, "bias.npy": _npy(np.zeros(8, np.float32))})
    with pytest.raises(HashHeadError, match=message) as info:
        HashHead.load(path)
    assert str(path) in str(info.value) and "expected" in str(info.value)


def test_member_count_is_bounded_before_the_directory_is_parsed(tmp_path):
    many = _zip(tmp_path / "many.npz", {f"m{i}.npy": b"" for i in range(MAX_MEMBERS + 1)})
    with pytest.raises(InvalidInputError, match=f"holds {MAX_MEMBERS + 1} members, more than {MAX_MEMBERS}"):
        load_embeddings(many)
    # A zip64 end record claiming a million entries: refused from the record, before zipfile reads them.
    good = io.BytesIO()
    np.savez(good, embeddings=np.ones((2, 8), np.float32), labels=np.array([1, 2]))
    data = good.getvalue()
    end = data.rfind(b"PK\x05\x06")
    (directory_offset,) = struct.unpack_from("<L", data, end + 16)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 10**6, 10**6, 10**9, directory_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    lying = tmp_path / "zip64.npz"
    lying.write_bytes(data[:end] + record + locator + data[end:])
    with pytest.raises(InvalidInputError, match="holds 1000000 members"):
        load_embeddings(lying)


def test_damaged_data_is_caught_by_the_crc(tmp_path, rng):
    w = rng.normal(size=(8, 16)).astype(np.float32)
    data = bytearray(head_bytes(HashHead.from_arrays(w, np.zeros(8, np.float32))))
    data[data.find(w.tobytes()) + 5] ^= 0xFF
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(HashHeadError, match="CRC"):
        HashHead.load(path)


def test_legitimate_archives_still_load(tmp_path, rng):
    w = rng.normal(size=(16, 24)).astype(np.float32)
    b = rng.normal(size=16).astype(np.float32)
    np.savez_compressed(tmp_path / "compressed.npz", weight=w, bias=b)
    np.savez(tmp_path / "fortran.npz", weight=np.asfortranarray(w), bias=b)
    for name in ("compressed.npz", "fortran.npz"):
        head = HashHead.load(tmp_path / name)
        np.testing.assert_array_equal(head.weight, w)
        np.testing.assert_array_equal(head.bias, b)
        assert head.weight.flags.c_contiguous
    x = rng.normal(size=(6, 8))
    np.savez_compressed(tmp_path / "emb.npz", embeddings=x, labels=np.array(["a", "b"] * 3),
                        paths=np.array([f"p{i}.jpg" for i in range(6)]))
    data = load_embeddings(tmp_path / "emb.npz")
    assert len(data) == 6 and data.names == ("a", "b")


def test_shared_dev_embeddings_still_load(embeddings_npz):
    if not embeddings_npz.is_file():
        pytest.skip(f"{embeddings_npz} is not here")
    data = load_embeddings(embeddings_npz)
    with np.load(embeddings_npz) as z:
        assert data.embeddings.shape == z["embeddings"].shape
        assert len(data.names) == len(set(z["labels"].tolist()))


def test_embeddings_sizes_are_checked_from_the_header(tmp_path):
    labels = _npy(np.arange(4))
    too_many = _zip(tmp_path / "rows.npz", {"embeddings.npy": _header((20_000_000, 8)), "labels.npy": labels})
    with pytest.raises(InvalidInputError, match=r"embeddings has shape \[20000000, 8\], beyond the largest"):
        load_embeddings(too_many)
    too_big = _zip(tmp_path / "bytes.npz", {"embeddings.npy": _header((1 << 19, 1024)), "labels.npy": labels})
    with pytest.raises(InvalidInputError, match=r"takes 2147483648 bytes, more than the 1073741824 allowed"):
        load_embeddings(too_big)
    long_labels = _zip(tmp_path / "labels.npz", {"embeddings.npy": _npy(np.ones((4, 8), np.float32)),
                                                 "labels.npy": _npy(np.array(["x" * 5000] * 4))})
    with pytest.raises(InvalidInputError, match=r"labels has dtype <U5000, expected strings or integers"):
        load_embeddings(long_labels)


def test_embeddings_bomb_is_refused_before_it_inflates(tmp_path):
    # The header claims 1.2 GB; the member inflates to 256 MiB of it.
    bomb = _bomb(tmp_path / "emb-bomb.npz", "embeddings.npy", _header((300_000, 1024)), 256 << 20,
                 others=[("labels.npy", _npy(np.arange(4)))])
    error, peak = _peak(lambda: load_embeddings(bomb))
    assert isinstance(error, InvalidInputError) and "embeddings" in str(error), error
    assert peak < 16 << 20


def test_array_spec_is_checked():
    with pytest.raises(InvalidInputError, match="kinds"):
        ArraySpec(shape=(4,), kinds="O")
    with pytest.raises(InvalidInputError, match="shape"):
        ArraySpec(shape=())
    assert read_npz(_npy_zip_bytes(), {"a": ArraySpec(shape=(4,))}, where="mem", expected="a")["a"].shape == (3,)


def _npy_zip_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(3, np.float32))
    return buf.getvalue()
