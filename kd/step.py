"""The student's forward pass and the loss, compiled where it pays.

``torch.compile`` of the model alone gained 5-13% on this project's students; with the
distillation loss compiled too it gained 2.3x (the loss is elementwise work over (N, V)
logits that inductor fuses into a few loops). What is compiled is the model's repeated
block (its transformer layer: one graph that every layer reuses, PyTorch's "regional
compilation") and the loss, not the step as one graph. On a 2-core AVX2 EPYC in fp32 the
first step, which compiles, took for the 4x256 teacher 31 s against 55 s from a cold
inductor cache and 5.5 s against 13.5 s from a warm one, for the 2x128 student 35 s
against 47 s and 4.9 s against 9.4 s, and the steady step was as fast (teacher 625-632 ms
against 647-669 ms, student 278-305 ms against 309-334 ms; eager 664 and 342 ms). Every
trial of a sweep pays the warm figure (:func:`kd.device.use_compile_cache`), so
``train.compile=auto`` compiles only runs long enough to repay it.
"""

from __future__ import annotations

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

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], LossParts]


def _parts(model: torch.nn.Module, n_vocab: int, loss_cfg: LossConfig, device: torch.device,
           precision: str) -> tuple[Forward, Loss]:
    """``forward(input_ids) -> logits`` (B, T, V) and ``loss(logits, labels, targets)``."""
    # Decided here, not in fn: the bf16 probe times matmuls, which a traced graph cannot hold.
    bf16 = uses_bf16(device, precision)

    # A sampled tail estimates E_p[.] terms by importance weights: forward KL's only. The
    # other divergences take the compact cache's exact k + 1 buckets without it.
    drop = () if loss_cfg.divergence == "forward_kl" else _SAMPLED_TAIL

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return logits_for(model, input_ids, n_vocab)

    def loss(logits: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor]) -> LossParts:
        if drop:
            targets = {k: v for k, v in targets.items() if k not in drop}
        return distillation_loss(
            logits, labels, **targets, temperature=loss_cfg.temperature, kd_weight=loss_cfg.kd_weight,
            divergence=loss_cfg.divergence, jsd_beta=loss_cfg.jsd_beta, skew_alpha=loss_cfg.skew_alpha,
            check_indices=False,  # soft labels are checked once, where they are loaded
        )

    return forward, loss


def step_loss(model: torch.nn.Module, n_vocab: int, loss_cfg: LossConfig, device: torch.device,
              precision: str) -> StepLoss:
    """``fn(input_ids (B, T), labels (B, T), targets) -> LossParts``: forward + loss, eager."""
    forward, loss = _parts(model, n_vocab, loss_cfg, device, precision)
    return lambda input_ids, labels, targets: loss(forward(input_ids), labels, targets)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's layers: the longest ``ModuleList`` whose members are all of one class
    (``transformer.h`` of GPT-2, ``model.layers`` of Llama); empty when it has none."""
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best) and len({type(b) for b in m}) == 1:
            best = list(m)
    return best


def compiled_step(model: torch.nn.Module, n_vocab: int, loss_cfg: LossConfig, device: torch.device,
                  precision: str) -> StepLoss:
    """:func:`step_loss` with the model's repeated block and the loss under ``torch.compile``
    (the whole step as one graph for a model without repeated blocks), falling back to
    eager (one warning line) if compiling fails on this machine (no C++ compiler, an
    unsupported model).

    The blocks run compiled only inside this function's forward pass: evaluation between
    steps (other shapes, no gradients) runs them eagerly instead of compiling them again,
    and the model leaves training as it came (nothing compiled is saved with it).
    """
    use_compile_cache()
    # One training run per process at a time: forget the previous run's graphs, which guard
    # on that run's model; else every trial of a sweep (Tune reuses the process) adds a
    # recompile until dynamo's limit (8) silently sends the rest back to eager.
    torch.compiler.reset()
    forward, loss = _parts(model, n_vocab, loss_cfg, device, precision)
    eager = step_loss(model, n_vocab, loss_cfg, device, precision)
    blocks = repeated_blocks(model)
    # dynamic=False: every training batch has the same shape (drop_last), so one graph each.
    # A block's code is compiled once and reused by the others: dynamo treats a module's
    # parameters as inputs, so the blocks differ only in what they are passed.
    calls = [torch.compile(b._call_impl, dynamic=False) for b in blocks]
    compiled_loss = torch.compile(loss, dynamic=False)
    whole = None if blocks else torch.compile(eager, dynamic=False)

    def regional(input_ids: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor]) -> LossParts:
        # nn.Module.compile() sets the same attribute for good; set here for one forward.
        for b, c in zip(blocks, calls):
            b._compiled_call_impl = c
        try:
            logits = forward(input_ids)
        finally:
            for b in blocks:
                b._compiled_call_impl = None
        return compiled_loss(logits, labels, targets)

    state = {"fn": whole or regional, "checked": False}

    def run(input_ids: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor]) -> LossParts:
        if state["checked"]:
            return state["fn"](input_ids, labels, targets)
        try:
            out = state["fn"](input_ids, labels, targets)
        except Exception as e:  # compilation happens on the first call
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "training eagerly (set train.compile=false to skip the attempt)", file=sys.stderr, flush=True)
            state["fn"] = eager
            out = eager(input_ids, labels, targets)
        state["checked"] = True
        return out

    return run
