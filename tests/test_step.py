"""The training step: temperature and loss weight as runtime inputs of one compiled graph."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kd.config import LossConfig
from kd.losses import distillation_loss
from kd.step import step_loss

CPU = torch.device("cpu")


def _loss_and_grad(student, labels, temperature, kd_weight, **targets):
    s = student.clone().requires_grad_(True)
    parts = distillation_loss(s, labels, temperature=temperature, kd_weight=kd_weight, chunk_tokens=0, **targets)
    parts.loss.backward()
    return torch.stack([p.detach() for p in parts]), s.grad


@pytest.mark.parametrize("temperature,kd_weight", [(2.5, 0.3), (1.0, 0.5), (4.0, 1.0), (0.7, 0.0)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("sparse", [False, True])
def test_tensor_scalars_give_the_float_values_and_gradients(temperature, kd_weight, divergence, sparse):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = -100
    if sparse:
        values, indices = teacher.topk(4, dim=-1)
        targets = {"topk_indices": indices, "topk_values": values}
    else:
        targets = {"teacher_logits": teacher}
    extra = {"divergence": divergence}
    want, want_grad = _loss_and_grad(student, labels, temperature, kd_weight, **targets, **extra)
    # A tensor kd_weight is taken as above 0 (documented): CE alone keeps the float 0.
    weight = torch.tensor(kd_weight, dtype=torch.float64) if kd_weight else kd_weight
    got, got_grad = _loss_and_grad(student, labels, torch.tensor(temperature, dtype=torch.float64), weight,
                                   **targets, **extra)
    # The loss runs in fp32 either way (a Python float meets fp32 tensors as an fp32 scalar).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)


def test_a_tensor_temperature_is_refused_with_the_compact_tail():
    student, labels = torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.long)
    values, indices = torch.randn(1, 3, 2), torch.zeros(1, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature as a tensor is not allowed with topk_tail_lse"):
        distillation_loss(student, labels, topk_indices=indices, topk_values=values,
                          topk_tail_lse=torch.zeros(1, 3, 2), tail_betas=(0.5, 1.0),
                          temperature=torch.tensor(2.0), kd_weight=0.5)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _tiny_step_inputs() -> tuple[GPT2LMHeadModel, torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return _tiny_gpt2(), ids, {"teacher_logits": torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))}


def test_one_compiled_graph_serves_every_temperature():
    # Each trial of a temperature sweep builds its step anew (and resets dynamo); with the
    # temperature a runtime input, the second temperature's graph is inductor's cached one
    # instead of a fresh compile of every kernel, and the values are the eager step's.
    from torch._dynamo.utils import counters

    model, ids, targets = _tiny_step_inputs()
    misses, hits = [], []
    for temperature in (2.0, 3.0):
        cfg = LossConfig(temperature=temperature, kd_weight=0.5)
        miss, hit = counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]
        got = step_loss(model, 64, cfg, CPU, "fp32", compile=True)(ids, ids, targets)
        misses.append(counters["inductor"]["fxgraph_cache_miss"] - miss)
        hits.append(counters["inductor"]["fxgraph_cache_hit"] - hit)
        want = step_loss(model, 64, cfg, CPU, "fp32")(ids, ids, targets)
        torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)), rtol=1e-5, atol=1e-6)
    # Served from the cache, not merely uncounted (a disabled cache would count neither).
    assert misses[1] == 0 and hits[1] >= 1, (misses, hits)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_new_process_step_is_served_from_the_aot_cache(precision):
    # A sweep's trials each compile the step anew (kd.step.compiled resets dynamo, as a new
    # trial process starts without its graphs). The second build must come from
    # AOTAutograd's on-disk cache, not trace and partition forward + backward again: torch
    # bypasses that cache for a graph with an autocast region (bf16) or a custom autograd
    # Function (the fused loss) unless the step marks them cacheable.
    from torch._dynamo.utils import counters

    model, ids, targets = _tiny_step_inputs()
    cfg = LossConfig(temperature=2.0, kd_weight=0.5)
    seen = []
    for _ in range(2):
        before = dict(counters["aot_autograd"])
        parts = step_loss(model, 64, cfg, CPU, precision, compile=True)(ids, ids, targets)
        parts.loss.backward()
        seen.append({k: counters["aot_autograd"][k] - before.get(k, 0)
                     for k in ("autograd_cache_bypass", "autograd_cache_hit")})
    assert seen[0]["autograd_cache_bypass"] == 0 and seen[1] == {"autograd_cache_bypass": 0, "autograd_cache_hit": 1}, seen
