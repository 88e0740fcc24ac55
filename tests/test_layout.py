"""Project rules that keep the layers apart (see shared style notes)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_go_one_way():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not _imports(path) & {"backend", "triton_python_backend_utils", "tritonclient"}, path
    for path in (ROOT / "backend").rglob("*.py"):
        assert "triton_python_backend_utils" not in _imports(path), path


def test_no_module_globals_rewritten():
    for folder in ("kernels", "backend"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"^\s*global\s", path.read_text(), re.M), path


def test_file_sizes():
    for folder in ("kernels", "backend"):
        for path in (ROOT / folder).rglob("*.py"):
            limit = 900 if path.name == "model.py" else 400
            assert len(path.read_text().splitlines()) <= limit, path
