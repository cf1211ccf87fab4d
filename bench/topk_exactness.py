"""How far sparse soft labels are from dense: loss and student-parameter gradients, by V, T, k.

Methods, each against the dense teacher (all V logits, fp16 as a dense cache holds them):

- ``dense``    the reference itself (2 V bytes per token);
- ``topk``     top-k renormalised over its k logits (the truncated teacher; k ids + k fp16);
- ``compact``  top-k + the tail's log-partition on a grid of 1/T (:mod:`kd.compact`): the
               exact tempered teacher on k + 1 buckets (+ 8 bytes per grid point). Rows at
               temperatures between grid points (``on_grid: false``) measure the
               interpolation.
- ``sampled``  compact + S ids drawn from the teacher's tail at a proposal temperature,
               with their logits (RS-KD; :func:`kd.compact.sample_tail`): the tail's shape
               by importance weights (+ S ids and S fp16 per token), the gradient with the
               loss's control variate (:mod:`kd.losses_fused`), as training uses it;
- ``sampled_plain`` (``--plain``) the same samples and value without the control variate:
               the gradient of the importance-weighted estimate itself (RS-KD as published),
               by autograd through its formula, to show what the control variate buys.

``grad_cos`` is the cosine between the gradient of the kd loss (kd_weight = 1, T^2 * D)
wrt the PARAMETERS of a small real student from the method and from dense: a 2-layer
GPT-2 (d = 64) on one batch of ``--tokens`` token positions, whose logits are its own
plus a fixed offset that makes it a partly trained student (0.8 * teacher + N(0, 1.5^2):
top-1 agreement about one half). ``logit_grad_cos`` is the same on the logits. A sampled
tail is a random estimate: ``grad_cos`` is one draw's (what one batch sees),
``grad_cos_mean`` that of the mean gradient over ``--draws`` independent draws (the bias
that many steps do not average away; equal to ``grad_cos`` for the other methods).

    python bench/topk_exactness.py --quick --json out.json        # V = 32000, < 1 min
    python bench/topk_exactness.py --json all.json                # V in {2048, 32000, 128256}
    python bench/topk_exactness.py --teacher DIR --data FILE      # a save_pretrained teacher

Synthetic teachers are shaped like a trained LM's, not noise: per token p_r ~ r^-a with
a ~ U(1.2, 2.0) plus N(0, 0.5^2) jitter, on a shuffled vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kd.compact import compress, interpolate, sample_tail, sampled_targets, temperature_grid
from kd.losses import DIVERGENCES, distillation_loss

QUICK = dict(vocabs="32000", temperatures="1,2,4,8", ks="64", tokens=2048, grid_points=5, samples=64, draws=2)


def synthetic_teacher(n_tokens: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Peaked, heavy-tailed logits (n_tokens, vocab): log p_r = -a log r + jitter, shuffled."""
    a = 1.2 + 0.8 * torch.rand(n_tokens, 1, generator=gen)  # (N, 1) Zipf exponent per token
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)  # (V,)
    logits = -a * ranks.log() + 0.5 * torch.randn(n_tokens, vocab, generator=gen)
    perm = torch.argsort(torch.rand(n_tokens, vocab, generator=gen), dim=-1)  # top-k not the first ids
    return logits.gather(-1, perm)


def perturbed_student(teacher: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A partly trained student's logits: the teacher's shrunk and noised (same shape)."""
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


def real_teacher(args: argparse.Namespace) -> tuple[torch.Tensor, str, dict]:
    """The teacher's logits on the first ``--tokens`` positions of ``--data``, and the
    student's blocks: those positions and, after them, its training blocks."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.teacher)
    n_train, L = 8 * args.student_steps, args.block_size
    ids = torch.tensor(tok(_read_text(Path(args.data))[: 8 * (args.tokens + (n_train + 1) * (L + 1))])["input_ids"])
    n_blocks = max(1, min(len(ids) // L, math.ceil(args.tokens / L)))
    rest = ids[n_blocks * L:]  # the student's training text: after the measured positions
    train = rest[: len(rest) // (L + 1) * (L + 1)].reshape(-1, L + 1)
    ids = ids[: n_blocks * L].reshape(n_blocks, L)
    teacher = model_logits(args.teacher, ids, len(tok))[: args.tokens]
    return teacher, f"teacher {args.teacher} on {args.data}", {"ids": ids, "train": train}


def trained_student(vocab: int, train: torch.Tensor, steps: int, seed: int):
    """A real partly trained student: GPT-2 1 x 256, ``steps`` CE steps of 8 blocks, AdamW 1e-3."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=train.shape[1], n_embd=256, n_layer=1,
                                       n_head=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(train), (8,), generator=gen)
        logits = model(train[rows, :-1]).logits[..., :vocab]
        loss = F.cross_entropy(logits.reshape(-1, vocab), train[rows, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


class Student:
    """Gradients on a small real student's parameters.

    Synthetic teachers: a 2-layer GPT-2 (d = 64) on random ids + a fixed logit offset that
    makes it a partly trained student (its errors are i.i.d. on every logit). A real
    teacher (``data``): :func:`trained_student` on the teacher's own text, no offset (its
    errors are a real model's).
    """

    def __init__(self, offset: torch.Tensor, seed: int, data: dict | None = None, steps: int = 0):
        from transformers import GPT2Config, GPT2LMHeadModel

        n, vocab = offset.shape
        if data is not None:
            self.model = trained_student(vocab, data["train"], steps, seed)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.logits = self.model(data["ids"]).logits[..., :vocab].reshape(-1, vocab)[:n]
            return
        torch.manual_seed(seed)
        block = 256 if n % 256 == 0 else n
        cfg = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=64, n_layer=2, n_head=2)
        self.model = GPT2LMHeadModel(cfg)
        ids = torch.randint(0, vocab, (n // block, block), generator=torch.Generator().manual_seed(seed))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.logits = self.model(ids).logits.reshape(n, vocab) + offset  # (N, V), keeps the graph

    def grads(self, kd_fn) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(parameter gradient (P,) fp64, logit gradient (N, V), loss) of ``kd_fn(logits)``."""
        s = self.logits.detach().requires_grad_(True)
        kd = kd_fn(s)
        (g_logits,) = torch.autograd.grad(kd, s)
        g_params = torch.autograd.grad(self.logits, self.params, g_logits, retain_graph=True)
        return torch.cat([g.flatten().double() for g in g_params]), g_logits, kd.item()


def bytes_per_token(method: str, vocab: int, k: int, grid: int, samples: int = 0) -> int:
    ids = 2 if vocab <= 32768 else 4  # int16 ids while they fit (kd.soft_labels)
    compact = k * (2 + ids) + 8 * grid
    return {"dense": 2 * vocab, "topk": k * (2 + ids), "compact": compact,
            "sampled": compact + samples * (2 + ids), "sampled_plain": compact + samples * (2 + ids)}[method]


def plain_sampled_kd(s: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor, slope: torch.Tensor,
                     betas: tuple[float, ...], sid: torch.Tensor, sval: torch.Tensor, t: float, proposal: float
                     ) -> torch.Tensor:
    """T^2 * the importance-weighted KL estimate on head + sampled slots (every row counts),
    whose autograd gradient is the plain RS-KD one: no control variate."""
    p, log_p, _ = sampled_targets(values, interpolate(lse, slope, betas, 1.0 / t), sval, t, proposal)
    log_q = F.log_softmax(s.float() / t, -1).gather(-1, torch.cat([idx, sid], -1))
    return t * t * torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1).mean()


def measure(teacher: torch.Tensor, temperatures: list[float], ks: list[int], divergences: list[str],
            grid_points: int, t_range: tuple[float, float], seed: int, source: str, samples: int = 0,
            proposal: float = 4.0, draws: int = 1, student_data: dict | None = None, student_steps: int = 0,
            plain: bool = False) -> list[dict]:
    """One row per (divergence, T, method, k); ``sampled`` rows when ``samples`` > 0."""
    gen = torch.Generator().manual_seed(seed)
    teacher = teacher.half().float()  # what any cache holds
    n, vocab = teacher.shape
    student = Student(perturbed_student(teacher, gen) if student_data is None else teacher, seed, student_data,
                      student_steps)
    labels = torch.zeros((1, n), dtype=torch.long)
    betas = temperature_grid(*t_range, grid_points)
    packs = {k: compress(teacher, k, betas) for k in ks if k < vocab}
    tails = {k: [sample_tail(teacher, pack[1], samples, proposal, torch.Generator().manual_seed(seed + 1 + d))
                 for d in range(draws)] for k, pack in packs.items()} if samples else {}
    rows = []
    for div in divergences:
        for t in temperatures:
            def kd(s: torch.Tensor, **targets) -> torch.Tensor:
                return distillation_loss(s[None], labels, temperature=t, kd_weight=1.0, divergence=div,
                                         check_indices=False, **targets).kd

            ref_p, ref_l, ref_loss = student.grads(lambda s: kd(s, teacher_logits=teacher[None]))
            on_grid = any(math.isclose(1 / t, b, rel_tol=1e-9) for b in betas)
            rows.append(_row(source, vocab, div, t, "dense", vocab, grid_points, on_grid, ref_loss, ref_loss,
                             ref_p, ref_p, ref_l, ref_l, 1.0, ref_p))
            for k, (values, idx, lse, slope) in packs.items():
                mass = F.softmax(teacher / t, -1).gather(-1, idx).sum(-1).mean().item()
                sparse = dict(topk_indices=idx[None], topk_values=values[None])
                compact = dict(sparse, topk_tail_lse=lse[None], topk_tail_slope=slope[None], tail_betas=betas)
                for method, targets in (("topk", sparse), ("compact", compact)):
                    g_p, g_l, loss = student.grads(lambda s: kd(s, **targets))
                    rows.append(_row(source, vocab, div, t, method, k, grid_points, on_grid, loss, ref_loss,
                                     g_p, ref_p, g_l, ref_l, mass, g_p))
                if k in tails and div == "forward_kl":  # importance weights estimate E_p[.]: forward KL only
                    runs = [student.grads(lambda s: kd(s, **compact, tail_sample_indices=sid[None],
                                                       tail_sample_values=sval[None], proposal_temperature=proposal))
                            for sid, sval in tails[k]]
                    mean = torch.stack([r[0] for r in runs]).mean(0)
                    g_p, g_l, loss = runs[0]
                    rows.append(_row(source, vocab, div, t, "sampled", k, grid_points, on_grid, loss, ref_loss,
                                     g_p, ref_p, g_l, ref_l, mass, mean, samples, proposal))
                    if plain:
                        runs = [student.grads(lambda s: plain_sampled_kd(s, values, idx, lse, slope, betas, sid, sval,
                                                                         t, proposal)) for sid, sval in tails[k]]
                        mean = torch.stack([r[0] for r in runs]).mean(0)
                        g_p, g_l, loss = runs[0]
                        rows.append(_row(source, vocab, div, t, "sampled_plain", k, grid_points, on_grid, loss,
                                         ref_loss, g_p, ref_p, g_l, ref_l, mass, mean, samples, proposal))
    return rows


def _row(source, vocab, div, t, method, k, grid, on_grid, loss, ref_loss, g_p, ref_p, g_l, ref_l, mass, g_mean,
         samples=0, proposal=None) -> dict:
    g_l, ref_l = g_l.double().flatten(), ref_l.double().flatten()
    size = bytes_per_token(method, vocab, k, grid, samples)
    return {
        "source": source, "vocab": vocab, "divergence": div, "temperature": t, "k": k, "method": method,
        "samples": samples, "proposal_temperature": proposal,
        "bytes_per_token": size, "bytes_share": size / (2 * vocab),
        "grid_points": grid if method in ("compact", "sampled") else 0, "on_grid": on_grid, "teacher_mass_topk": mass,
        "loss_dense": ref_loss, "loss": loss, "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
        "grad_cos": F.cosine_similarity(g_p, ref_p, dim=0).item(),
        "grad_cos_mean": F.cosine_similarity(g_mean, ref_p, dim=0).item(),
        "logit_grad_cos": F.cosine_similarity(g_l, ref_l, dim=0).item(),
        "grad_rel_l2": ((g_l - ref_l).norm() / ref_l.norm()).item(),
    }


def _method(r: dict) -> str:
    return f"{r['method']} S={r['samples']}, T_p={r['proposal_temperature']:g}" if r["samples"] else r["method"]


def markdown(rows: list[dict]) -> str:
    lines = ["| source | V | div | T | on grid | method | k | bytes/token | % of dense | top-k mass | loss rel. err "
             "| grad_cos (params) | grad_cos, mean of draws | grad_cos (logits) |",
             "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['source'].split(' ')[0]} | {r['vocab']} | {r['divergence']} | {r['temperature']:g} | "
                     f"{'yes' if r['on_grid'] else 'no'} | {_method(r)} | {r['k']} | {r['bytes_per_token']} | "
                     f"{100 * r['bytes_share']:.2f} | {r['teacher_mass_topk']:.3f} | {r['loss_rel_err']:.2e} | "
                     f"{r['grad_cos']:.5f} | {r['grad_cos_mean']:.5f} | {r['logit_grad_cos']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", help="save_pretrained directory of a trained teacher (default: synthetic logits)")
    ap.add_argument("--data", help="text for the teacher: .txt or .jsonl with a 'text' field (needs --teacher)")
    ap.add_argument("--tokens", type=int, default=2048, help="token positions in the batch")
    ap.add_argument("--vocabs", default="2048,32000,128256", help="synthetic vocabulary sizes")
    ap.add_argument("--block-size", type=int, default=128, help="tokens per block fed to --teacher")
    ap.add_argument("--student-steps", type=int, default=60,
                    help="with --teacher: CE steps of the real student (GPT-2 1 x 256) on the teacher's text")
    ap.add_argument("--temperatures", default="0.5,1,2,4,8")
    ap.add_argument("--extra-temperatures", default="0.71,1.41,2.83,5.66",
                    help="more temperatures (between the grid's points by default)")
    ap.add_argument("--ks", default="16,64,256", help="comma-separated k values")
    ap.add_argument("--grid", default="0.5,8", help="the compact grid's temperature range t_min,t_max")
    ap.add_argument("--grid-points", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64, help="tail samples per token of the sampled method (0 = none)")
    ap.add_argument("--proposal-temperature", type=float, default=4.0, help="temperature the tail samples are drawn at")
    ap.add_argument("--draws", type=int, default=4, help="independent tail draws for grad_cos_mean")
    ap.add_argument("--plain", action="store_true",
                    help="also the sampled tail without the loss's control variate (method sampled_plain)")
    ap.add_argument("--divergence", default="forward_kl", choices=[*DIVERGENCES, "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="V = 32000, T in {1, 2, 4, 8}, k = 64, S = 64, 2 draws")
    ap.add_argument("--json", help="write the rows and the setup to this file")
    args = ap.parse_args(argv)
    if bool(args.teacher) != bool(args.data):
        ap.error("--teacher and --data go together (or give neither for synthetic logits)")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.extra_temperatures = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    temperatures = sorted({float(t) for t in f"{args.temperatures},{args.extra_temperatures}".split(",") if t})
    ks = [int(k) for k in args.ks.split(",")]
    divergences = list(DIVERGENCES) if args.divergence == "all" else [args.divergence]
    t_range = tuple(float(x) for x in args.grid.split(","))
    started = time.perf_counter()
    rows = []
    if args.teacher:
        teachers = [real_teacher(args)]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        teachers = [(synthetic_teacher(args.tokens, int(v), gen), "synthetic", None) for v in args.vocabs.split(",")]
    for teacher, source, student_data in teachers:
        rows += measure(teacher, temperatures, ks, divergences, args.grid_points, t_range, args.seed, source,
                        args.samples, args.proposal_temperature, args.draws, student_data, args.student_steps,
                        args.plain)
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s; grid T in [{t_range[0]:g}, {t_range[1]:g}], "
          f"{args.grid_points} points; kd_weight = 1 (loss = T^2 * D); {args.tokens} tokens\n")
    print(markdown(rows))
    if args.json:
        setup = {"tokens": args.tokens, "grid": list(t_range), "grid_points": args.grid_points, "seed": args.seed,
                 "samples": args.samples, "proposal_temperature": args.proposal_temperature, "draws": args.draws,
                 "plain": args.plain,
                 "argv": sys.argv[1:] if argv is None else argv, "source": [s for _, s, _ in teachers],
                 "student": "trained" if args.teacher else "offset", "student_steps": args.student_steps}
        Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
