"""How steady is the sweep's latency pass? The same shapes timed in several passes.

The sweep driver times every distinct student shape once after the trials
(:mod:`kd.sweep.latency`: one process, 1 thread, warm-up, 9 interleaved repeats, median).
This script builds GPT-2 models of the demo and pareto shapes (random weights: latency
depends on the shape, not the weights) and runs that pass ``--passes`` times, printing
per shape the median of each pass, the coefficient of variation within a pass (std /
median of its repeats) and the spread of the medians across passes, and whether the
order of the shapes (what a Pareto front reads) changed between passes.

    python bench/latency_pass.py                 # ~1 minute on 2 cores
    python bench/latency_pass.py --passes 5 --vocab 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ["1x64", "2x128", "3x192", "4x256"]  # n_layer x n_embd; 4x256 was the demo teacher's shape


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size (the world tokenizer's order)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kd.sweep.latency import REPEATS, THREADS, time_models

    models = {}
    for shape in args.shapes.split(","):
        n_layer, n_embd = map(int, shape.split("x"))
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=args.vocab, n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64),
                         n_positions=256, bos_token_id=0, eos_token_id=0)
        models[shape] = (GPT2LMHeadModel(cfg).eval(), None)
    passes = [time_models(models) for _ in range(args.passes)]
    print(f"{args.passes} passes of {REPEATS} interleaved repeats, {THREADS} thread, vocab {args.vocab}\n")
    print("| shape | median ms/token per pass | CV within a pass (max) | spread of medians across passes |")
    print("| --- | --- | ---: | ---: |")
    for shape in models:
        meds = [p[shape]["median"] for p in passes]
        cv = max(p[shape]["cv"] for p in passes)
        spread = (max(meds) - min(meds)) / statistics.median(meds)
        print(f"| {shape} | {', '.join(f'{m:.3f}' for m in meds)} | {cv:.1%} | {spread:.1%} |")
    orders = {tuple(sorted(models, key=lambda s: p[s]["median"])) for p in passes}
    print(f"\norder of the shapes by latency: {'the same in every pass' if len(orders) == 1 else 'changed: ' + str(orders)}")


if __name__ == "__main__":
    main()
