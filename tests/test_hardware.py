"""--dtype auto, hardware provenance, and plain progress lines for logs."""

from __future__ import annotations

import pytest

from actcache.models import cpu_flags, hardware, resolve_dtype

AMX = "processor : 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8\n"
AVX512_BF16 = "flags : fpu avx2 avx512f avx512_bf16\n"
PLAIN = "flags : fpu sse avx2 avx512f avx512bw\n"


@pytest.mark.parametrize("text, want", [(AMX, "bfloat16"), (AVX512_BF16, "bfloat16"), (PLAIN, "float32"),
                                        ("", "float32")])
def test_auto_dtype_from_cpu_flags(text, want):
    flags = cpu_flags(text)
    assert resolve_dtype("auto", "cpu", flags) == want
    hw = hardware("cpu", flags)
    assert hw["bf16_native"] == (want == "bfloat16")
    assert hw["amx_bf16"] == ("amx_bf16" in text)
    assert hw["class"].startswith("cpu-") and hw["class"].endswith("-amx") == ("amx_bf16" in text)


@pytest.mark.parametrize("bf16_ok, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cuda_follows_bf16_support(monkeypatch, bf16_ok, want):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0) if bf16_ok else (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_dtype("auto", "cuda", set()) == want  # CPU flags do not matter on a GPU
    assert hardware("cuda", {"amx_bf16"})["class"] == ("cuda-sm90" if bf16_ok else "cuda-sm70")


def test_explicit_dtype_is_kept_and_checked():
    from actcache.errors import ModelError

    assert resolve_dtype("float32", "cpu", {"amx_bf16"}) == "float32"
    assert resolve_dtype("bfloat16", "cpu", set()) == "bfloat16"
    with pytest.raises(ModelError, match="auto"):
        resolve_dtype("fp8", "cpu", set())


def test_plain_progress_lines_at_start_interval_and_end(monkeypatch, capsys):
    import time

    from actcache_cli.main import _plain_progress

    clock = iter([0.0, 1.0, 20.0, 21.0, 22.0, 22.5])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    cb = _plain_progress(15)
    for done in (0, 1, 5, 6, 10, 10):
        cb("build isolated", done, 10)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines  # start, one after 15 s, the end (once)
    assert "build isolated: 0/10 (0%)" in lines[0]
    assert "build isolated: 5/10 (50%)" in lines[1] and "ETA" in lines[1]
    assert "10/10 (100%)" in lines[2] and "ETA" not in lines[2]
