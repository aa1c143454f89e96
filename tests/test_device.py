"""fusionblocks/_device.py: the names that benchmark records and the autotune cache give a machine."""
import pytest
import torch

from fusionblocks._device import cpu_name, device_name, device_slug, resolve_device

# two processors' blocks as Linux prints them; only the first counts
EPYC_GENOA = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC other
"""
EPYC_ROME = EPYC_GENOA.replace("cpu family\t: 25", "cpu family\t: 23").replace("model\t\t: 17", "model\t\t: 49", 1)
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"


def test_cpu_name_tells_apart_cpus_with_the_same_bare_model_name():
    genoa, rome = cpu_name(EPYC_GENOA, cores=2), cpu_name(EPYC_ROME, cores=2)
    assert genoa == "CPU AMD EPYC (family 25 model 17, 2 cores)"
    assert rome == "CPU AMD EPYC (family 23 model 49, 2 cores)"
    assert device_slug(genoa) == "cpu-amd-epyc-family-25-model-17-2-cores"
    assert device_slug(genoa) != device_slug(rome)


def test_cpu_name_without_family_and_model():
    name = cpu_name(ARM, cores=4)
    assert name.startswith("CPU ") and name.endswith(" (4 cores)") and "family" not in name
    assert cpu_name("", cores=1).endswith(" (1 cores)")


def test_device_name_of_this_cpu():
    assert device_name("cpu") == device_name(torch.device("cpu")) == cpu_name()


def test_resolve_device_defaults_to_cuda_of_the_local_rank_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, index=3) == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


def test_resolve_device_names_the_option_and_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a device: expected cpu, cuda or cuda:N$"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^device= 'cuda:x' is not a device"):
        resolve_device("cuda:x", option="device=")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device cuda: no CUDA device here \(torch .*, CUDA build: .*\); "
                                         r"use --device cpu$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


def test_resolve_device_takes_another_accelerator_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with pytest.raises(ValueError, match=r"^--device mps: no MPS device here"):
        resolve_device("mps")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("mps"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(ValueError, match=r"^--device xpu: no XPU device here"):
        resolve_device("xpu")
