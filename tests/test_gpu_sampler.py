"""qwen_daemon.gpu: the telemetry sampler. Host figures from the real /proc; the NVML mapping
through a stub of the few pynvml calls (no GPU exists here); the real NVML path with -m gpu."""

import logging
import sys
import time
import types
from types import SimpleNamespace

import msgpack
import pynvml
import pytest

from qwen_daemon import gpu


def _busy() -> int:
    """A fixed amount of CPU work (tens of ms), so that /proc/stat moves between two samples."""
    return sum(i * i for i in range(400_000))


def test_sample_without_gpu_has_host_figures_and_serialises():
    sampler = gpu.Sampler()
    first = sampler.sample()
    assert first["has_gpu"] is False
    assert first["gpus"] == []
    host = first["host"]
    assert host["memory_total"] > host["memory_used"] > 0
    assert isinstance(host["memory_total"], int)
    assert host["cpu_percent"] is None
    assert host["load_1m"] >= 0

    _busy()
    second = sampler.sample()
    assert 0 < second["host"]["cpu_percent"] <= 100
    assert msgpack.unpackb(msgpack.packb(second)) == second


def test_module_level_sample_and_one_time_log(caplog, monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", None)
    monkeypatch.setattr(gpu, "_default", None)
    with caplog.at_level(logging.INFO, logger="qwen_daemon.gpu"):
        gpu.sample()
        gpu.sample()
        gpu.Sampler().sample()
    reasons = [r for r in caplog.records if "no GPU telemetry" in r.getMessage()]
    assert len(reasons) == 1
    assert reasons[0].levelno == logging.INFO


def test_sample_is_cheap():
    sampler = gpu.Sampler()
    sampler.sample()
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    per_sample = (time.perf_counter() - start) / n
    assert per_sample < 0.002, f"{per_sample * 1e3:.3f} ms per sample"


# --------------------------------------------------------------------------- NVML stub

UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-bbbc3333-0000"]


class FakeNvml:
    """The pynvml calls the sampler makes, over three fake GPUs; handles are NVML indices.
    GPU 1 does not support power readings (as on some cards); errors are pynvml's own."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def nvmlDeviceGetCount(self):
        return len(UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return UUIDS[h]

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H200"  # older pynvml gave bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=42 + h, memory=7)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 50 + h

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise pynvml.NVMLError_NotSupported()
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        if h == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 700_000


def test_nvml_results_map_into_the_topic_body():
    body = gpu.Sampler(nvml=FakeNvml(), visible_devices=None).sample()
    assert body["has_gpu"] is True
    assert [g["index"] for g in body["gpus"]] == [0, 1, 2]
    g0, g1 = body["gpus"][0], body["gpus"][1]
    assert g0 == {
        "index": 0,
        "nvml_index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": UUIDS[0],
        "memory_used": 2**30,
        "memory_total": 80 * 2**30,
        "utilization": 42,
        "temperature": 50,
        "power": 312.5,
        "power_limit": 700.0,
    }
    # Power unsupported on that GPU: those two fields are None, the rest is there.
    assert g1["power"] is None and g1["power_limit"] is None
    assert g1["memory_used"] == 2 * 2**30 and g1["utilization"] == 43 and g1["temperature"] == 51
    assert msgpack.unpackb(msgpack.packb(body)) == body


@pytest.mark.parametrize(
    ("spec", "nvml_indices"),
    [
        (None, [0, 1, 2]),
        ("1,0", [1, 0]),
        (" 2 , 0 ", [2, 0]),
        ("", []),
        ("GPU-bbbc3333-0000,GPU-aaaa1111-0000", [2, 0]),
        ("GPU-aaaa", [0]),  # a unique prefix is enough
        ("gpu-BBBC", [2]),
        ("GPU-bbb,0", []),  # ambiguous prefix: CUDA stops there
        ("0,7,1", [0]),  # out of range stops the list
        ("1,x,0", [1]),
        ("1,1,0", [1]),  # duplicate stops the list
        ("-1", []),  # the usual way to hide all GPUs
        ("MIG-12345678", []),
    ],
)
def test_cuda_visible_devices_parsing(spec, nvml_indices):
    assert gpu.parse_visible_devices(spec, UUIDS) == nvml_indices


def test_cuda_visible_devices_maps_cuda_index_to_nvml_index():
    gpus = gpu.Sampler(nvml=FakeNvml(), visible_devices="1,0").sample()["gpus"]
    assert [(g["index"], g["nvml_index"], g["uuid"]) for g in gpus] == [(0, 1, UUIDS[1]), (1, 0, UUIDS[0])]

    gpus = gpu.Sampler(nvml=FakeNvml(), visible_devices="GPU-bbbc3333-0000").sample()["gpus"]
    assert [(g["index"], g["nvml_index"], g["name"]) for g in gpus] == [(0, 2, "NVIDIA H200")]


def test_visible_devices_default_to_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    gpus = gpu.Sampler(nvml=FakeNvml()).sample()["gpus"]
    assert [(g["index"], g["nvml_index"]) for g in gpus] == [(0, 2)]


def test_nothing_visible_means_no_gpu():
    body = gpu.Sampler(nvml=FakeNvml(), visible_devices="").sample()
    assert body["has_gpu"] is False and body["gpus"] == []


# --------------------------------------------------------------------------- torch_memory


def _fake_torch(available: bool) -> types.ModuleType:
    """Just torch.cuda's memory calls: importing the real torch costs seconds, and without a
    GPU it could only ever show the {} branch."""
    torch = types.ModuleType("torch")
    torch.cuda = SimpleNamespace(
        is_available=lambda: available,
        memory_allocated=lambda d: 100 + d,
        memory_reserved=lambda d: 200 + d,
        max_memory_allocated=lambda d: 300 + d,
    )
    return torch


def test_torch_memory(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False))
    assert gpu.torch_memory(0) == {}
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True))
    assert gpu.torch_memory(1) == {"allocated": 101, "reserved": 201, "peak": 301}


# --------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
def test_real_gpus_are_reported():
    body = gpu.Sampler().sample()
    assert body["has_gpu"] is True
    assert body["gpus"]
    for g in body["gpus"]:
        assert g["memory_total"] > 0
        assert g["name"].startswith("NVIDIA")
        assert g["uuid"].startswith("GPU-")
    assert [g["index"] for g in body["gpus"]] == list(range(len(body["gpus"])))
    assert msgpack.unpackb(msgpack.packb(body)) == body
