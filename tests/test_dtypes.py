"""``dtype: auto``: bf16 only where the hardware computes it natively, with the capability mocked both ways."""

import pytest
import torch

from speechmapper_tune import dtypes
from speechmapper_tune.dtypes import autocast_dtype, dtype_name, native_bf16, resolve_dtype


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what torch's capability query answers on the CPU; caches are cleared around each test."""

    def set_native(native: bool):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
        native_bf16.cache_clear()
        dtypes._say_once.cache_clear()

    yield set_native
    native_bf16.cache_clear()
    dtypes._say_once.cache_clear()


def test_auto_is_fp32_on_a_cpu_that_emulates_bf16(cpu_bf16, capsys):
    cpu_bf16(False)
    assert resolve_dtype("auto", "cpu", setting="llm.dtype") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32  # unset means auto
    err = capsys.readouterr().err
    assert err.count("llm.dtype=auto -> fp32") == 1 and "no native bf16" in err
    resolve_dtype("auto", "cpu", setting="llm.dtype")
    assert "auto" not in capsys.readouterr().err  # said once per process


def test_auto_is_bf16_on_a_cpu_that_computes_it(cpu_bf16, capsys):
    cpu_bf16(True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert "-> bf16" in capsys.readouterr().err
    assert autocast_dtype("auto", "cpu") == torch.bfloat16


def test_explicit_bf16_runs_with_one_warning_where_emulated(cpu_bf16, capsys):
    cpu_bf16(False)
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("slower than fp32") == 1
    cpu_bf16(True)
    resolve_dtype("bf16", "cpu")
    assert capsys.readouterr().err == ""  # native: nothing to warn about


def test_explicit_fp32_and_autocast_off(cpu_bf16):
    cpu_bf16(True)
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert autocast_dtype("fp32", "cpu") is None
    cpu_bf16(False)
    assert autocast_dtype("auto", "cpu") is None


def test_auto_on_cuda_follows_the_device(monkeypatch, cpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    native_bf16.cache_clear()
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


def test_bad_name_names_the_setting():
    with pytest.raises(ValueError, match=r"llm\.dtype='half'.*auto"):
        resolve_dtype("half", "cpu", setting="llm.dtype")
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", "cpu")  # a compute dtype: fp16 only where a setting allows it
    assert resolve_dtype("fp16", "cpu", allowed=("fp16",)) == torch.float16


def test_dtype_name_round_trips():
    assert [dtype_name(resolve_dtype(n, "cpu")) for n in ("fp32", "bf16")] == ["fp32", "bf16"]
