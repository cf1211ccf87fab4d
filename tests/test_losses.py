"""kd.losses against torch and hand-written reference formulas, on tiny seeded tensors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd import config
from kd.losses import DIVERGENCES, LossParts, cross_entropy, distillation_loss, divergence_per_token

B, T, V = 2, 5, 11


def make(seed: int = 0, scale: float = 2.0, v: int = V):
    """Student and teacher logits (B, T, v) and labels (B, T) with three masked positions."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, v, generator=g) * scale
    teacher = torch.randn(B, T, v, generator=g) * scale
    labels = torch.randint(0, v, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, 3] = -100
    return student, teacher, labels


def topk(teacher: torch.Tensor, k: int, shuffle: bool = False):
    """The teacher's top-k (indices, values); ``shuffle`` permutes the k slots per token."""
    values, indices = teacher.topk(k, dim=-1)
    if shuffle:
        perm = torch.argsort(torch.rand(indices.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
        values, indices = values.gather(-1, perm), indices.gather(-1, perm)
    return indices, values.half()  # the soft-label cache stores fp16 values


def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """KL(p || r) over the last dim with 0 log 0 = 0 (fp64 reference)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, r)).sum(-1)


def reference(div: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-token divergence written from the textbook definitions on probabilities."""
    if div == "forward_kl":
        return kl(p, q)
    if div == "reverse_kl":
        return kl(q, p)
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if div == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if div == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(div)


def kd_of(student, labels, temperature=1.0, divergence="forward_kl", **teacher):
    return distillation_loss(student, labels, temperature=temperature, kd_weight=1.0, divergence=divergence,
                             **teacher).kd


def test_divergences_match_config():
    assert DIVERGENCES == config.DIVERGENCES


def test_cross_entropy_matches_torch_with_masking():
    student, _, labels = make()
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(student, labels), expected)
    parts = distillation_loss(student, labels, temperature=2.0, kd_weight=0.0)
    torch.testing.assert_close(parts.ce, expected)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_forward_kl_matches_torch_kl_div(temperature):
    student, teacher, labels = make()
    keep = labels.reshape(-1) != -100
    log_q = F.log_softmax(student.reshape(-1, V)[keep] / temperature, -1)
    p = F.softmax(teacher.reshape(-1, V)[keep] / temperature, -1)
    expected = temperature**2 * F.kl_div(log_q, p, reduction="batchmean")
    torch.testing.assert_close(kd_of(student, labels, temperature, teacher_logits=teacher), expected)


def _autograd_reference(student, labels, temperature, kd_weight, teacher=None, idx=None, val=None):
    """(loss, ce, kd) by autograd on the textbook formulas in fp64, boolean-selected rows."""
    keep = labels.reshape(-1) != -100
    s = student.reshape(-1, student.shape[-1])[keep].double()
    ce = F.cross_entropy(s, labels.reshape(-1)[keep], reduction="sum") / max(int(keep.sum()), 1)
    log_q = F.log_softmax(s / temperature, -1)
    if teacher is not None:
        p = F.softmax(teacher.reshape(-1, teacher.shape[-1])[keep].double() / temperature, -1)
    else:
        k = idx.shape[-1]
        p_k = F.softmax(val.reshape(-1, k)[keep].double() / temperature, -1)
        p = torch.zeros_like(s).scatter(-1, idx.reshape(-1, k)[keep], p_k)
    kd = temperature**2 * (torch.xlogy(p, p) - p * log_q).sum() / max(int(keep.sum()), 1)
    return (1 - kd_weight) * ce + kd_weight * kd, ce, kd


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("output", [0, 1, 2])
def test_fused_forward_kl_values_and_gradients_equal_autograd(sparse, temperature, kd_weight, output):
    # The training loop's fused node (kd.losses_fused) against autograd through the
    # definitions: every output, and the gradient of each one, with masked rows.
    student, teacher, labels = make(seed=11)
    idx, val = topk(teacher, 4, shuffle=True)
    targets = dict(topk_indices=idx, topk_values=val) if sparse else dict(teacher_logits=teacher)
    s = student.clone().requires_grad_(True)
    before = {k: v.clone() for k, v in targets.items()}
    got = distillation_loss(s, labels, temperature=temperature, kd_weight=kd_weight, **targets)
    got[output].backward()
    assert all(torch.equal(before[k], v) for k, v in targets.items())  # targets are inputs, not buffers
    s_ref = student.clone().double().requires_grad_(True)
    ref = _autograd_reference(s_ref, labels, temperature, kd_weight, **(
        dict(idx=idx, val=val) if sparse else dict(teacher=teacher)))
    ref[output].backward()
    for a, b in zip(got, ref):
        if kd_weight == 0 and b is ref[2]:
            continue  # CE only: kd is reported as 0, the teacher is never read
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-6)
    if not (kd_weight == 0 and output == 2):
        torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-5, atol=1e-7)
    assert (s.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("div,beta,alpha", [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1), ("jsd", 0.5, 0.1),
                                            ("jsd", 0.2, 0.1), ("skew_kl", 0.5, 0.1), ("skew_kl", 0.5, 0.4),
                                            ("skew_kl", 0.5, 0.0), ("tvd", 0.5, 0.1)])
def test_dense_divergences_match_reference(div, beta, alpha):
    student, teacher, labels = make(seed=3)
    temperature = 1.5
    keep = labels.reshape(-1) != -100
    p = F.softmax(teacher.reshape(-1, V)[keep].double() / temperature, -1)
    q = F.softmax(student.reshape(-1, V)[keep].double() / temperature, -1)
    expected = temperature**2 * reference(div, p, q, beta, alpha).mean()
    got = distillation_loss(student, labels, teacher_logits=teacher, temperature=temperature, kd_weight=1.0,
                            divergence=div, jsd_beta=beta, skew_alpha=alpha).kd
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_hand_computed_two_token_vocabulary():
    # Teacher p = (1/2, 1/2); student logits (2 ln 3, 0) at T = 2 give q = (3/4, 1/4).
    teacher = torch.tensor([[[0.0, 0.0]]])
    student = torch.tensor([[[2 * math.log(3.0), 0.0]]])
    labels = torch.tensor([[0]])
    by_hand = {
        "forward_kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),  # 0.5 ln(4/3)
        "reverse_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
        # m = (5/8, 3/8): 0.5 [0.5 ln(16/15)] + 0.5 [0.75 ln(6/5) + 0.25 ln(2/3)]
        "jsd": 0.5 * 0.5 * math.log(16 / 15) + 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)),
        # alpha = 0.1: mixture (0.725, 0.275)
        "skew_kl": 0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.5 / 0.275),
        "tvd": 0.25,
    }
    assert by_hand["forward_kl"] == pytest.approx(0.1438410, abs=1e-6)
    assert by_hand["jsd"] == pytest.approx(0.0338221, abs=1e-6)
    for div, value in by_hand.items():
        kd = kd_of(student, labels, 2.0, div, teacher_logits=teacher)
        assert kd.item() == pytest.approx(4.0 * value, rel=1e-5), div  # T^2 = 4
        idx = torch.tensor([[[1, 0]]])
        kd_sparse = kd_of(student, labels, 2.0, div, topk_indices=idx, topk_values=teacher.gather(-1, idx))
        assert kd_sparse.item() == pytest.approx(4.0 * value, rel=1e-5), div


def test_t_squared_keeps_gradient_scale_in_the_high_temperature_limit():
    # As T -> inf, p_T and q_T -> uniform and KL(p_T || q_T) -> Var_uniform(d) / (2 T^2),
    # d = student - teacher logits. So T^2 * KL -> 0.5 * mean((d - mean d)^2) and its
    # gradient wrt the student logits -> (d - mean d) / V: independent of T, with an
    # error that falls like 1/T. (Past T ~ 100 the fp32 KL, ~1e-5, drowns in rounding.)
    student, teacher, _ = make(seed=5, scale=1.0)
    student, teacher = student[0, :1], teacher[0, :1]  # one token (1, V)
    d = (student - teacher).double()
    centred = d - d.mean(-1, keepdim=True)
    limit_value, limit_grad = 0.5 * centred.pow(2).mean(), centred / V
    grad_errors, norms = [], []
    for temperature in (2.0, 8.0, 64.0):
        s = student.clone().requires_grad_(True)
        kd = kd_of(s[None], torch.zeros(1, 1, dtype=torch.long), temperature, teacher_logits=teacher[None])
        (grad,) = torch.autograd.grad(kd, s)
        norms.append(grad.norm().item())
        grad_errors.append(((grad.double() - limit_grad).norm() / limit_grad.norm()).item())
    assert kd.item() == pytest.approx(limit_value.item(), rel=1e-2)  # at T = 64
    assert grad_errors[2] < 2e-2 and grad_errors[0] > grad_errors[1] > grad_errors[2], grad_errors
    # With T^2 the gradient norm stays within a small factor of its limit at every T
    # (without it, it would shrink 1024x from T = 2 to T = 64).
    limit_norm = limit_grad.norm().item()
    assert all(0.5 * limit_norm < n < 2.0 * limit_norm for n in norms), (norms, limit_norm)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_identical_distributions_give_zero(div):
    _, teacher, labels = make()
    assert kd_of(teacher.clone(), labels, 2.0, div, teacher_logits=teacher).abs().item() < 1e-6
    teacher = teacher.half().float()  # exactly the fp16 values the sparse path gets
    idx, val = topk(teacher, V, shuffle=True)
    assert kd_of(teacher.clone(), labels, 2.0, div, topk_indices=idx, topk_values=val).abs().item() < 1e-5
    # Shift-invariance: the same distribution from logits + constant is still zero.
    assert kd_of(teacher + 3.0, labels, 2.0, div, teacher_logits=teacher).abs().item() < 1e-5


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, V])
def test_divergences_are_nonnegative_per_token(div, k):
    for seed in range(3):
        student, teacher, _ = make(seed=seed, scale=4.0)
        s, t = student.reshape(-1, V), teacher.reshape(-1, V)
        log_q_full = F.log_softmax(s, -1)
        val, idx = t.topk(k, -1)
        log_q = log_q_full.gather(-1, idx)
        tail = (1 - log_q.exp().sum(-1)).clamp(min=0)
        per_token = divergence_per_token(div, F.log_softmax(val, -1), log_q, tail, jsd_beta=0.3, skew_alpha=0.2)
        assert per_token.shape == (B * T,)
        assert (per_token >= -1e-6).all(), per_token.min()


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_positions_change_nothing(div, sparse):
    student, teacher, labels = make(seed=7)
    masked = labels == -100
    idx, val = topk(teacher, 4)

    def run(student, teacher, idx, val):
        s = student.clone().requires_grad_(True)
        targets = dict(topk_indices=idx, topk_values=val) if sparse else dict(teacher_logits=teacher)
        parts = distillation_loss(s, labels, temperature=2.0, kd_weight=0.5, divergence=div, **targets)
        parts.loss.backward()
        return parts, s.grad

    clean, grad = run(student, teacher, idx, val)
    # Garbage (inf, NaN, out-of-range ids) at masked positions must not leak in.
    student2, teacher2, idx2, val2 = student.clone(), teacher.clone(), idx.clone(), val.clone()
    student2[masked] = float("inf")
    teacher2[masked] = float("nan")
    idx2[masked] = 10**6
    val2[masked] = float("nan")
    dirty, grad2 = run(student2, teacher2, idx2, val2)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad[~masked], grad2[~masked])
    assert (grad2[masked] == 0).all()


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("sparse", [False, True])
def test_all_masked_batch_gives_finite_zero(div, sparse):
    student, teacher, _ = make()
    labels = torch.full((B, T), -100)
    idx, val = topk(teacher, 4)
    targets = dict(topk_indices=idx, topk_values=val) if sparse else dict(teacher_logits=teacher)
    s = student.clone().requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=2.0, kd_weight=0.5, divergence=div, **targets)
    parts.loss.backward()
    assert all(x.item() == 0.0 for x in parts)
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sparse_at_full_vocabulary_equals_dense(div, temperature):
    student, teacher, labels = make(seed=11)
    teacher = teacher.half().float()  # the sparse values are fp16: compare like with like
    idx, val = topk(teacher, V, shuffle=True)
    grads, kds = [], []
    for targets in (dict(teacher_logits=teacher), dict(topk_indices=idx, topk_values=val)):
        s = student.clone().requires_grad_(True)
        parts = distillation_loss(s, labels, temperature=temperature, kd_weight=0.7, divergence=div,
                                  jsd_beta=0.3, skew_alpha=0.2, **targets)
        parts.loss.backward()
        kds.append(parts.kd)
        grads.append(s.grad)
    torch.testing.assert_close(kds[1], kds[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_sparse_below_full_vocabulary_is_the_truncated_teacher(div):
    # The documented meaning for k < V: the divergence against p~ = softmax over the
    # teacher's top-k, zero elsewhere; reverse KL is the generalized KL on the kept set.
    student, teacher, labels = make(seed=13)
    k, temperature, beta, alpha = 3, 2.0, 0.3, 0.2
    idx, val = topk(teacher, k)
    keep = labels.reshape(-1) != -100
    i, v = idx.reshape(-1, k)[keep], val.reshape(-1, k)[keep].double()
    q = F.softmax(student.reshape(-1, V)[keep].double() / temperature, -1)
    p = torch.zeros_like(q).scatter(-1, i, F.softmax(v / temperature, -1))
    if div == "reverse_kl":
        q_s, p_s = q.gather(-1, i), p.gather(-1, i)
        expected = (q_s * (q_s / p_s).log() - q_s + p_s).sum(-1)
    else:
        expected = reference(div, p, q, beta, alpha)
    got = distillation_loss(student, labels, topk_indices=idx, topk_values=val, temperature=temperature,
                            kd_weight=1.0, divergence=div, jsd_beta=beta, skew_alpha=alpha).kd
    torch.testing.assert_close(got.double(), temperature**2 * expected.mean(), rtol=1e-5, atol=1e-6)


def test_kd_weight_zero_is_cross_entropy_and_never_reads_the_teacher():
    student, _, labels = make()
    parts = distillation_loss(student, labels, temperature=2.0, kd_weight=0.0)
    assert isinstance(parts, LossParts)
    torch.testing.assert_close(parts.loss, cross_entropy(student, labels))
    assert parts.kd.item() == 0.0 and parts.kd.dtype == torch.float32
    # A teacher of the wrong shape is not even looked at.
    distillation_loss(student, labels, teacher_logits=torch.zeros(1), temperature=2.0, kd_weight=0.0)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_kd_weight_one_is_distillation_and_weights_mix_linearly(div):
    student, teacher, labels = make()
    kw = dict(teacher_logits=teacher, temperature=3.0, divergence=div)
    full = distillation_loss(student, labels, kd_weight=1.0, **kw)
    assert full.loss.item() == full.kd.item() > 0
    mixed = distillation_loss(student, labels, kd_weight=0.25, **kw)
    torch.testing.assert_close(mixed.loss, 0.75 * mixed.ce + 0.25 * mixed.kd)
    torch.testing.assert_close(mixed.kd, full.kd)


def test_errors_are_clear():
    student, teacher, labels = make()
    with pytest.raises(ValueError, match="needs teacher targets"):
        distillation_loss(student, labels, temperature=2.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="tokenizer length"):
        distillation_loss(student, labels, teacher_logits=torch.randn(B, T, V + 5), temperature=2.0, kd_weight=0.5)
    idx, val = topk(teacher, 3)
    with pytest.raises(ValueError, match="tokenizer length"):
        distillation_loss(student[..., :5], labels.clamp(max=4), topk_indices=idx, topk_values=val,
                          temperature=2.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="not both"):
        distillation_loss(student, labels, teacher_logits=teacher, topk_indices=idx, topk_values=val,
                          temperature=2.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="both topk_indices and topk_values"):
        distillation_loss(student, labels, topk_indices=idx, temperature=2.0, kd_weight=0.5)
    with pytest.raises(ValueError, match="divergence='kl'.*forward_kl"):
        distillation_loss(student, labels, teacher_logits=teacher, temperature=2.0, kd_weight=0.5, divergence="kl")
    with pytest.raises(ValueError, match="temperature=0"):
        distillation_loss(student, labels, teacher_logits=teacher, temperature=0, kd_weight=0.5)
    with pytest.raises(ValueError, match="kd_weight=1.5"):
        distillation_loss(student, labels, teacher_logits=teacher, temperature=2.0, kd_weight=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
def test_low_precision_inputs_give_fp32_results(dtype, sparse):
    student, teacher, labels = make()
    student, teacher = student.to(dtype), teacher.to(dtype)
    idx, val = topk(teacher, 4)
    targets = dict(topk_indices=idx, topk_values=val.to(dtype)) if sparse else dict(teacher_logits=teacher)
    s = student.clone().requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=2.0, kd_weight=0.5, divergence="jsd", **targets)
    parts.loss.backward()
    assert all(x.dtype == torch.float32 for x in parts)
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()
    # The same rounded inputs in fp32 give the same numbers: the math runs in fp32.
    ref_targets = {key: (t.float() if t.is_floating_point() else t) for key, t in targets.items()}
    ref = distillation_loss(student.float(), labels, temperature=2.0, kd_weight=0.5, divergence="jsd",
                            **ref_targets)
    for a, b in zip(parts, ref):
        torch.testing.assert_close(a, b)


def test_topk_bench_writes_the_rows_and_compact_is_exact_at_k_plus_one_buckets(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "topk_exactness.py"
    spec = importlib.util.spec_from_file_location("topk_exactness", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "topk.json"
    bench.main(["--tokens", "16", "--vocabs", "64", "--ks", "4,63", "--temperatures", "1,4",
                "--extra-temperatures", "2.5", "--plain", "--json", str(out)])
    assert "dense" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * (1 + 4 * 2)  # per T: dense + (topk, compact, sampled, sampled_plain) x 2 k
    keys = {"vocab", "temperature", "k", "method", "bytes_per_token", "loss_rel_err", "grad_cos"}
    assert all(keys <= set(r) for r in rows)
    for r in rows:
        if r["method"] == "dense":
            assert r["loss_rel_err"] == 0 and r["grad_cos"] > 1 - 1e-9 and r["bytes_per_token"] == 128
        elif r["method"] in ("compact", "sampled", "sampled_plain") and r["k"] == 63 and r["on_grid"]:  # = dense
            assert r["loss_rel_err"] < 1e-5 and r["grad_cos"] > 1 - 1e-6 and r["grad_cos_mean"] > 1 - 1e-6, r
        elif r["method"] == "topk" and r["temperature"] == 4:
            assert r["loss_rel_err"] > 1e-3
    # The control variate changes the gradient only: both sampled methods estimate one value.
    loss = {(r["temperature"], r["k"], r["method"]): r["loss"] for r in rows}
    for (t, k, method), value in loss.items():
        if method == "sampled":
            assert value == pytest.approx(loss[t, k, "sampled_plain"], rel=1e-5)
