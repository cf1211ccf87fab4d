"""Size and speed measurement on tiny models made here."""

from __future__ import annotations

import pytest
import torch

from kd import measure
from kd.metrics import METRICS
from test_evaluate import tiny_model, tiny_tokenizer


def _matmul_weights(model) -> int:
    """Weights of every 2-D matmul inside the transformer blocks (not embeddings, not lm_head)."""
    total = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and (".h." in name or ".layers." in name):
            total += p.numel()
    return total


def test_count_params_gpt2_tied():
    model = tiny_model("gpt2")
    counts = measure.count_params(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: counted once
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert counts["params_non_embedding"] == counts["params"] - emb


def test_count_params_llama_untied_lm_head_is_non_embedding():
    model = tiny_model("llama")
    counts = measure.count_params(model)
    emb = model.model.embed_tokens.weight.numel()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert counts["params_non_embedding"] == counts["params"] - emb
    assert counts["params_non_embedding"] > _matmul_weights(model) + model.lm_head.weight.numel() - 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_size_mb_equals_saved_safetensors(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    on_disk = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert measure.size_mb(model) * 1e6 == pytest.approx(on_disk, abs=0.5)  # byte-exact
    # tied weights are stored once: the file is much smaller than params * 4 bytes twice
    if arch == "gpt2":
        assert on_disk < 4 * (measure.count_params(model)["params"] + model.lm_head.weight.numel())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flops_per_token_formula(arch):
    model = tiny_model(arch)
    cfg = model.config
    d, n_layer, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    n_ctx = 64
    expected = 2 * _matmul_weights(model) + 2 * n_layer * n_ctx * d + 2 * d * vocab
    assert measure.flops_per_token(cfg, n_ctx=n_ctx) == expected
    assert measure.flops_per_token(cfg) == expected  # n_ctx defaults to the context length (64)


def test_flops_unknown_config_says_what_is_missing():
    with pytest.raises(ValueError, match="flops_per_token knows GPT-2 and Llama"):
        measure.flops_per_token(type("Cfg", (), {"model_type": "mystery"})())


def test_latency_and_measure_model_keys():
    tok, model = tiny_tokenizer(), tiny_model("gpt2")
    model.train()
    before = torch.get_num_threads()
    res = measure.measure_model(model, tok, prompt_len=8, new_tokens=4, repeats=2, warmup=1)
    assert set(res) == {"params", "params_non_embedding", "size_mb", "flops_per_token",
                        "latency_ms_per_token", "prefill_tokens_per_s"}
    assert set(res) <= set(METRICS)
    assert res["latency_ms_per_token"] > 0 and res["prefill_tokens_per_s"] > 0
    assert torch.get_num_threads() == before and model.training  # settings restored


def test_latency_rejects_a_prompt_longer_than_the_context():
    with pytest.raises(ValueError, match="prompt_len"):
        measure.latency(tiny_model("gpt2", n_positions=16), prompt_len=12, new_tokens=8)
    # measure_model shrinks its defaults (32 + 32 tokens) to fit a short context instead
    res = measure.measure_model(tiny_model("gpt2", n_positions=16), repeats=1, warmup=0)
    assert res["latency_ms_per_token"] > 0



def test_latency_pass_times_each_shape_with_interleaved_repeats():
    """kd.sweep.latency: one figure per model, the repeats interleaved, a deeper model slower."""
    from factories import make_model, make_tokenizer

    from kd.sweep.latency import time_models

    tok = make_tokenizer()
    models = {"1x32": (make_model(tok, n_layer=1, n_embd=32), tok),
              "8x64": (make_model(tok, n_layer=8, n_embd=64), tok)}
    figures = time_models(models, repeats=5)
    assert set(figures) == {"1x32", "8x64"}
    for f in figures.values():
        assert f["runs"] == 5 and f["median"] > 0 and f["std"] >= 0 and f["cv"] == pytest.approx(f["std"] / f["median"])
    assert figures["8x64"]["median"] > figures["1x32"]["median"]
