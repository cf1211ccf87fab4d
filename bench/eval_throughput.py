"""Evaluation throughput (batched vs item-at-a-time) and the spread of measured latency.

    python bench/eval_throughput.py                      # world 'small', GPT-2 4x256, 64 items
    python bench/eval_throughput.py --items 32 --threads 2 --arch llama

Part 1: items/s for each task family (completion, multiple choice, QA generation,
perplexity) with the batched evaluators, and with the same evaluators fed one item at
a time (batch size 1: the loop a simple implementation would write), in one process,
with a warm-up first; the ratio is the speed-up of batching.
Part 2: ``latency_ms_per_token`` of one model measured ``--latency-runs`` times (each
a median of 5 repeats after 2 warm-ups, 1 thread): median, spread and coefficient of
variation (std / mean) across those runs.

The model is randomly initialised at the teacher's default shape (weights do not change
the cost, except QA, where a random model never stops early: every answer runs to
``max_new_tokens``, for both the batched and the looped path). Items and tokenizer are
the embedded world's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from kd import evaluate as ev
from kd.measure import count_params, latency


def _model(arch: str, vocab: int, n_layer: int, n_embd: int, eos: int, n_ctx: int = 256):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer,
                                          n_head=n_embd // 64, bos_token_id=eos, eos_token_id=eos)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=4 * n_embd,
                                        num_hidden_layers=n_layer, num_attention_heads=n_embd // 64,
                                        max_position_embeddings=n_ctx, bos_token_id=eos, eos_token_id=eos,
                                        pad_token_id=eos)).eval()


def _time(fn, n_items: int, reps: int) -> float:
    """Items per second: the best of ``reps`` timed runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="small", help="world size for items and tokenizer")
    p.add_argument("--items", type=int, default=64, help="items per task family")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads for part 1")
    p.add_argument("--reps", type=int, default=2, help="timed runs per cell (best is kept)")
    p.add_argument("--latency-runs", type=int, default=5)
    p.add_argument("--latency-only", action="store_true", help="skip part 1")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from kd.world import ensure_world

    world = ensure_world(args.world)
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    model = _model(args.arch, len(tok), args.n_layer, args.n_embd, tok.eos_token_id)
    torch.set_num_threads(args.threads)
    n = args.items
    completion = ev.read_jsonl(world / "completion.jsonl", n)
    choice = ev.read_jsonl(world / "choice.jsonl", n)
    qa = ev.read_jsonl(world / "qa.jsonl", n)
    shots = ev.read_jsonl(world / "qa_fewshot.jsonl")[:2]
    texts = [r["text"] for r in ev.read_jsonl(world / "val.jsonl", n)]

    families = {
        "completion": (len(completion), lambda bs: ev.eval_completion(model, tok, completion, batch_size=bs)),
        "choice (4 endings)": (len(choice), lambda bs: ev.eval_choice(model, tok, choice, batch_size=bs)),
        "qa (greedy, 16 new tokens)": (len(qa), lambda bs: ev.eval_qa(model, tok, qa, fewshot=shots, batch_size=bs)),
        "perplexity (docs)": (len(texts), lambda bs: ev.perplexity(model, tok, texts, batch_size=bs)),
    }
    params = count_params(model)["params"]
    print(f"# {args.arch} {args.n_layer}x{args.n_embd} ({params / 1e6:.2f}M params), world={args.world}, "
          f"torch threads={args.threads}, batch={args.batch_size}, cpu_count={os.cpu_count()}, "
          f"torch {torch.__version__}")
    if not args.latency_only:
        print("\n| task family | items | batched items/s | one-at-a-time items/s | speed-up |")
        print("| --- | ---: | ---: | ---: | ---: |")
    for name, (count, fn) in ({} if args.latency_only else families).items():
        fn(args.batch_size)  # warm-up (and the QA stop-token table)
        batched = _time(lambda: fn(args.batch_size), count, args.reps)
        single = _time(lambda: fn(1), count, args.reps)
        print(f"| {name} | {count} | {batched:.1f} | {single:.1f} | {batched / single:.2f}x |", flush=True)

    runs = [latency(model, tok, threads=1)["latency_ms_per_token"] for _ in range(args.latency_runs)]
    mean, sd = statistics.mean(runs), statistics.stdev(runs)
    print(f"\nlatency_ms_per_token, {args.latency_runs} runs (each: median of 5 after 2 warm-ups, batch 1, "
          f"1 thread, prompt 32, 32 new tokens)")
    print("| runs (ms/token) | median | min | max | CV (std/mean) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| {', '.join(f'{r:.2f}' for r in runs)} | {statistics.median(runs):.2f} | {min(runs):.2f} | "
          f"{max(runs):.2f} | {100 * sd / mean:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
