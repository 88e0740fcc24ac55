"""The benchmarks' CPU-side helpers."""
from bench.decode_profile import timeline


def test_timeline_orders_a_traces_gpu_work_and_sums_each_streams_busy_time():
    ev = lambda name, ts, dur, stream, cat="kernel": {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                                      "args": {"stream": stream}}
    trace = {"traceEvents": [ev("late", 130.0, 30.0, 7), ev("first", 100.0, 2.0, 7), ev("side", 105.0, 12.5, 21),
                             ev("copy", 140.0, 1.0, 7, "gpu_memcpy"), ev("cpu op", 90.0, 50.0, 0, "cpu_op"),
                             {"ph": "i", "name": "marker", "ts": 95.0}]}
    busy, kernels = timeline(trace, min_us=10.0)
    assert busy == {7: 33.0, 21: 12.5}  # the CPU op and the instant event are not GPU work
    assert kernels == [(5.0, 12.5, 21, "side"), (30.0, 30.0, 7, "late")]  # from the first GPU work, in order
