"""How far top-k sparse distillation is from dense: loss and gradient, by T and k.

The soft-label cache keeps only the teacher's top-k logits per token (DESIGN.md: one
cache serves every trial and every temperature). This measures what that costs: for
each temperature T and k, the relative error of the distillation loss (kd_weight = 1,
so the loss is T^2 * D) and, for the gradient wrt the student logits, its cosine
similarity and relative L2 error against the dense (k = V) result.

    python bench/topk_exactness.py                               # synthetic peaked logits
    python bench/topk_exactness.py --divergence all --json topk.json
    python bench/topk_exactness.py --teacher DIR --data FILE [--student DIR]

Without ``--teacher`` the teacher logits are synthetic but shaped like a trained LM's,
not uniform noise: per token the probabilities follow a power law in rank,
p_r ~ r^-a with a ~ U(1.2, 2.0) (top-1 probability ~0.2-0.6, a heavy tail), plus
Gaussian jitter, on a shuffled vocabulary. The student is the teacher's logits shrunk
and perturbed (a partly trained student that agrees on the top-1 token about half the
time). With ``--teacher`` the logits come from a ``save_pretrained`` model on the text
of ``--data`` (.txt or .jsonl with a ``text`` field); the student is ``--student`` if
given, else the same perturbation of the teacher's logits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.losses import DIVERGENCES, distillation_loss


def synthetic_teacher(n_tokens: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Peaked, heavy-tailed logits (n_tokens, vocab): log p_r = -a log r + jitter, shuffled."""
    a = 1.2 + 0.8 * torch.rand(n_tokens, 1, generator=gen)  # (N, 1) Zipf exponent per token
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)  # (V,)
    logits = -a * ranks.log() + 0.5 * torch.randn(n_tokens, vocab, generator=gen)
    # Shuffle which token ids get which rank, so the top-k are not simply the first ids.
    perm = torch.argsort(torch.rand(n_tokens, vocab, generator=gen), dim=-1)
    return logits.gather(-1, perm)


def perturbed_student(teacher: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A partly trained student: the teacher's logits shrunk and noised (same shape)."""
    return 0.8 * teacher + 1.5 * torch.randn(teacher.shape, generator=gen)


def _read_text(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "\n".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    return path.read_text()


@torch.no_grad()
def model_logits(model_dir: str, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Next-token logits (N, vocab) of a save_pretrained model on blocks of ids (n_blocks, L)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # frozen: no dropout
    out = torch.cat([model(ids[i : i + 8]).logits.float() for i in range(0, len(ids), 8)])
    return out.reshape(-1, out.shape[-1])[:, :vocab]  # cut padded rows to the tokenizer length


def real_logits(args: argparse.Namespace, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.teacher)
    ids = torch.tensor(tok(_read_text(Path(args.data)))["input_ids"])
    n_blocks = max(1, min(len(ids) // args.block_size, math.ceil(args.tokens / args.block_size)))
    ids = ids[: n_blocks * args.block_size].reshape(n_blocks, -1)
    teacher = model_logits(args.teacher, ids, len(tok))
    student = model_logits(args.student, ids, len(tok)) if args.student else perturbed_student(teacher, gen)
    source = f"teacher {args.teacher} on {args.data} ({teacher.shape[0]} tokens); student " + (
        args.student or "= perturbed teacher logits (0.8 * teacher + N(0, 1.5^2))")
    return teacher, student, source


def measure(student: torch.Tensor, teacher: torch.Tensor, temperature: float, k: int, divergence: str,
            dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kd loss (T^2 included) and its gradient wrt the student logits, top-k or dense."""
    s = student[None].clone().requires_grad_(True)  # (1, N, V)
    labels = torch.zeros(s.shape[:2], dtype=torch.long)  # all positions count; CE is unused
    if dense:
        targets = dict(teacher_logits=teacher[None])
    else:  # what the soft-label cache stores; k = V checks that the sparse path is exact
        values, indices = teacher.topk(k, dim=-1)
        targets = dict(topk_indices=indices[None], topk_values=values.half()[None])
    kd = distillation_loss(s, labels, temperature=temperature, kd_weight=1.0, divergence=divergence, **targets).kd
    (grad,) = torch.autograd.grad(kd, s)
    return kd.detach(), grad[0]


def run(teacher: torch.Tensor, student: torch.Tensor, temperatures: list[float], ks: list[int],
        divergences: list[str]) -> list[dict]:
    """One row per (divergence, T, k): top-k loss and gradient against the dense ones."""
    vocab = teacher.shape[-1]
    # Dense reference with the same fp16 teacher values the cache would hold.
    teacher = teacher.half().float()
    rows = []
    for div in divergences:
        for t in temperatures:
            ref_loss, ref_grad = measure(student, teacher, t, vocab, div, dense=True)
            ref_grad = ref_grad.double()
            p = F.softmax(teacher / t, dim=-1)
            for k in ks:
                loss, grad = measure(student, teacher, t, k, div)
                grad = grad.double()  # fp64 cosine: fp32 rounding over N * V terms shows at 1e-4
                mass = p.topk(min(k, vocab), dim=-1).values.sum(-1).mean().item()
                rows.append({
                    "divergence": div, "temperature": t, "k": k, "teacher_mass_topk": mass,
                    "loss_dense": ref_loss.item(), "loss_topk": loss.item(),
                    "loss_rel_err": (abs(loss - ref_loss) / ref_loss.abs()).item(),
                    "grad_cosine": F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0).item(),
                    "grad_rel_l2": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
                })
    return rows


def markdown(rows: list[dict], vocab: int) -> str:
    """The rows as a markdown table (k = V written as ``V=<vocab>``)."""
    lines = ["| divergence | T | k | teacher mass in top-k | loss (dense) | loss rel. err | grad cosine | grad rel. L2 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        k = f"V={vocab}" if r["k"] >= vocab else str(r["k"])
        lines.append(f"| {r['divergence']} | {r['temperature']:g} | {k} | {r['teacher_mass_topk']:.3f} | "
                     f"{r['loss_dense']:.4g} | {r['loss_rel_err']:.2e} | {r['grad_cosine']:.5f} | "
                     f"{r['grad_rel_l2']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", help="save_pretrained directory of a trained teacher (default: synthetic logits)")
    ap.add_argument("--data", help="text for the teacher: .txt or .jsonl with a 'text' field (needs --teacher)")
    ap.add_argument("--student", help="save_pretrained directory of a student (default: perturbed teacher)")
    ap.add_argument("--tokens", type=int, default=256, help="token positions to measure")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the synthetic logits")
    ap.add_argument("--block-size", type=int, default=128, help="tokens per block fed to --teacher")
    ap.add_argument("--temperatures", default="1,2,4,8")
    ap.add_argument("--ks", default="8,32,128,V", help="comma-separated k values; V = the full vocabulary")
    ap.add_argument("--divergence", default="forward_kl", choices=[*DIVERGENCES, "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="write the rows and the setup to this file")
    args = ap.parse_args(argv)
    if bool(args.teacher) != bool(args.data):
        ap.error("--teacher and --data go together (or give neither for synthetic logits)")
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    if args.teacher:
        teacher, student, source = real_logits(args, gen)
    else:
        teacher = synthetic_teacher(args.tokens, args.vocab, gen)
        student = perturbed_student(teacher, gen)
        source = ("SYNTHETIC logits (no --teacher given): power-law teacher p_r ~ r^-a, a ~ U(1.2, 2.0), "
                  "+ N(0, 0.5^2) jitter; student = 0.8 * teacher + N(0, 1.5^2)")
    vocab = teacher.shape[-1]
    ks = sorted({vocab if k.strip().upper() == "V" else min(int(k), vocab) for k in args.ks.split(",")})
    temperatures = [float(t) for t in args.temperatures.split(",")]
    divergences = list(DIVERGENCES) if args.divergence == "all" else [args.divergence]

    p1 = F.softmax(teacher, -1).max(-1).values.mean().item()
    agree = (teacher.argmax(-1) == student.argmax(-1)).float().mean().item()
    print(f"{source}\n{teacher.shape[0]} tokens, V = {vocab}; teacher mean top-1 prob at T=1: {p1:.3f}; "
          f"student-teacher top-1 agreement: {agree:.2f}; kd_weight = 1 (loss = T^2 * D); "
          "top-k values in fp16 as cached; dense reference from the same fp16 logits\n")
    rows = run(teacher, student, temperatures, ks, divergences)
    print(markdown(rows, vocab))
    if args.json:
        setup = {"source": source, "tokens": teacher.shape[0], "vocab": vocab, "teacher_top1_prob": p1,
                 "top1_agreement": agree, "seed": args.seed, "argv": sys.argv[1:]}
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
