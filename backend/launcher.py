"""Start and stop a real `tritonserver` (the binary inside the `nvidia-pytriton` wheel) on loopback.

    python -m backend.launcher [--model-repository DIR] [--http-port 8000] [--grpc-port 8001]
                              [--metrics-port 8002] [--log-file FILE]

It prepares the python backend directory (the wheel's backend library + the stub for this
interpreter), puts this interpreter's bin/ first on PATH (the stub finds its packages that way)
and its libpython first on LD_LIBRARY_PATH, and waits for readiness with a timeout: a stub that
cannot load makes the server hang in "loading", not fail. No Triton imports here.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def triton_home() -> Path:
    """The tritonserver tree shipped in nvidia-pytriton ($TRITON_HOME when set). Found without
    importing pytriton, whose client half needs packages the server does not."""
    if os.environ.get("TRITON_HOME"):
        return Path(os.environ["TRITON_HOME"])
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise RuntimeError("tritonserver not found: pip install nvidia-pytriton==0.7.0")
    return Path(spec.origin).resolve().parent / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_dir(home: Path, into: Path) -> Path:
    py = home / "backends" / "python"
    stub = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"no python backend stub for Python {sys.version_info.major}.{sys.version_info.minor} in {home}")
    target = into / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (py / "libtriton_python.so", py / "triton_python_backend_utils.py", stub):
        link = target / src.name
        if not link.exists():
            link.symlink_to(src)
    return into


def server_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # This checkout first on the import path: a GPU host's site-packages may hold an unrelated
    # top-level `kernels` package (HF's kernel hub client) that would shadow ours.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    return env


class TritonServer:
    """A tritonserver process on 127.0.0.1. Use as a context manager or call start()/stop()."""

    def __init__(self, model_repository=DEFAULT_REPOSITORY, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file=None,
                 startup_timeout: float = 300.0, extra_env: dict | None = None):
        self.model_repository = Path(model_repository)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.startup_timeout = startup_timeout
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="triton-backends-")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        home = triton_home()
        backends = _backend_dir(home, Path(self._workdir.name))
        return [str(home / "bin" / "tritonserver"), f"--model-repository={self.model_repository}",
                f"--backend-directory={backends}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1", f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
                "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0"]

    def start(self) -> "TritonServer":
        env = {**server_env(), **self.extra_env}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            for leftover in glob.glob("/dev/shm/triton_python_backend_shm_region_*"):
                Path(leftover).unlink(missing_ok=True)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self._workdir.cleanup()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", default=None)
    a = p.parse_args(argv)
    server = TritonServer(a.model_repository, a.http_port, a.grpc_port, a.metrics_port, a.log_file)
    print(f"starting tritonserver (log: {server.log_file}) ...", flush=True)
    with server:
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()


def perf_analyzer() -> tuple[list[str], dict]:
    """The `perf_analyzer` of the tritonclient 2.51 wheel and the environment it needs: it links
    libb64 and libcudart 12, both shipped inside nvidia-pytriton (linked into a private folder).
    $PERF_ANALYZER, when set, is the command to use as it is."""
    import shlex
    import shutil
    if os.environ.get("PERF_ANALYZER"):  # a full command, e.g. "env LD_LIBRARY_PATH=... /path/perf_analyzer"
        return shlex.split(os.environ["PERF_ANALYZER"]), dict(os.environ)
    exe = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    if exe is None:
        raise RuntimeError("perf_analyzer not found: pip install tritonclient==2.51.0")
    libs = triton_home().parent.parent / "nvidia_pytriton.libs"
    private = Path(tempfile.gettempdir()) / f"perf-analyzer-libs-{os.getuid()}"
    private.mkdir(exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        link = private / name
        if found and not link.exists():
            link.symlink_to(found[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(private), env.get("LD_LIBRARY_PATH", "")] if p)
    return [exe], env
