"""A real tritonserver (from nvidia-pytriton) on loopback, serving the tiny synthetic model on CPU."""
import re
import shutil
import time
import urllib.request

import pytest

from backend.launcher import DEFAULT_REPOSITORY, TritonServer


def start_server(tmp_path_factory, **parameters) -> TritonServer:
    """A server over a copy of the model repository with `parameters` overriding config.pbtxt."""
    repo = tmp_path_factory.mktemp("model_repository")
    shutil.copytree(DEFAULT_REPOSITORY, repo, dirs_exist_ok=True)
    config = repo / "deepseek_v4" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        text, n = re.subn(rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        assert n == 1, key
    config.write_text(text)
    return TritonServer(repo, extra_env={"DSV4_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "dsv4-cache")}).start()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory, max_num_seqs="8", max_model_len="256", max_queue="64")
    yield s
    s.stop()
    log = s.log_file.read_text()
    assert "Traceback" not in log, "the server log holds a traceback"


def metric(server: TritonServer, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"metric {name} not exported"
    return float(m.group(1))


def wait_for_metric(server, name, value, timeout=30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        current = metric(server, name)
        if current == value or time.monotonic() > deadline:
            return current
        time.sleep(0.25)
