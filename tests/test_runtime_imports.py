"""The runtime stays lean: importing and using it never pulls in the converter, benchmarks, Paddle or OpenCV,
and the backend is imported only when a session is created."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("converters", "bench", "paddle", "paddle2onnx", "cv2", "onnx", "yaml", "matplotlib", "hnswlib", "psutil")


def _modules_after(code: str) -> set:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def _heavy(mods: set, names=HEAVY) -> list:
    return sorted(m for m in mods if m.split(".")[0] in names)


def test_importing_every_runtime_module_loads_no_heavy_package():
    mods = _modules_after(
        "import edge_shitu, edge_shitu.cli, edge_shitu.recognizer, edge_shitu.gallery, edge_shitu.enrol, "
        "edge_shitu.detector, edge_shitu.embedder, edge_shitu.image, edge_shitu.codes, edge_shitu.bundle, "
        "edge_shitu.search, edge_shitu.calibration, edge_shitu.hashing, edge_shitu.hash_training, "
        "edge_shitu.cli.bench, edge_shitu.cli.calibrate, edge_shitu.cli.hashing\n"
        "edge_shitu.cli._parser()"
    )
    # faiss is the optional accelerated search: loaded when a gallery is opened, never on import.
    assert _heavy(mods, HEAVY + ("onnxruntime", "faiss")) == []


def test_cli_help_and_gallery_commands_need_no_backend(tmp_path):
    db = tmp_path / "g.db"
    mods = _modules_after(
        "from edge_shitu.gallery import Gallery\n"
        f"Gallery.create({str(db)!r}, fingerprint='ab' * 16).close()\n"
        "from edge_shitu.cli import main\n"
        f"assert main(['gallery', 'info', {str(db)!r}]) == 0\n"
    )
    assert _heavy(mods, HEAVY + ("onnxruntime",)) == []


def test_lazy_package_attributes():
    import edge_shitu

    assert edge_shitu.Gallery.__name__ == "Gallery"
    assert "Recognizer" in dir(edge_shitu)
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        edge_shitu.Nope  # noqa: B018


def test_python_dash_m_runs_the_cli():
    # Side environments (Paddle-Lite's Python 3.10) call the CLI this way, without the console script.
    proc = subprocess.run([sys.executable, "-m", "edge_shitu.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("edge-shitu ")
