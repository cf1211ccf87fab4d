"""The student's forward pass and the loss as one function, compiled where it pays.

``torch.compile`` of the model alone gained 5-13% on this project's students; of the
forward and the distillation loss as one graph it gained 2.3x (the loss is elementwise
work over (N, V) logits that inductor fuses into a few loops, and it sees the logits'
producer and consumer together). Compiling costs about 20 s cold and about 3 s in a new
process once inductor's cache on disk is warm (:func:`kd.device.use_compile_cache`), so
``train.compile=auto`` compiles only runs long enough to repay it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch

from kd.config import LossConfig
from kd.device import use_compile_cache, uses_bf16
from kd.losses import LossParts, distillation_loss
from kd.models import logits_for

StepLoss = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], LossParts]

#: ``train.compile=auto`` compiles runs of at least this many steps: at the demo shapes a
#: compiled step saved ~60% of ~0.15 s, so a warm-cache compile (~3 s) is repaid after
#: ~35 steps and a cold one (~20 s) after ~200 (BENCHMARKS.md, bench/train_throughput.py).
AUTO_COMPILE_MIN_STEPS = 100


def should_compile(mode: str, steps: int, world_size: int = 1) -> bool:
    """``train.compile``: ``true``, ``false``, or ``auto`` (long single-process runs only).

    ``auto`` leaves multi-worker (DDP) runs eager: DDP splits a compiled graph at its
    gradient buckets and the gain was not measured here.
    """
    if mode in ("true", "false"):
        return mode == "true"
    return steps >= AUTO_COMPILE_MIN_STEPS and world_size == 1


_SAMPLED_TAIL = ("tail_sample_indices", "tail_sample_values", "proposal_temperature")


def step_loss(model: torch.nn.Module, n_vocab: int, loss_cfg: LossConfig, device: torch.device,
              precision: str, *, compile: bool = False) -> StepLoss:
    """``fn(input_ids (B, T), labels (B, T), targets) -> LossParts``: forward + loss, compiled
    with ``compile=True`` (:func:`compiled`), else eager."""
    # Decided here, not in fn: the bf16 probe times matmuls, which a traced graph cannot hold.
    bf16 = uses_bf16(device, precision)

    # A sampled tail estimates E_p[.] terms by importance weights: forward KL's only. The
    # other divergences take the compact cache's exact k + 1 buckets without it.
    drop = () if loss_cfg.divergence == "forward_kl" else _SAMPLED_TAIL

    # The temperature and the loss weight are arguments of the compiled function, not
    # constants of its closure, so that every trial of a temperature sweep reuses one graph
    # and its kernels from inductor's cache. Baked in as constants, each new temperature
    # compiled every kernel again: a 2x128 student's first step took 20-26 s against 9 s.
    def core(input_ids: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor],
             temperature: float, kd_weight: float) -> LossParts:
        if drop:
            targets = {k: v for k, v in targets.items() if k not in drop}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = logits_for(model, input_ids, n_vocab)  # (B, T, V)
        return distillation_loss(
            logits, labels, **targets, temperature=temperature, kd_weight=kd_weight,
            divergence=loss_cfg.divergence, jsd_beta=loss_cfg.jsd_beta, skew_alpha=loss_cfg.skew_alpha,
            check_indices=False,  # soft labels are checked once, where they are loaded
        )

    run = compiled(core) if compile else core
    temperature, kd_weight = float(loss_cfg.temperature), float(loss_cfg.kd_weight)
    # Compiled, they go in as 0-d tensors, which dynamo takes as graph inputs: a Python
    # float argument it still specialised here (it reaches a custom autograd Function and
    # branches), measured. CE alone keeps kd_weight = 0.0, a graph of its own that never
    # reads a teacher; the compact format's tail keeps floats, since its grid lookup needs
    # the temperature's value (kd.compact.interpolate); eager steps keep floats too.
    floats = (temperature, kd_weight)
    tensors = ((torch.tensor(temperature, device=device), torch.tensor(kd_weight, device=device))
               if compile and kd_weight else floats)

    def fn(input_ids: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor]) -> LossParts:
        return run(input_ids, labels, targets, *(floats if "topk_tail_lse" in targets else tensors))

    return fn


#: The autocast region's entry and exit, as dynamo puts them into the graph.
_AUTOCAST_NODES = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def aot_cacheable() -> contextlib.AbstractContextManager:
    """Let AOTAutograd's on-disk cache keep the step's graph, as inductor's cache keeps its kernels.

    torch 2.13 bypasses that cache for a graph holding an autocast region (bf16 runs) or a
    custom autograd Function (the fused loss), so every trial traced and partitioned the
    joint forward + backward graph again: a warm compile of the demo student's step went
    from 4.8-5.6 s to 3.7 s with it (2-core Xeon, bf16). Both are safe to cache: the
    autocast nodes do what their arguments say, and the arguments are constants of the graph
    the key hashes (torch's own maintainers call it an allowlist gap); the Function is
    traced into forward and backward subgraphs the key hashes too, and torch offers the
    setting for exactly this, off by default until its own testing is done. Both settings
    are torch's, patched only while the step compiles; a torch without them compiles as before.
    """
    stack = contextlib.ExitStack()
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        marked = {**inductor_config.unsafe_marked_cacheable_functions,
                  **dict.fromkeys(_AUTOCAST_NODES, torch.__version__)}
        stack.enter_context(inductor_config.patch(unsafe_marked_cacheable_functions=marked))
        stack.enter_context(functorch_config.patch(autograd_cache_allow_custom_autograd_functions=True))
    except (ImportError, AttributeError):  # settings a later torch renamed: its own defaults
        stack.close()
        return contextlib.nullcontext()
    return stack


def compiled(fn: Callable[..., LossParts]) -> Callable[..., LossParts]:
    """``fn`` under ``torch.compile``, falling back to ``fn`` itself (one warning line) if
    compiling fails on this machine (no C++ compiler, an unsupported model)."""
    use_compile_cache()
    # One training run per process at a time: forget the previous run's graphs, which guard
    # on that run's model; else every trial of a sweep (Tune reuses the process) adds a
    # recompile until dynamo's limit (8) silently sends the rest back to eager.
    torch.compiler.reset()
    # dynamic=False: every training batch has the same shape (drop_last), so one graph.
    graph = torch.compile(fn, dynamic=False)
    state = {"fn": graph, "checked": False}

    def run(*args: object) -> LossParts:
        if state["checked"]:
            return state["fn"](*args)
        try:
            with aot_cacheable():
                out = graph(*args)
        except Exception as e:  # compilation happens on the first call
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "training eagerly (set train.compile=false to skip the attempt)", file=sys.stderr, flush=True)
            state["fn"] = fn
            out = fn(*args)
        state["checked"] = True
        return out

    return run
