"""How many streamed responses per second the python backend sends from one thread (CPU, any
machine with nvidia-pytriton and tritonclient): a model that answers each request with N responses
shaped like deepseek_v4's (five output tensors), sent from one thread as model.py's sender does,
received over gRPC streaming. One response per token caps a server's tokens/s at this rate (less
where the engine thread holds the GIL), which is why model.py joins the outputs that queue up.

    python -m bench.response_ceiling
"""
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from backend.launcher import TritonServer

CONFIG = """name: "stream_echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "n", data_type: TYPE_INT32, dims: [ 1 ] }, { name: "check_every", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [
  { name: "text_output", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "output_ids", data_type: TYPE_INT32, dims: [ -1 ] },
  { name: "finish_reason", data_type: TYPE_STRING, dims: [ -1 ] },
  { name: "num_input_tokens", data_type: TYPE_UINT32, dims: [ -1 ] },
  { name: "num_output_tokens", data_type: TYPE_UINT32, dims: [ -1 ] }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

MODEL = """import queue, threading
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        self.requests = queue.Queue()
        threading.Thread(target=self.send_loop, daemon=True).start()

    def execute(self, requests):
        for r in requests:
            n, check_every = (int(pb_utils.get_input_tensor_by_name(r, k).as_numpy()[0]) for k in ("n", "check_every"))
            self.requests.put((r.get_response_sender(), n, check_every))
        return None

    def send_loop(self):
        while True:
            sender, n, check_every = self.requests.get()
            for i in range(n):
                if check_every and i % check_every == 0 and sender.is_cancelled():
                    break
                arrays = {"text_output": np.array([b" w1234"], dtype=np.object_),
                          "output_ids": np.array([i], dtype=np.int32),
                          "finish_reason": np.array([b""], dtype=np.object_),
                          "num_input_tokens": np.array([5], dtype=np.uint32),
                          "num_output_tokens": np.array([i + 1], dtype=np.uint32)}
                response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in arrays.items()])
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == n - 1 else 0)
"""


def responses_per_second(url: str, streams: int, n: int, check_every: int) -> float:
    import tritonclient.grpc as grpcclient
    start, end = threading.Barrier(streams + 1), threading.Barrier(streams + 1)

    def stream():
        client = grpcclient.InferenceServerClient(url)
        errors = queue.Queue()
        client.start_stream(callback=lambda result, error: errors.put(error))
        inputs = []
        for name, value in (("n", n), ("check_every", check_every)):
            inputs.append(grpcclient.InferInput(name, [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=np.int32))
        start.wait()
        client.async_stream_infer("stream_echo", inputs)
        for _ in range(n):
            error = errors.get(timeout=120)
            if error is not None:
                raise RuntimeError(error)
        client.stop_stream()
        end.wait()

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    end.wait()
    seconds = time.perf_counter() - t0
    for t in threads:
        t.join()
    return streams * n / seconds


def main():
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "stream_echo"
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(CONFIG)
        (model_dir / "1" / "model.py").write_text(MODEL)
        server = TritonServer(tmp, startup_timeout=120).start()
        try:
            print("| streams | responses per stream | cancellation checked | responses/s |")
            print("|---|---|---|---|")
            for streams, n in ((1, 3000), (8, 500), (32, 150)):
                for check_every, checked in ((0, "never"), (1, "every response"), (10, "every 10th")):
                    rate = responses_per_second(server.grpc_url, streams, n, check_every)
                    print(f"| {streams} | {n} | {checked} | {rate:.0f} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
