"""The runtime stays lean: importing and using it never pulls in the converter, benchmarks, Paddle or OpenCV,
and the backend is imported only when a session is created."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEAVY = ("converters", "bench", "paddle", "paddle2onnx", "cv2", "onnx", "yaml", "matplotlib", "hnswlib", "psutil")
TOOLS = ("edge_shitu_converters", "edge_shitu_bench")
RUNTIME = Path(__file__).resolve().parent.parent / "edge_shitu"


def _modules_after(code: str) -> set:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def _heavy(mods: set, names=HEAVY) -> list:
    return sorted(m for m in mods if m.split(".")[0] in names)


def _runtime_modules() -> list:
    names = []
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME.parent).with_suffix("").parts
        if parts[-1] != "__main__":  # running it is running the CLI
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_every_runtime_module_loads_no_tool_and_no_heavy_package():
    modules = _runtime_modules()
    assert len(modules) > 20 and "edge_shitu.cli.images" in modules
    mods = _modules_after("import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % (modules,))
    # faiss is the optional accelerated search: loaded when a gallery is opened, never on import.
    assert _heavy(mods, HEAVY + TOOLS + ("onnxruntime", "faiss")) == []


def test_the_runtime_never_names_the_tools():
    pattern = re.compile(r"\b(edge_shitu_converters|edge_shitu_bench|converters|bench)\.[a-z_]+|"
                         r"(from|import)\s+(edge_shitu_converters|edge_shitu_bench|converters|bench)\b")
    named = [f"{path.relative_to(RUNTIME.parent)}:{n}" for path in sorted(RUNTIME.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert named == []


def test_help_lists_plugins_without_loading_what_they_need(tmp_path):
    mods = _modules_after("import io\nfrom edge_shitu.cli import main\n"
                          "assert main(['--help'], stdout=io.StringIO(), stderr=io.StringIO()) == 0")
    assert _heavy(mods, HEAVY + ("onnxruntime", "faiss", "tqdm")) == []


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
