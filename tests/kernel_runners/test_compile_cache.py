"""The compile cache on disk (kernels/cute_compile.py): a second process loads what the first
compiled, a different configuration compiles, and a damaged entry is compiled again and replaced."""
from pathlib import Path

from . import compile_for

CODE = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from kernels.moe import _compiled_dispatch\n"
        "fn = _compiled_dispatch({experts}, 'sm_90a')\n"
        "print('callable', callable(fn))\n")


def test_a_restart_loads_the_compiled_kernels_from_disk(tmp_path):
    first = compile_for("sm_90a", CODE.format(experts=256), cache_dir=str(tmp_path))
    assert "compiled dispatch_launch (256,)" in first and "callable True" in first
    entries = list(tmp_path.glob("dispatch_launch-*.o"))
    assert len(entries) == 1

    second = compile_for("sm_90a", CODE.format(experts=256), cache_dir=str(tmp_path))
    assert "loaded dispatch_launch (256,) from the compile cache" in second and "compiled" not in second
    assert "callable True" in second

    other = compile_for("sm_90a", CODE.format(experts=384), cache_dir=str(tmp_path))
    assert "compiled dispatch_launch (384,)" in other and len(list(tmp_path.glob("*.o"))) == 2

    entries[0].write_bytes(b"not an object file")
    damaged = compile_for("sm_90a", CODE.format(experts=256), cache_dir=str(tmp_path))
    assert "unusable" in damaged and "compiled dispatch_launch (256,)" in damaged
    assert Path(entries[0]).stat().st_size > 1000  # replaced by a good entry


def test_the_cache_keeps_the_recently_used_entries_under_its_size_limit(tmp_path, monkeypatch):
    import os

    from kernels.cute_compile import prune_cache
    entries = []
    for i in range(6):  # 100 KB each, used in order 0..5
        entry = tmp_path / f"kernel-{i}.o"
        entry.write_bytes(bytes(100 * 1024))
        os.utime(entry, (1000 + i, 1000 + i))
        entries.append(entry)
    os.utime(entries[1], (2000, 2000))  # loaded again lately
    (tmp_path / "notes.txt").write_text("not an entry")
    monkeypatch.setenv("DSV4_COMPILE_CACHE_MB", str(350 / 1024))  # room for 3 entries
    prune_cache(tmp_path, keep=entries[0])  # just written: kept however old its time
    assert sorted(p.name for p in tmp_path.glob("*.o")) == ["kernel-0.o", "kernel-1.o", "kernel-5.o"]
    assert (tmp_path / "notes.txt").exists()
