"""What every CuTe DSL runner shares to compile: the disk cache, the target architecture, fake
tensors describing the arguments, and the TVM-FFI compile (torch tensors in, current stream).

Kernels compile once per static configuration with every size symbolic. Each compiled function
(host launcher and device code) is exported as an object file into $CUTE_DSL_CACHE_DIR (default:
$DSV4_CACHE_DIR/cute-dsl or ~/.cache/deepseek-v4-triton/cute-dsl), keyed by the sources of
`kernels/`, the argument specs, the constants, the target and the CuTe DSL version; a later
process loads it instead of compiling (CuTe DSL's own file cache skips `cute.compile`d functions;
CUTE_DSL_DISABLE_FILE_CACHING=1 turns ours off too). Past $DSV4_COMPILE_CACHE_MB (default 256),
the least recently used entries are removed. Compile before any CUDA-graph capture: compiling
cannot happen inside one.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("deepseek_v4")


def target_arch(device=None) -> str:
    """sm_XYa of a CUDA device; without one, $CUTE_DSL_ARCH (the CPU-only compile target), else sm_90a."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}a"
    return os.environ.get("CUTE_DSL_ARCH", "sm_90a")


def fake(dtype, *dims, order: tuple | None = None):
    """A compact fake tensor for compiling; None dims are symbolic (any size at run time). `order`
    ranks the modes from contiguous (0) up; default row-major."""
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor
    shape = tuple(cute.sym_int() if d is None else d for d in dims)
    order = order if order is not None else tuple(range(len(shape)))[::-1]
    return make_fake_compact_tensor(dtype, shape, stride_order=order, assumed_align=16)


def cache_root() -> Path:
    """Where compiled kernels live across restarts: $DSV4_CACHE_DIR, or ~/.cache/deepseek-v4-triton."""
    return Path(os.environ.get("DSV4_CACHE_DIR") or Path.home() / ".cache" / "deepseek-v4-triton")


def cache_dir() -> Path:
    if "CUTE_DSL_CACHE_DIR" not in os.environ:
        os.environ["CUTE_DSL_CACHE_DIR"] = str(cache_root() / "cute-dsl")
    return Path(os.environ["CUTE_DSL_CACHE_DIR"])


@functools.cache
def _sources_digest() -> str:
    """Every kernel source file: a change anywhere in kernels/ invalidates the disk cache."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_key(entry, args: tuple, constants: tuple) -> str:
    import cutlass
    arch = os.environ.get("CUTE_DSL_ARCH") or (target_arch("cuda") if torch.cuda.is_available() else "")
    parts = (_sources_digest(), entry.__module__, entry.__qualname__, *map(repr, args), repr(constants), arch,
             cutlass.__version__)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def compile_tvm_ffi(entry, args: tuple, constants: tuple = ()):
    """cute.compile of `entry(*args, stream, *constants)` taking torch tensors (TVM-FFI) and launching on
    the current torch stream; loaded from the disk cache when an earlier process compiled it."""
    path = cache_dir() / f"{entry.__name__}-{_cache_key(entry, args, constants)}.o"
    symbol = path.stem.replace("-", "_")
    import cutlass.cute as cute
    from cutlass.runtime import load_module, make_fake_stream
    start = time.perf_counter()
    use_disk = os.environ.get("CUTE_DSL_DISABLE_FILE_CACHING", "").lower() not in ("1", "true")
    if use_disk and path.exists():
        try:
            fn = getattr(load_module(str(path), enable_tvm_ffi=True), symbol)
            os.utime(path)  # recently used: kept when the cache is pruned
            log.info("[deepseek_v4] loaded %s %s from the compile cache in %.2f s", entry.__name__, constants,
                     time.perf_counter() - start)
            return fn
        except Exception as exc:  # a damaged entry: compile again and overwrite it
            log.warning("[deepseek_v4] compile cache entry %s unusable (%s: %s), compiling", path,
                        type(exc).__name__, exc)
    fn = cute.compile(entry, *args, make_fake_stream(use_tvm_ffi_env_stream=True), *constants,
                      options="--enable-tvm-ffi")
    compiled = time.perf_counter() - start
    if use_disk:
        _write_cache_entry(fn, path, symbol)
    log.info("[deepseek_v4] compiled %s %s in %.1f s", entry.__name__, constants, compiled)
    return fn


def _write_cache_entry(fn, path: Path, symbol: str) -> None:
    """Export a compiled function as an object file, written whole or not at all (the cache is an
    optimization: a failure is logged and serving goes on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.o")  # then renamed: readers never see half a file
        fn.export_to_c(str(partial), function_name=symbol)
        os.replace(partial, path)
        prune_cache(path.parent, keep=path)
    except Exception as exc:
        log.warning("[deepseek_v4] could not write the compile cache entry %s: %s: %s", path, type(exc).__name__, exc)


def prune_cache(directory: Path, keep: Path | None = None) -> None:
    """Keep the cache under $DSV4_COMPILE_CACHE_MB (default 256): the least recently used entries
    go first. Every change to kernels/ keys a new set of entries (about 50 KB each), so without
    this the directory only grows."""
    limit = float(os.environ.get("DSV4_COMPILE_CACHE_MB", "256")) * 2**20
    entries = sorted(directory.glob("*.o"), key=lambda p: p.stat().st_mtime)  # oldest first
    total = sum(p.stat().st_size for p in entries)
    for entry in entries:
        if total <= limit:
            break
        if entry == keep:
            continue
        total -= entry.stat().st_size
        entry.unlink(missing_ok=True)
