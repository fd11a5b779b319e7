"""Where and how the network runs: the device, the CPU's flags, the arithmetic (precision), the
compile policy, malloc's tuning and the decoding threads' priority. The extractor, the pipeline, the
command line and the service read these; none of them decides them itself.

A ``Runtime`` is the set of runtime options a model is run with (device, batch size, decoding
workers, compile, precision): it is passed in (``ConvVLAD(..., runtime=)``, ``ConvVLAD.load(path,
runtime=)``, ``IndexStore.open(path, runtime=)``, ``model.with_runtime(...)``), never set on a fitted
model. A new runtime option is one field here and the one place that reads it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BASE_SIZE = 224  # scale s warps the image to (224·s)², as in the paper


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# One forward chunk holds at most this many input pixels on CPU: 4 images at scale 1, 1 at scale 2.
# Measured on 2 cores: chunks of 16 at scale 1 took 1.3× longer per image than chunks of 4, and
# 4 images at scale 2 1.2× longer than one at a time: the activations of a large chunk (up to
# 300 MB a tensor) leave the cache, and above glibc's 32 MB mmap limit each one is page-faulted
# in afresh on every pass. On a GPU, large chunks keep it busy.
CPU_BATCH_PIXELS = 4 * BASE_SIZE * BASE_SIZE
GPU_BATCH_PIXELS = 64 * BASE_SIZE * BASE_SIZE

_malloc_tuned = False

# Network arithmetic: "bf16"/"fp16" run it under autocast; feature maps come back in that precision
# and are turned to float32 before VLAD. "auto" (the default) picks where the hardware has a matrix
# engine for it: bf16 on a CPU with AMX-BF16 or AVX512-BF16 (a 2048² matmul ran 5.9× fp32 on two
# cores of one such CPU), bf16 or fp16 on CUDA, fp32 elsewhere (a CPU without native bf16
# emulates it, slower than fp32). CONVLAD_PRECISION forces a precision where the setting is auto;
# CONVLAD_CPU_BF16=1 or 0 forces the CPU detection (tests cover both paths on any machine).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_SETTINGS = ("auto", *PRECISIONS)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """The CPU's matrix and vector features that matter here (from /proc/cpuinfo), and torch's
    kernel level, e.g. ('amx_bf16', 'amx_int8', 'amx_tile', 'avx2', 'avx512_bf16', 'avx512f', 'torch:AVX512')."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "avx_vnni")))
    try:
        keep.append(f"torch:{torch.backends.cpu.get_cpu_capability()}")
    except (AttributeError, RuntimeError):
        pass
    return tuple(keep)


def cpu_has_bf16_engine() -> bool:
    forced = os.environ.get("CONVLAD_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(f in cpu_flags() for f in BF16_FLAGS)


def resolve_precision(setting: str, device: torch.device) -> str:
    """The arithmetic a setting means on ``device``: itself, or for "auto" what the hardware runs fastest."""
    if setting not in PRECISION_SETTINGS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_SETTINGS)}, not {setting!r}")
    if setting != "auto":
        return setting
    forced = os.environ.get("CONVLAD_PRECISION", "").strip()
    if forced in PRECISIONS:
        return forced
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_engine() else "fp32"


def keep_freed_memory() -> bool:
    """Let glibc keep freed activation buffers for reuse instead of handing them back to the OS.

    By default a freed block above the (dynamic) mmap threshold is unmapped and the heap top is
    trimmed, so every forward pass page-faults its activations in again: 40% of the eager time per
    448² image on 2 cores (78 → 46 ms). A fixed mmap threshold at glibc's 32 MB maximum and a 1 GB
    trim threshold keep them (memory stays at its peak instead of shrinking between batches).
    Process-wide and once; Linux/glibc only; ``CONVLAD_MALLOC_TUNING=0`` leaves malloc alone.
    Returns whether the settings were applied.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get("CONVLAD_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
              and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _malloc_tuned = bool(ok)
    return _malloc_tuned


# Auto-compilation threshold, in images × Σ scale²: compiling costs 7–30 s per input size, once per
# process (inductor caches kernels on disk), and saves ~3 ms per image at scale 1 and ~20 ms at
# scale 2 on 2 cores (`make bench`); from 10 000 units (2 000 images at scales 1+2) it pays back
# about twice.
COMPILE_MIN_WORK = 10_000


def want_compile(setting: bool | str, extractor, n_images: float, scales: Sequence[float],
                 resize: str = "warp") -> bool:
    """``setting``: True/False, or "auto": compile on CPU when the job is large enough to pay back
    (a server, which runs without end, passes ``n_images=math.inf``), for photos warped to n×n:
    with ``resize="keep"`` nearly every photo is a new input shape, and a new compilation."""
    if setting != "auto":
        return bool(setting)
    work = n_images * sum(float(s) ** 2 for s in scales)
    return (extractor.device.type == "cpu" and extractor.can_compile and resize == "warp"
            and work >= COMPILE_MIN_WORK)


# Decoding threads run beside the network's OpenMP threads. Where they compete for the same cores,
# a preempted OpenMP thread stalls its whole team at every barrier: on 8-megapixel photos (2 cores)
# decoding while the network ran was slower than decoding and then running the network, one after
# the other. Reniced, the decoders take the cores the network leaves idle and yield them when it
# runs: 23 → 31 photos/s there (compiled, 3 interleaved runs of 96), mvbench-dev unchanged.
# ``CONVLAD_DECODE_NICENESS=0`` turns it off, e.g. to compare with ``make bench`` (a value that is not
# an integer is ignored).
_nice = os.environ.get("CONVLAD_DECODE_NICENESS", "").strip()
DECODE_NICENESS = int(_nice) if _nice.lstrip("-").isdigit() else 10


def lower_thread_priority(step: int = DECODE_NICENESS) -> bool:
    """Raise the calling thread's niceness by ``step`` (Linux, where niceness is per thread; never
    the whole process). Returns whether it was changed."""
    if step <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except OSError:
        return False
    return True



@dataclass(frozen=True)
class Runtime:
    """How a model runs, apart from what it learned: ``device`` (None: CUDA when present, else the
    CPU), images per ``batch_size``, decoding ``workers``, ``compile`` (True, False or "auto":
    ``want_compile``, which weighs the compilation against ``workload``, the images the job will
    encode: None, each call's own; a server, which runs without end, math.inf) and ``precision``
    (``PRECISION_SETTINGS``: ``resolve_precision``)."""

    device: str | None = None
    batch_size: int = 16
    workers: int = 2
    compile: bool | str = "auto"
    precision: str = "auto"
    workload: float | None = None

    def __post_init__(self):
        if self.precision not in PRECISION_SETTINGS:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_SETTINGS)}, not {self.precision!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', not {self.compile!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"batch size {self.batch_size} and workers {self.workers}: at least 1 and 0")


__all__ = ["BASE_SIZE", "BF16_FLAGS", "COMPILE_MIN_WORK", "CPU_BATCH_PIXELS", "DECODE_NICENESS", "GPU_BATCH_PIXELS",
           "PRECISIONS", "PRECISION_SETTINGS", "Runtime", "cpu_flags", "cpu_has_bf16_engine", "default_device",
           "keep_freed_memory", "lower_thread_priority", "resolve_precision", "want_compile"]
