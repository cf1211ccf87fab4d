"""How a sweep should use a CPU machine: one trial with every thread, or several with fewer.

    python bench/trial_concurrency.py                       # 1 x 2 threads against 2 x 1 thread
    python bench/trial_concurrency.py --layouts 1x4,2x2,4x1 --repeats 2

Each layout ``PxT`` starts P processes at once, each training the demo student (GPT-2
2x128, vocab 2,048, batch 16 x 127) with ``kd.train.train`` on dense random teacher
targets (the cost of a cached-soft-label trial, not its quality) with T threads, for
``--warmup-steps`` untimed + ``--steps`` timed steps. The figure is the total tokens/s of
the P processes (each timed between its loop's reports). Layouts alternate order per repeat.
``kd.sweep.driver._resources`` follows this measurement (``CPU_THREAD_SHARE``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

_CHILD = """
import sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging
from kd.config import LossConfig, TrainConfig
from kd.train import train
logging.set_verbosity_error()
threads, compile_mode, warm, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
V = 2048
torch.manual_seed(0)
blocks = torch.randint(0, V, (512, 128))
targets = torch.randn(512, 127, V).half()
cfg = TrainConfig(steps=warm + steps, batch_size=16, eval_every=warm, eval_blocks=1, threads=threads, device="cpu",
                  warmup_steps=1, compile=compile_mode)
model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=128, n_embd=128, n_layer=2, n_head=2, resid_pdrop=0,
                                   embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0))
marks = []
train(model, blocks, blocks[:1], n_vocab=V, loss_cfg=LossConfig(temperature=2.0, kd_weight=0.5), cfg=cfg,
      teacher=lambda b: {"teacher_logits": targets[b["block_index"]]}, report=lambda m, c: marks.append(time.perf_counter()))
print("KD_TPS", steps * 16 * 127 / (marks[-1] - marks[0]))
"""


def run_layout(procs: int, threads: int, compile_mode: str, warm: int, steps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TRANSFORMERS_VERBOSITY": "error"}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(threads), compile_mode, str(warm), str(steps)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                for _ in range(procs)]
    out = []
    for child in children:
        stdout, _ = child.communicate(timeout=1800)
        out.append(float(next(ln for ln in stdout.splitlines() if ln.startswith("KD_TPS")).split()[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="1x2,2x1", help="comma-separated PROCESSESxTHREADS")
    p.add_argument("--compile", default="true", choices=("true", "false"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    layouts = [tuple(map(int, x.split("x"))) for x in args.layouts.split(",")]
    totals: dict[tuple[int, int], list[float]] = {lay: [] for lay in layouts}
    for r in range(args.repeats):
        for lay in (layouts if r % 2 == 0 else layouts[::-1]):
            each = run_layout(*lay, args.compile, args.warmup_steps, args.steps)
            totals[lay].append(sum(each))
            print(f"  repeat {r}: {lay[0]}x{lay[1]}: {' + '.join(f'{v:.0f}' for v in each)} = {sum(each):.0f} tokens/s",
                  flush=True)
    base = max(totals[layouts[0]])
    print(f"\n# compile {args.compile}, {args.warmup_steps} + {args.steps} steps, {args.repeats} repeats")
    print("\n| layout (processes x threads) | total tokens/s (best) | runs | vs first |")
    print("| --- | ---: | --- | ---: |")
    for lay in layouts:
        best = max(totals[lay])
        print(f"| {lay[0]} x {lay[1]} | {best:.0f} | {', '.join(f'{v:.0f}' for v in totals[lay])} | {best / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
