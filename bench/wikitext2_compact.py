"""WikiText-2 students from the dense, the bucket-only and the sampled-tail cache, same batches.

    python bench/wikitext2_compact.py --teacher DIR [--blocks 256 --steps 60 --temperatures 1,2,4]

``DIR``: a save_pretrained teacher with its tokenizer (bench/wikitext2.py's, in
``cache_dir()/teachers/<fingerprint>``). Each student (1 x 256, random init, the same seed
and batches) distils through ``kd.run.distill`` in cache mode from three caches: dense
(all V logits), compact with the k + 1 buckets only (``teacher.tail_samples=0``) and
compact with the sampled tail (the default, S = ``--samples``). The table gives the
validation perplexity of each, its gap to dense and the cache's bytes per token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CACHES = {  # name: (teacher.soft_label_format, tail samples or None for dense)
    "dense": ("dense", None),
    "buckets": ("compact", 0),
    "sampled": ("compact", "S"),
}


def bytes_per_token(name: str, vocab: int, k: int, samples: int, grid: int) -> int:
    ids = 2 if vocab <= 32768 else 4
    return {"dense": 2 * vocab, "buckets": k * (2 + ids) + 8 * grid,
            "sampled": (k + samples) * (2 + ids) + 8 * grid}[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"))
    ap.add_argument("--blocks", type=int, default=256, help="training blocks (the dense cache is 2 V bytes/token)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="tail samples per token of the sampled cache")
    ap.add_argument("--kd-weights", default="1", help="comma-separated loss.kd_weight values")
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from kd.config import load_config
    from kd.run import distill

    out = Path(tempfile.mkdtemp(prefix="kd-wt2-compact-"))
    rows, vocab, grid = [], None, None
    for w in (float(x) for x in args.kd_weights.split(",")):
        for t in (float(x) for x in args.temperatures.split(",")):
            ppl = {}
            for name, (fmt, samples) in CACHES.items():
                cfg = load_config(overrides={
                    "data.source": args.data, "data.block_size": 128, "data.max_blocks": args.blocks,
                    "teacher.source": args.teacher, "student.n_layer": 1, "student.n_embd": 256,
                    "student.n_head": 4, "train.steps": args.steps, "train.batch_size": 8,
                    "train.warmup_steps": max(1, args.steps // 10), "train.eval_every": args.steps,
                    "train.eval_blocks": 64, "train.threads": args.threads, "train.device": "cpu",
                    "train.precision": "fp32", "train.compile": "false", "loss.kd_weight": w,
                    "loss.temperature": t, "teacher.mode": "cache", "teacher.soft_label_format": fmt,
                    "teacher.top_k": args.k if fmt == "compact" else 0,
                    "teacher.tail_samples": args.samples if samples == "S" else 0,
                    "teacher.soft_labels_dir": str(out / "soft"), "output_dir": str(out / f"{name}-{w:g}-{t:g}")})
                grid = cfg.teacher.grid_points
                t0 = time.perf_counter()
                m = distill(cfg, evaluate=False)
                ppl[name] = m["val_ppl"]
                print(f"kd_weight={w:g} T={t:g} {name}: val ppl {m['val_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            if vocab is None:
                from kd.models import load_tokenizer

                vocab = len(load_tokenizer(args.teacher))
            rows.append((w, t, ppl))
    size = {name: bytes_per_token(name, vocab, args.k, args.samples, grid) for name in CACHES}
    print(f"\n{args.blocks} training blocks x 128 tokens, {args.steps} steps x 8 blocks, k = {args.k}, "
          f"S = {args.samples}, V = {vocab}; bytes/token: "
          + ", ".join(f"{n} {b} ({100 * b / size['dense']:.1f}%)" for n, b in size.items()))
    print("| kd_weight | T | val ppl, dense | buckets only | vs dense | sampled tail | vs dense |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for w, t, p in rows:
        gap = {name: 100 * (p[name] / p["dense"] - 1) for name in ("buckets", "sampled")}
        print(f"| {w:g} | {t:g} | {p['dense']:.1f} | {p['buckets']:.1f} | {gap['buckets']:+.1f}% "
              f"| {p['sampled']:.1f} | {gap['sampled']:+.1f}% |")


if __name__ == "__main__":
    main()
