"""GPU and host telemetry for the daemon's ``gpu`` topic, sampled once a second.

    from qwen_daemon import gpu
    body = gpu.sample()          # module-level default Sampler
    gpu.torch_memory(rank_dev)   # per-process torch.cuda figures, for trainer workers

The body of a sample::

    {"has_gpu": bool,
     "gpus": [{"index", "nvml_index", "name", "uuid", "memory_used", "memory_total",
               "utilization", "temperature", "power", "power_limit"}, ...],
     "host": {"memory_used", "memory_total", "cpu_percent", "load_1m"}}

GPUs come from NVML (``pynvml``, i.e. nvidia-ml-py), restricted to and ordered like the
devices that ``CUDA_VISIBLE_DEVICES`` lets CUDA see; ``index`` is the CUDA index, ``nvml_index``
the physical one. Host figures come from ``/proc`` (psutil is not a dependency).

A sample must stay cheap (it runs next to training): NVML is initialised once per process,
handles, names and UUIDs are looked up once, and each sample only makes the per-field
queries plus two small ``/proc`` reads.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Marks "read CUDA_VISIBLE_DEVICES from the environment" (None means "unset": all GPUs).
_FROM_ENV: Any = object()

# The first /proc/stat "cpu" fields that make up the total: user nice system idle iowait irq
# softirq steal. guest and guest_nice are left out because the kernel already counts them in
# user and nice.
_CPU_FIELDS = 8


# --------------------------------------------------------------------------- NVML


@dataclass
class VisibleGpu:
    """One GPU the training can see: its CUDA index, NVML index, handle and static identity."""

    index: int
    nvml_index: int
    handle: Any
    name: str
    uuid: str


def _text(value: Any) -> str:
    """NVML strings arrive as ``str`` from recent pynvml and as ``bytes`` from older ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_visible_devices(spec: str | None, uuids: list[str]) -> list[int]:
    """NVML indices of the GPUs that CUDA sees under ``CUDA_VISIBLE_DEVICES=spec``, in CUDA order.

    ``uuids`` are the UUIDs of all GPUs in NVML order. ``spec`` None (unset) means all of them.
    Entries are indices or ``GPU-...`` UUIDs (a unique prefix is enough, as for CUDA). Like
    CUDA, parsing stops at the first entry that is invalid, out of range, ambiguous or a
    duplicate, keeping what came before it; ``MIG-...`` entries are not mapped and stop it too.

    The mapping assumes CUDA enumerates GPUs in NVML's (PCI bus) order, which holds with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and on machines whose GPUs are all the same model.
    """
    if spec is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for raw in spec.split(","):
        entry = raw.strip()
        found: int | None = None
        if entry.upper().startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.lower().startswith(entry.lower())]
            found = matches[0] if len(matches) == 1 else None
        else:
            try:
                number = int(entry)
            except ValueError:
                number = -1
            found = number if 0 <= number < len(uuids) else None
        if found is None or found in chosen:
            break
        chosen.append(found)
    return chosen


def discover(nvml: Any, spec: str | None) -> list[VisibleGpu]:
    """Handles, names and UUIDs of the GPUs visible under ``spec``, via the pynvml-like ``nvml``.

    Done once: these never change for the life of the process, and the name/UUID queries
    would otherwise be half the cost of every sample.
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    return [
        VisibleGpu(
            index=cuda_index,
            nvml_index=nvml_index,
            handle=handles[nvml_index],
            name=_text(nvml.nvmlDeviceGetName(handles[nvml_index])),
            uuid=uuids[nvml_index],
        )
        for cuda_index, nvml_index in enumerate(parse_visible_devices(spec, uuids))
    ]


def _field(nvml: Any, read: Callable[[], Any]) -> Any:
    """``read()``, or None when NVML cannot give that one field (NotSupported, NoPermission,
    GPU lost ...): one missing figure must not cost the whole sample."""
    try:
        return read()
    except nvml.NVMLError:
        return None


def read_gpu(nvml: Any, gpu: VisibleGpu) -> dict:
    """The telemetry dict of one GPU, read through the pynvml-like ``nvml``.

    ``nvml`` is the ``pynvml`` module in production and a stub in tests; it must provide
    ``NVMLError``, ``NVML_TEMPERATURE_GPU`` and the ``nvmlDeviceGet*`` functions used below.
    """
    h = gpu.handle
    memory = _field(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    power_mw = _field(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(h))
    limit_mw = _field(nvml, lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
    return {
        "index": gpu.index,
        "nvml_index": gpu.nvml_index,
        "name": gpu.name,
        "uuid": gpu.uuid,
        "memory_used": int(memory.used) if memory is not None else None,
        "memory_total": int(memory.total) if memory is not None else None,
        "utilization": _field(nvml, lambda: int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)),
        "temperature": _field(nvml, lambda: int(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
        # NVML reports milliwatts.
        "power": power_mw / 1000.0 if power_mw is not None else None,
        "power_limit": limit_mw / 1000.0 if limit_mw is not None else None,
    }


_nvml_lock = threading.Lock()
_nvml_state: tuple[int, Any, str | None] | None = None  # (pid, pynvml module or None, why not)


def _nvml() -> Any:
    """The initialised ``pynvml`` module, or None (logged once at INFO) when there is no GPU.

    nvmlInit happens once per process; the pid is kept so that a forked child initialises
    its own NVML rather than trusting the parent's state.
    """
    global _nvml_state
    with _nvml_lock:
        if _nvml_state is not None and _nvml_state[0] == os.getpid():
            return _nvml_state[1]
        module, why = None, None
        try:
            import pynvml

            pynvml.nvmlInit()
            module = pynvml
        except ImportError as e:
            why = f"pynvml is not importable ({e})"
        except (pynvml.NVMLError, OSError) as e:  # LibraryNotFound, DriverNotLoaded, ...
            why = f"NVML failed to initialise: {type(e).__name__}: {e}"
        if why is not None:
            log.info("no GPU telemetry: %s", why)
        _nvml_state = (os.getpid(), module, why)
        return module


# --------------------------------------------------------------------------- host


def read_meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
    """(used, total) host memory in bytes; used = MemTotal - MemAvailable (page cache is free)."""
    total = available = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith(b"MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break  # MemAvailable comes after MemTotal; nothing else is needed
    return total - available, total


def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(busy, total) jiffies summed over all cores since boot, from the first line of /proc/stat."""
    with open(path, "rb") as f:
        fields = [int(x) for x in f.readline().split()[1 : 1 + _CPU_FIELDS]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields)
    return total - idle, total


# --------------------------------------------------------------------------- sampler


class Sampler:
    """Produces ``gpu`` topic bodies; holds the NVML handles and the previous CPU reading.

    ``nvml``: a pynvml-like object that is already initialised (tests pass a stub); by default
    the real pynvml, initialised once per process, or none when NVML is unavailable.
    ``visible_devices``: the ``CUDA_VISIBLE_DEVICES`` value to honour; by default the one in
    this process's environment when the first sample is taken. None means all GPUs.
    """

    def __init__(self, nvml: Any = _FROM_ENV, visible_devices: str | None = _FROM_ENV):
        self._nvml_given = nvml
        self._visible = visible_devices
        self._nvml: Any = None
        self._gpus: list[VisibleGpu] | None = None  # None until discovered
        self._prev_cpu: tuple[int, int] | None = None
        self._cpu_percent: float | None = None
        self._lock = threading.Lock()  # the daemon may sample from more than one thread

    def _discover(self) -> None:
        self._nvml = _nvml() if self._nvml_given is _FROM_ENV else self._nvml_given
        spec = os.environ.get("CUDA_VISIBLE_DEVICES") if self._visible is _FROM_ENV else self._visible
        self._gpus = []
        if self._nvml is None:
            return
        try:
            self._gpus = discover(self._nvml, spec)
        except self._nvml.NVMLError as e:
            log.info("no GPU telemetry: NVML could not list the GPUs: %s: %s", type(e).__name__, e)
            self._nvml = None

    def _cpu(self) -> float | None:
        """Percent busy over all cores since the previous sample; None on the first one."""
        busy, total = read_cpu_times()
        prev = self._prev_cpu
        if prev is not None and total > prev[1]:
            share = (busy - prev[0]) / (total - prev[1])
            self._cpu_percent = round(min(100.0, max(0.0, 100.0 * share)), 1)
        if prev is None or total > prev[1]:
            # Within one jiffy nothing has moved: keep the older reading so the next interval
            # is long enough to mean something, and repeat the last figure meanwhile.
            self._prev_cpu = (busy, total)
        return self._cpu_percent

    def sample(self) -> dict:
        """One ``gpu`` topic body (see the module docstring); never raises for a missing GPU."""
        with self._lock:
            if self._gpus is None:
                self._discover()
            nvml = self._nvml
            gpus = [read_gpu(nvml, g) for g in self._gpus or []] if nvml is not None else []
            used, total = read_meminfo()
            return {
                "has_gpu": bool(gpus),
                "gpus": gpus,
                "host": {
                    "memory_used": used,
                    "memory_total": total,
                    "cpu_percent": self._cpu(),
                    "load_1m": os.getloadavg()[0],
                },
            }


_default: Sampler | None = None
_default_lock = threading.Lock()


def sample() -> dict:
    """One ``gpu`` topic body from the process-wide default :class:`Sampler`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sampler()
    return _default.sample()


def torch_memory(device_index: int) -> dict:
    """This process's torch.cuda memory on ``device_index``: ``{"allocated", "reserved", "peak"}``
    in bytes (peak = max allocated since start or the last ``reset_peak_memory_stats``), or {}
    when CUDA is not available. torch is imported here so the daemon itself never pays for it."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    return {
        "allocated": int(torch.cuda.memory_allocated(device_index)),
        "reserved": int(torch.cuda.memory_reserved(device_index)),
        "peak": int(torch.cuda.max_memory_allocated(device_index)),
    }
