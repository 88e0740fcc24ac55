"""Kernel runners' CPU tier."""
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_for(arch: str, code: str, timeout: int = 1200, cache_dir: str | None = None) -> str:
    """Run `code` in a fresh interpreter whose CuTe DSL targets `arch` (CUTE_DSL_ARCH must be set
    before cutlass is imported: a process compiles for one arch); -> its stdout and stderr. Fails
    with the tail of its stderr. The compile cache is `cache_dir`, by default an empty one, so
    every kernel really compiles."""
    with tempfile.TemporaryDirectory() as empty:
        run = subprocess.run([sys.executable, "-c", f"import os; os.environ['CUTE_DSL_ARCH'] = {arch!r}\n" + code],
                             capture_output=True, text=True, timeout=timeout, cwd=REPO,
                             env={**os.environ, "CUTE_DSL_ARCH": arch, "CUTE_DSL_CACHE_DIR": cache_dir or empty})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr
