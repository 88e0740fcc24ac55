#!/usr/bin/env bash
# The main job: sets up .venv if needed, starts a real tritonserver on loopback with this model
# repository (the tiny synthetic DeepSeek-V4 by default, generated on first use; the GPU when there
# is one), streams one generation through the client over gRPC, and stops the server.
#   bash tools/serve-demo.sh ["prompt"] [--max-tokens N] [--protocol grpc|http]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup-env.sh
prompt=${1:-"The quick brown fox"}
shift || true
exec python - "$prompt" "$@" <<'PY'
import sys
from backend.launcher import TritonServer
from deepseek_v4_client.cli import main as client
server = TritonServer()
print(f"starting tritonserver (log: {server.log_file}) ...", flush=True)
with server:
    proto = "http" if "http" in sys.argv[2:] else "grpc"
    url = server.http_url if proto == "http" else server.grpc_url
    print(f"ready; streaming over {proto} from {url}", flush=True)
    code = client(["generate", sys.argv[1], "--stream", "--url", url, *sys.argv[2:]])
sys.exit(code)
PY
