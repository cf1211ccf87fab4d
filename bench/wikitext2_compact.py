"""WikiText-2 students from the dense and from the compact soft-label cache, same batches.

    python bench/wikitext2_compact.py --teacher DIR [--blocks 256 --steps 60 --temperatures 1,2,4]

``DIR``: a save_pretrained teacher with its tokenizer (bench/wikitext2.py's, in
``cache_dir()/teachers/<fingerprint>``). Each student (1 x 256, random init, the same seed
and batches) distils with kd_weight = 1 through ``kd.run.distill`` in cache mode, once
from a dense cache and once from a compact one (top-k + the tail grid); the table gives
the validation perplexity of each and the compact/dense gap.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"))
    ap.add_argument("--blocks", type=int, default=256, help="training blocks (the dense cache is 2 V bytes/token)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from kd.config import load_config
    from kd.run import distill

    out = Path(tempfile.mkdtemp(prefix="kd-wt2-compact-"))
    rows = []
    for t in (float(x) for x in args.temperatures.split(",")):
        ppl = {}
        for fmt in ("dense", "compact"):
            cfg = load_config(overrides={
                "data.source": args.data, "data.block_size": 128, "data.max_blocks": args.blocks,
                "teacher.source": args.teacher, "student.n_layer": 1, "student.n_embd": 256, "student.n_head": 4,
                "train.steps": args.steps, "train.batch_size": 8, "train.warmup_steps": max(1, args.steps // 10),
                "train.eval_every": args.steps, "train.eval_blocks": 64, "train.threads": args.threads,
                "train.device": "cpu", "train.precision": "fp32", "train.compile": "false",
                "loss.kd_weight": 1.0, "loss.temperature": t, "teacher.mode": "cache",
                "teacher.soft_label_format": fmt, "teacher.top_k": args.k if fmt == "compact" else 0,
                "teacher.soft_labels_dir": str(out / "soft"), "output_dir": str(out / f"{fmt}-{t:g}")})
            t0 = time.perf_counter()
            m = distill(cfg, evaluate=False)
            ppl[fmt] = m["val_ppl"]
            print(f"T={t:g} {fmt}: val ppl {m['val_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append((t, ppl["dense"], ppl["compact"]))
    print(f"\n{args.blocks} training blocks x 128 tokens, {args.steps} steps x 8 blocks, k = {args.k}, kd_weight = 1")
    print("| T | val ppl (dense cache) | val ppl (compact cache) | compact / dense - 1 |")
    print("| ---: | ---: | ---: | ---: |")
    for t, d, c in rows:
        print(f"| {t:g} | {d:.2f} | {c:.2f} | {100 * (c / d - 1):+.2f}% |")


if __name__ == "__main__":
    main()
