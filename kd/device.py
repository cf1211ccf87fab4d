"""Where and how torch runs: device, intra-op threads, bf16 autocast, the compile cache.

One module for what the training loop, the soft-label builder, evaluation and the sweep
trials each set up, so that a process is configured the same way wherever it starts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time

import torch

from kd.paths import cache_dir


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu`` or ``cuda``; ``key`` names the setting
    in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{key}='cuda' is not allowed here: no CUDA device is visible")
    return torch.device(name)


def use_threads(n: int) -> None:
    """Set torch's intra-op threads when ``n`` > 0 (0 leaves torch's default).

    Ray sets ``OMP_NUM_THREADS=1`` in its workers, so a trial or a Ray Data actor that
    wants more must say so; torch reads the setting per call, so setting it twice is free.
    """
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU (a 20 ms probe, once per process).

    CPUs with AMX/AVX512-BF16 run bf16 about 2x faster than fp32; CPUs without them
    emulate it and run it 10-100x slower (measured on an AVX2 EPYC), and an AVX-512 Xeon
    without AMX ran it at half the fp32 speed. So ``auto`` asks.
    """
    a = torch.randn(256, 256)
    xs = {dt: a.to(dt) for dt in (torch.float32, torch.bfloat16)}
    timings = dict.fromkeys(xs, float("inf"))
    # Interleaved rounds and the minimum of each: on a busy machine one preempted fp32
    # round must not make emulated bf16 (100x slower) look faster.
    for _ in range(5):
        for dt, x in xs.items():
            x @ x
            t = time.perf_counter()
            x @ x
            timings[dt] = min(timings[dt], time.perf_counter() - t)
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` (``auto``, ``fp32``, ``bf16``) means bf16 autocast on ``device``."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_is_fast()


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``bf16`` or ``fp32``: what ``precision`` means on ``device`` (a name as ``train.device``).

    What goes into a cache key: ``auto`` means different arithmetic on different hardware,
    so a key stores what it resolved to. A CUDA device this process cannot see (a CPU head
    naming its workers' GPUs) resolves as the GPUs since Ampere do, to ``bf16``.
    """
    if precision != "auto":
        return precision
    if isinstance(device, str):
        device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                              else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return "bf16" if uses_bf16(device, precision) else "fp32"


def precisions_served(device: torch.device | str, precision: str) -> tuple[str, ...]:
    """The resolved precisions whose cache entries a run with ``precision`` may use, best first.

    An explicit ``fp32`` or ``bf16`` takes only entries built in it. ``auto`` takes the
    entry of what it resolves to here, else one built in the other: ``auto`` asks for
    whatever is fast on the machine that builds, and a sweep builds its teacher and soft
    labels once on the driver's machine (a CPU head) for trials on other hardware (GPUs).
    """
    resolved = resolve_precision(device, precision)
    if precision != "auto":
        return (resolved,)
    return (resolved, "fp32" if resolved == "bf16" else "bf16")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked or (``auto``) where the hardware is fast at it."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def use_compile_cache() -> str:
    """Point inductor's on-disk cache into the project's cache directory; return it.

    A cold ``torch.compile`` of a student's step costs about 20 s here; with this cache
    warm a new process pays about 3 s, so every trial of a sweep after the first, and every
    later sweep, reuses the kernels (a user's own ``TORCHINDUCTOR_CACHE_DIR`` wins).
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its fallback (/tmp/torchinductor_<user>) into the variable the first
    # time it asks, and importing torch._dynamo asks (transformers imports it before any
    # run compiles), so that value is torch's own choice, not a user's: replace it too.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
        if current is not None and "torch._inductor.utils" in sys.modules:
            sys.modules["torch._inductor.utils"].clear_caches()  # paths it memoised under the old one
    path = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    os.makedirs(path, exist_ok=True)
    return path


#: On a CPU, attention written as matmuls and a softmax (transformers' ``eager``) beat
#: PyTorch's fused SDPA kernel up to this many positions, and lost beyond: GPT-2 4x256,
#: bf16, 2 threads, 2,048 tokens per batch, forward + backward ms: 128 positions 321
#: against 372 (in the compiled step, 237 against 302), 512: 377 against 365, 1024: 650
#: against 407. SDPA's CPU flash kernel has a fixed cost per (batch, head) that short
#: blocks do not amortise, and ``torch.compile`` fuses the plain softmax with its neighbours.
CPU_EAGER_ATTENTION_MAX_LEN = 256


def use_fast_attention(model: torch.nn.Module, device: torch.device, seq_len: int) -> str:
    """Switch a transformers model to the attention kernel that is faster for ``seq_len``
    positions on ``device``; return the one it uses.

    CPU and at most :data:`CPU_EAGER_ATTENTION_MAX_LEN` positions: ``eager``; otherwise
    the model's own choice (``sdpa`` by default, flash kernels on GPUs). The two compute
    the same attention (logits and gradients equal to 1e-5 in fp32, tests/test_device.py); the choice is
    not saved with the model (``save_pretrained`` leaves it out of config.json).
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return str(current)  # someone chose (flash_attention_2, eager) or not a transformers model
    if device.type == "cpu" and seq_len <= CPU_EAGER_ATTENTION_MAX_LEN:
        model.set_attn_implementation("eager")
        return "eager"
    return current
