"""`precision: auto` is a rule on the machine's capabilities (faked here), and every timing names its machine."""

from __future__ import annotations

import pytest
import torch

from pipeline import machine

UNITS = {
    "AVX-512 without bf16 units": (False, False),
    "AVX-512 BF16": (True, False),
    "AMX": (False, True),
    "AVX-512 BF16 and AMX": (True, True),
}


@pytest.fixture
def cpu_with(monkeypatch):
    """Fake the CPU's bf16 units as torch reports them; oneDNN's own bf16 check says yes everywhere,
    as it does on a plain AVX-512 CPU, so a rule that trusted it would pick bf16 on all of them."""

    def fake(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)

    return fake


@pytest.mark.parametrize("cpu", UNITS)
def test_auto_takes_bf16_exactly_where_the_cpu_has_native_units(cpu_with, cpu, capsys):
    cpu_with(*UNITS[cpu])
    native = any(UNITS[cpu])
    assert machine.native_bf16("cpu") is native
    assert machine.resolve_precision("auto", "cpu", "train.precision") == ("bf16" if native else "fp32")
    assert machine.resolve_precision("fp32", "cpu", "train.precision") == "fp32"
    assert capsys.readouterr().err == ""


def test_explicit_bf16_without_native_units_runs_emulated_after_one_warning(cpu_with, capsys):
    cpu_with(False, False)
    assert machine.resolve_precision("bf16", "cpu", "evaluate.precision") == "bf16"
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: evaluate.precision: bf16 on this cpu is emulated (no AVX-512 BF16 or AMX units), about 3x slower than fp32; "
        "`auto` would choose fp32"
    ]


def test_explicit_bf16_with_native_units_says_nothing(cpu_with, capsys):
    cpu_with(True, False)
    assert machine.resolve_precision("bf16", "cpu", "train.precision") == "bf16"
    assert capsys.readouterr().err == ""


def test_cuda_follows_the_gpu_s_own_bf16_support(monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert machine.resolve_precision("auto", "cuda", "train.precision") == ("bf16" if supported else "fp32")


def test_the_rule_is_the_same_on_every_call(cpu_with):
    """No timing probe: the same machine always resolves the same way."""
    cpu_with(True, False)
    assert {machine.resolve_precision("auto", "cpu", "x") for _ in range(20)} == {"bf16"}


def test_machine_record_names_cpu_cores_units_torch_device_and_precision(cpu_with):
    cpu_with(False, True)
    record = machine.machine_record("cpu", "bf16")
    assert record["cpu"] and record["cores"] >= 1 and record["torch_threads"] >= 1
    assert (record["avx512_bf16"], record["amx"]) == (False, True)
    assert record["torch"] == torch.__version__ and record["device"] == "cpu" and record["precision"] == "bf16"
    line = machine.describe(record)
    assert record["cpu"] in line and "amx" in line and "bf16" in line
    cpu_with(False, False)
    assert "no native bf16 units" in machine.describe(machine.machine_record("cpu", "fp32"))


def test_cpu_model_reads_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: avx512f\n")
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert machine.cpu_model() == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
