"""A check on the Triton kernels that torch.compile (Inductor) generates for the compiled pieces.

A Triton kernel that stores a buffer and later loads the same buffer back, with no barrier between,
may read stale memory: Triton replicates the elements of a small block across warps, stores each
from one warp only, and orders nothing between warps, so another warp's load can come first.
Inductor emits such read-backs when it fuses a buffer it writes with a later loop that reads it
(pytorch issue 190517; it guards only the opposite order, a store after a load, triton issue 1615).
On an H200 this gave the hash layers' routing stale experts (bench/NOTES.md). DeepseekV4Gpu installs
the check when it compiles pieces, so such a kernel fails the warm-up instead of decoding wrong.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from unittest import mock

_KERNEL = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)'''", re.DOTALL)
_STORE = re.compile(r"tl\.store\((\w+)\b")
_LOAD = re.compile(r"tl\.load\((\w+)\b")
_BARRIER = "tl.debug_barrier()"


class KernelReadsBackError(RuntimeError):
    pass


def triton_kernels(output_code: str) -> dict[str, str]:
    """Inductor's output code (a compiled graph's wrapper module) -> {kernel name: Triton source}."""
    return dict(_KERNEL.findall(output_code))


def read_backs(kernel_source: str) -> list[str]:
    """The buffers (pointer arguments) that `kernel_source` loads after it stored them, with no
    barrier after the store: one entry per such load, as `pointer: line`."""
    stored, found = set(), []
    for line in kernel_source.splitlines():
        if _BARRIER in line:
            stored.clear()
        found += [f"{name}: {line.strip()}" for name in _LOAD.findall(line) if name in stored]
        stored.update(_STORE.findall(line))
    return found


def kernels_reading_back(codes: list[str]) -> dict[str, list[str]]:
    """{kernel name: its read-backs} over the output codes, for the kernels that have any."""
    kernels = {name: src for code in codes for name, src in triton_kernels(code).items()}
    return {name: found for name, src in kernels.items() if (found := read_backs(src))}


def check_output_code(code: str) -> None:
    """Raise KernelReadsBackError, naming the kernels and their loads, if `code` has any read-back."""
    found = kernels_reading_back([code])
    if found:
        raise KernelReadsBackError(
            "torch.compile generated Triton kernels that load a buffer they stored before, with no "
            "barrier between: a race between warps, which reads stale values (pytorch issue 190517). "
            f"{found}. Serve with compile_attention false, or change the compiled piece so that its "
            "kernel does not read its own output back.")


def install_check() -> None:
    """From now on in this process, every graph Inductor compiles or loads from its cache goes
    through check_output_code (by GraphLowering.save_output_code, Inductor's hook for its output
    code, which torch._inductor.utils.run_and_get_code also uses; a hook already there still
    runs, after)."""
    from torch._inductor.graph import GraphLowering
    previous = GraphLowering.save_output_code
    if getattr(previous, "checks_read_backs", False):
        return

    def check_then_save(code: str) -> None:
        check_output_code(code)
        if previous is not None:
            previous(code)
    check_then_save.checks_read_backs = True
    GraphLowering.save_output_code = check_then_save


@contextlib.contextmanager
def collected_output_code() -> Iterator[list[str]]:
    """Within: the output code of every graph Inductor compiles or loads from its cache, collected
    in place of the check (tests)."""
    from torch._inductor.graph import GraphLowering
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes
