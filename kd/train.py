"""The distillation loop: a plain function, no Ray and no MLflow inside.

``train`` takes a student, packed token blocks, an optional teacher (a callable that
returns dense logits or top-k targets for a batch) and a ``report`` callback. Ray wraps
it (``kd.sweep``) through :class:`Hooks`; the CLI calls it directly. It evaluates and
checkpoints every ``train.eval_every`` steps and can resume from a checkpoint exactly
where it stopped (same batches, same learning rate, same optimizer state).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader, TensorDataset

from kd.cache import building_dir
from kd.config import LossConfig, TrainConfig
from kd.device import autocast_for, pick_device, use_fast_attention, use_threads
from kd.models import logits_for
from kd.step import should_compile, step_loss

Report = Callable[[dict[str, float], "str | None"], None]
TeacherFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _identity(x: Any) -> Any:
    return x


@dataclass
class Hooks:
    """Seams for a distributed runner (Ray Train) without importing it here.

    ``wrap_model`` is e.g. ``ray.train.torch.prepare_model`` (moves to the device, wraps in
    DDP); ``wrap_loader`` is ``prepare_data_loader`` (adds a DistributedSampler).
    """

    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    wrap_loader: Callable[[DataLoader], DataLoader] = _identity
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None


@dataclass
class State:
    """What a checkpoint restores besides the weights."""

    step: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------- data


def make_batch(blocks: torch.Tensor, block_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Blocks (B, L) -> inputs (B, L-1), next-token labels (B, L-1) and the block ids (B,).

    ``block_index`` is each row's position in the training blocks, so that a teacher read
    from the soft-label cache (:mod:`kd.soft_labels`) can look its targets up; the model
    never sees it.
    """
    return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:], "block_index": block_index}


def _loader(blocks: torch.Tensor, cfg: TrainConfig, hooks: Hooks) -> DataLoader:
    ds = TensorDataset(blocks, torch.arange(len(blocks)))
    # Shuffling is driven by a per-epoch seed (see _batches), not by the loader, so a
    # resumed run replays the same order.
    # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every
    # epoch, which shifts the dropout masks of a resumed run.
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return hooks.wrap_loader(loader)


def _batches(blocks: torch.Tensor, cfg: TrainConfig, hooks: Hooks, start_step: int) -> Iterator[dict]:
    """Endless seeded epochs, skipping the ``start_step`` batches a resumed run already saw."""
    per_rank = len(blocks) // hooks.world_size
    per_epoch = max(1, per_rank // cfg.batch_size)
    if per_rank < cfg.batch_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} is not allowed: only {per_rank} training "
                         "blocks per worker; lower it or add data")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(blocks), generator=g)
        loader = _loader(blocks[order], cfg, hooks)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for i, (x, idx) in enumerate(loader):
            if i < skip:
                continue
            yield make_batch(x, order[idx.cpu()])  # positions in this epoch -> block ids
        skip = 0
        epoch += 1


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only; biases and norm gains are not decayed (GPT-2 recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


# ------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, n_vocab: int, *, device: torch.device,
                    precision: str = "auto", batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        b = make_batch(blocks[start:start + batch_size].to(device), torch.empty(0))
        with autocast_for(device, precision):
            logits = logits_for(model, b["input_ids"], n_vocab)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), reduction="sum")
        total += loss.item()
        count += b["labels"].numel()
    model.train(was_training)
    return total / max(1, count)


def online_teacher(teacher: torch.nn.Module, n_vocab: int, device: torch.device, precision: str,
                   top_k: int = 0) -> TeacherFn:
    """A teacher callable that runs the frozen teacher on each batch.

    Returns dense ``teacher_logits`` (B, T, V), or with ``top_k > 0`` the same top-k
    targets the soft-label cache stores (raw logits, fp16), so online and cached
    distillation can be compared at equal k.
    """
    # Frozen visibly: eval() turns dropout off so the soft targets are deterministic, and
    # no_grad keeps the teacher's activations out of memory.
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def fn(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast_for(device, precision):
            logits = logits_for(teacher, batch["input_ids"], n_vocab)
        if not top_k:
            return {"teacher_logits": logits}
        values, indices = logits.topk(min(top_k, n_vocab), dim=-1)  # (B, T, k)
        return {"topk_indices": indices, "topk_values": values.half()}

    return fn


# ------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, state: State) -> Path:
    """Weights as safetensors; optimizer/scheduler tensors via torch.save (loaded weights_only)."""
    # Built beside ``path`` and swapped in (kd.cache.building_dir): the old checkpoint is
    # replaced only by a whole new one.
    with building_dir(path) as tmp:
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        # The RNG state too: dropout draws from it, and an exact resume must replay them.
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__))
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> State:
    load_model(_unwrap(model), str(Path(path) / "model.safetensors"), device=str(device))
    optim = torch.load(Path(path) / "optim.pt", map_location=device, weights_only=True)
    opt.load_state_dict(optim["optimizer"])
    sched.load_state_dict(optim["scheduler"])
    torch.set_rng_state(optim["rng"]["cpu"].cpu())
    if "cuda" in optim["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(optim["rng"]["cuda"].cpu())
    return State(**json.loads((Path(path) / "state.json").read_text()))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model in .module


# ------------------------------------------------------------------------------- loop


def train(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    *,
    n_vocab: int,
    loss_cfg: LossConfig,
    cfg: TrainConfig,
    teacher: TeacherFn | None = None,
    report: Report | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    hooks: Hooks | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` for ``cfg.steps`` steps; return the last evaluation's metrics.

    Args:
        model: the student (or, with ``kd_weight=0`` and no teacher, a teacher being trained).
        train_blocks: (N, L) int64 packed token blocks; val_blocks: (M, L).
        n_vocab: the tokenizer's length; logits beyond it are cut.
        teacher: returns ``teacher_logits`` (B, T, V) or ``topk_indices``/``topk_values``
            (B, T, k) for a batch; required when ``loss_cfg.kd_weight > 0``.
        report: called as ``report(metrics, checkpoint_dir_or_None)`` at every evaluation.
        checkpoint_dir: where checkpoints go (rank 0 writes them); none when ``None``.
        resume_from: a checkpoint directory written by this function.
        hooks: distributed seams; see :class:`Hooks`.
    """
    hooks = hooks or Hooks()
    if loss_cfg.kd_weight > 0 and teacher is None:
        raise ValueError(f"loss.kd_weight={loss_cfg.kd_weight} needs a teacher; use 0 for cross-entropy only")
    use_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = hooks.device or pick_device(cfg.device)
    use_fast_attention(model, device, train_blocks.shape[1] - 1)  # before DDP or compile wrap it
    model = hooks.wrap_model(model.to(device))
    model.train()
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    state = State()
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, opt, sched, device)
    eval_blocks = val_blocks[: cfg.eval_blocks] if cfg.eval_blocks else val_blocks
    batches = _batches(train_blocks, cfg, hooks, state.step)
    forward_loss = step_loss(model, n_vocab, loss_cfg, device, cfg.precision,
                             compile=should_compile(cfg.compile, cfg.steps - state.step, hooks.world_size))
    bar = None
    if progress and hooks.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)  # quiet in logs

    def save() -> str | None:
        if checkpoint_dir is None or hooks.rank != 0:
            return None
        return str(save_checkpoint(Path(checkpoint_dir) / "checkpoint", model, opt, sched, state))

    # Logged losses accumulate on the device: reading one back every step would wait for
    # the step to finish (a host sync), which on a GPU stalls the queue of kernels.
    sums = torch.zeros(3, dtype=torch.float32, device=device)  # train_loss, ce_loss, kd_loss
    n_sum, checked_sum, checked_step = 0, 0.0, state.step
    metrics = dict(state.history[-1]) if state.history else {}
    with _deferred_interrupt() as interrupted:
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            targets = teacher(batch) if (teacher is not None and loss_cfg.kd_weight > 0) else {}
            parts = forward_loss(batch["input_ids"], batch["labels"], targets)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            sums += torch.stack([p.detach() for p in parts])
            state.step += 1
            state.tokens += batch["labels"].numel() * hooks.world_size
            state.train_time_s += time.perf_counter() - t0
            n_sum += 1
            if bar is not None:
                bar.update(1)
            evaluating = state.step % cfg.eval_every == 0 or state.step == cfg.steps
            if evaluating or state.step % FINITE_CHECK_EVERY == 0:
                # A NaN loss poisons the weights through every later step: look at most
                # FINITE_CHECK_EVERY steps after it, not at every step.
                total = float(sums[0])
                if not math.isfinite(total - checked_sum):
                    raise FloatingPointError(
                        f"loss is {total - checked_sum} within steps {checked_step + 1}-{state.step}; "
                        f"lower train.lr (now {cfg.lr}) or check the data")
                checked_sum, checked_step = total, state.step
            if evaluating:
                val = validation_loss(model, eval_blocks, n_vocab, device=device, precision=cfg.precision)
                means = (sums / n_sum).tolist()
                metrics = {
                    "step": state.step,
                    "val_loss": val,
                    "val_ppl": math.exp(min(val, 50.0)),
                    "train_loss": means[0], "ce_loss": means[1], "kd_loss": means[2],
                    "tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
                    "train_time_s": state.train_time_s,
                    "lr": sched.get_last_lr()[0],
                }
                state.history.append(metrics)
                sums.zero_()
                n_sum, checked_sum = 0, 0.0
                if bar is not None:
                    bar.set_postfix(loss=f"{means[0]:.3f}", val=f"{val:.3f}", refresh=False)
                ckpt = save()
                if report is not None:
                    report(metrics, ckpt)
            if interrupted():
                # Ctrl-C: stop between steps, where the checkpoint is exact, and keep it.
                saved = ckpt if evaluating else save()
                raise KeyboardInterrupt(f"interrupted at step {state.step}"
                                        + (f"; checkpoint {saved}" if saved else ""))
    if bar is not None:
        bar.close()
    return metrics


#: Steps between two checks that the accumulated loss is finite (each is one host sync).
FINITE_CHECK_EVERY = 10


class _deferred_interrupt:
    """Within the block, SIGINT (and SIGTERM where it raises KeyboardInterrupt, as ``kd``'s
    command line sets it) sets a flag instead of raising at an arbitrary line.

    The loop then stops between two steps, where model, optimizer, scheduler and step
    count agree, and saves a checkpoint that resumes exactly. Only the main thread may
    set signal handlers (a Ray trial runs the loop in a thread): there, nothing changes.
    """

    def __enter__(self) -> Callable[[], bool]:
        self.flag = threading.Event()
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.default_int_handler:
                    self.old[sig] = signal.signal(sig, lambda *_: self.flag.set())
        return self.flag.is_set

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
