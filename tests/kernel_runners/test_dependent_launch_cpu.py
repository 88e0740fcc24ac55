"""The dependent-launch protocol (kernels.dependent_launch) in the PTX of every sm_90a kernel of a
decode step: each waits for the kernel before (`griddepcontrol.wait`), lets the kernel after start
(`griddepcontrol.launch_dependents`) only after that wait, and writes no global memory before it;
only the MoE's L2 GEMV reads global memory before it (the dispatch output steering its prefetch).
Compiled on the CPU, never run here."""
import re
import tempfile
from pathlib import Path

from . import compile_for

KERNELS = {  # label: the compile call, each from its own module's compile function
    "mhc partials": "mhc._compiled_partials(arch)",
    "mhc finish": "mhc._compiled_finish(4096, 20, 1e-6, 1e-6, True, arch)",
    "attention partials": "attention._compiled_partials(16, 512, 512 ** -0.5, True, arch)",
    "attention combine": "attention._compiled_combine(512, 64, True, arch)",
    "fp8 quantizer": "_compiled_quant(arch)",
    "fp8 gemm": "_compiled_fp8_gemm(*fp8_plan(1, 4096, 8192), False, arch)",
    "small linear": "_compiled_small_linear(True, 8, 1, arch)",
    "moe dispatch": "_compiled_dispatch(256, arch)",
    "activation layout": "_compiled_layout(2, arch)",
    "moe L1 gemv": "_compiled(True, 16, arch, 'gemv', top_k=6, swiglu_limit=10.0, **GEMV_L1)",
    "moe L2 gemv": "_compiled(False, 16, arch, 'gemv', **GEMV_L2)",
    "moe L1 mma": "_compiled(True, 16, arch, 'mma', top_k=6, swiglu_limit=10.0, **mma_variants(True)[0])",
}
READS_BEFORE_THE_WAIT = {"moe L2 gemv"}  # its prefetch hint reads the dispatch kernel's output


def _compile_and_keep_ptx(dump: str) -> None:
    """Each kernel's PTX as dump/<label>.ptx (the DSL names its files by argument types, which
    variants share)."""
    code = [f"import glob, os\nos.environ['CUTE_DSL_KEEP_PTX'] = '1'\nos.environ['CUTE_DSL_DUMP_DIR'] = {dump!r}",
            "from kernels import attention, mhc",
            "from kernels.linear import _compiled_fp8_gemm, _compiled_quant, _compiled_small_linear, fp8_plan",
            "from kernels.moe import GEMV_L1, GEMV_L2, _compiled, _compiled_dispatch, _compiled_layout, mma_variants",
            "arch = 'sm_90a'"]
    for label, call in KERNELS.items():
        code += [call, f"[ptx] = glob.glob({dump!r} + '/cutlass_*.ptx')",
                 f"os.rename(ptx, os.path.join({dump!r}, {label!r} + '.ptx'))"]
    compile_for("sm_90a", "\n".join(code), timeout=900)


def _first(lines: list[str], pattern: str) -> int:
    return next((i for i, line in enumerate(lines) if re.match(pattern, line.strip())), len(lines))


def test_every_decode_kernel_waits_for_the_one_before_then_lets_the_next_start():
    with tempfile.TemporaryDirectory() as dump:
        _compile_and_keep_ptx(dump)
        entries = {}
        for label in KERNELS:
            bodies = re.split(r"\n\.visible \.entry ", (Path(dump) / f"{label}.ptx").read_text())[1:]
            assert len(bodies) == 1, f"{label}: {len(bodies)} kernels"
            entries[label] = bodies[0].splitlines()
    for name, lines in entries.items():
        wait = _first(lines, r"griddepcontrol\.wait")
        assert wait < len(lines), f"{name}: no griddepcontrol.wait"
        assert wait < _first(lines, r"griddepcontrol\.launch_dependents") < len(lines), \
            f"{name}: lets the next kernel start before its wait, or never"
        assert _first(lines, r"(st|atom|red)\.global") > wait, f"{name}: writes global memory before its wait"
        reads_early = _first(lines, r"ld\.global") < wait
        assert reads_early == (name in READS_BEFORE_THE_WAIT), f"{name}: reads global memory before its wait: {reads_early}"
