"""fusionblocks/_device.py: the names that benchmark records and the autotune cache give a machine."""
import torch

from fusionblocks._device import cpu_name, device_name, device_slug

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
