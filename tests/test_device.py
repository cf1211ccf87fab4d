"""kd.device: the faster attention kernel for short blocks on a CPU (the same attention,
not saved with the model), and inductor's kernels cached under the project's cache."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kd.device import CPU_EAGER_ATTENTION_MAX_LEN, use_fast_attention

CPU = torch.device("cpu")


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=512, n_embd=64, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0)).eval()


@pytest.mark.parametrize("build", [_gpt2, _llama])
def test_short_blocks_on_cpu_switch_to_eager_with_equal_logits_and_gradients(build):
    x = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    model = build()
    assert model.config._attn_implementation == "sdpa"
    before = model(input_ids=x).logits
    before.logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert use_fast_attention(model, CPU, 127) == "eager"
    assert model.config._attn_implementation == "eager"
    after = model(input_ids=x).logits
    after.logsumexp(-1).mean().backward()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_long_blocks_and_other_choices_are_left_alone():
    model = _gpt2()
    assert use_fast_attention(model, CPU, CPU_EAGER_ATTENTION_MAX_LEN + 1) == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert use_fast_attention(model, torch.device("cuda"), 127) == "sdpa"  # GPUs keep their fused kernels
    model.set_attn_implementation("eager")  # a user's own choice is not overridden
    assert use_fast_attention(model, CPU, 10_000) == "eager"
    assert use_fast_attention(torch.nn.Linear(2, 2), CPU, 127) == "None"  # not a transformers model


def test_the_choice_is_not_saved_with_the_model(tmp_path):
    model = _gpt2()
    use_fast_attention(model, CPU, 127)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "eager" not in json.dumps(config)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_compiled_kernels_land_in_the_project_cache_after_torch_chose_its_own(tmp_path):
    # A fresh process as a user starts it: no TORCHINDUCTOR_CACHE_DIR, and torch._dynamo
    # imported first (transformers does), which writes inductor's /tmp fallback into the
    # variable; a compile must still write its kernels under the project's cache.
    script = (
        "import os, torch, torch._dynamo\n"
        "assert os.environ['TORCHINDUCTOR_CACHE_DIR'] != os.environ['KD_CACHE_DIR']\n"
        "from kd.step import compiled\n"
        "fn = compiled(lambda x, y, t: (x * 2 + y).sum())\n"
        "print(float(fn(torch.ones(4), torch.ones(4), {})), os.environ['TORCHINDUCTOR_CACHE_DIR'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["KD_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    value, used = out.stdout.split()
    assert float(value) == 12.0 and used == str(tmp_path / "inductor")
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*"))  # kernels written there


def test_a_users_own_inductor_cache_wins(tmp_path, monkeypatch):
    from kd.device import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == str(tmp_path / "mine")
