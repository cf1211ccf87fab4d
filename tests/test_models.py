"""Students built from teachers, initialisation from the teacher, vocab padding, tokenizers."""

from __future__ import annotations

import pytest
import torch

from factories import make_model, make_tokenizer, save_pretrained_pair
from kd.config import ConfigError, StudentConfig
from kd.models import build_student, check_same_tokenizer, load_pretrained, logits_for, student_config


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_student_shape_follows_spec_and_keeps_head_size(tok, arch):
    teacher = make_model(tok, arch, n_layer=4, n_embd=64, n_head=4)  # head size 16
    student = build_student(teacher, StudentConfig(n_layer=2, n_embd=32))
    c = student.config
    layers = c.n_layer if arch == "gpt2" else c.num_hidden_layers
    width = c.n_embd if arch == "gpt2" else c.hidden_size
    heads = c.n_head if arch == "gpt2" else c.num_attention_heads
    assert (layers, width, heads) == (2, 32, 2)
    assert c.vocab_size == teacher.config.vocab_size
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert n_s < n_t
    out = student(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, c.vocab_size)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_init_from_teacher_copies_embeddings_and_spaced_layers(tok, arch):
    teacher = make_model(tok, arch, n_layer=4, n_embd=32, n_head=2)
    student = build_student(teacher, StudentConfig(n_layer=2, n_embd=32, init="teacher"))
    t, s = teacher.state_dict(), student.state_dict()
    blocks = "transformer.h" if arch == "gpt2" else "model.layers"
    emb = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    assert torch.equal(s[emb], t[emb])
    # layers round(linspace(0, 3, 2)) = [0, 3]
    for s_idx, t_idx in ((0, 0), (1, 3)):
        for key in s:
            if key.startswith(f"{blocks}.{s_idx}."):
                assert torch.equal(s[key], t[key.replace(f"{blocks}.{s_idx}.", f"{blocks}.{t_idx}.")]), key
    random_student = build_student(teacher, StudentConfig(n_layer=2, n_embd=32))
    assert not torch.equal(random_student.state_dict()[emb], t[emb])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_init_from_teacher_narrower_takes_leading_heads_and_channels(tok, arch):
    teacher = make_model(tok, arch, n_layer=2, n_embd=64, n_head=4)  # head size 16
    student = build_student(teacher, StudentConfig(n_layer=2, n_embd=32, init="teacher"))  # 2 heads
    t, s = teacher.state_dict(), student.state_dict()
    if arch == "gpt2":
        assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"][:, :32])
        assert torch.equal(s["transformer.h.1.ln_1.weight"], t["transformer.h.1.ln_1.weight"][:32])
        qkv_t, qkv_s = t["transformer.h.1.attn.c_attn.weight"], s["transformer.h.1.attn.c_attn.weight"]
        for i in range(3):  # q, k and v each keep the first two heads (32 of 64 columns)
            assert torch.equal(qkv_s[:, 32 * i:32 * (i + 1)], qkv_t[:32, 64 * i:64 * i + 32])
        assert torch.equal(s["transformer.h.1.attn.c_attn.bias"][32:64], t["transformer.h.1.attn.c_attn.bias"][64:96])
        assert torch.equal(s["transformer.h.0.mlp.c_proj.weight"], t["transformer.h.0.mlp.c_proj.weight"][:128, :32])
    else:
        assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, :32])
        for name in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.1.self_attn.{name}.weight"
            assert torch.equal(s[key], t[key][:32, :32]), key
        key = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(s[key], t[key][:32, :s[key].shape[1]])
    random_student = build_student(teacher, StudentConfig(n_layer=2, n_embd=32))
    ids = torch.tensor([[1, 2, 3, 4]])
    for model in (student, random_student):  # a working model either way
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_init_from_teacher_refuses_a_wider_student_or_another_head_size(tok):
    teacher = make_model(tok, n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(ConfigError, match="student.n_embd=64 is not allowed with student.init=teacher"):
        build_student(teacher, StudentConfig(n_layer=1, n_embd=64, init="teacher"))
    with pytest.raises(ConfigError, match="student.n_embd=16 is not allowed with student.init=teacher"):
        build_student(teacher, StudentConfig(n_layer=1, n_embd=16, n_head=2, init="teacher"))


def test_width_not_divisible_by_heads(tok):
    teacher = make_model(tok, n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(ConfigError, match="student.n_embd=30 is not allowed"):
        student_config(teacher.config, StudentConfig(n_layer=1, n_embd=30, n_head=4))


def test_unsupported_family_is_a_clear_error(tok):
    class Cfg:
        model_type = "bert"

    with pytest.raises(ConfigError, match="teacher model_type='bert' is not allowed"):
        student_config(Cfg(), StudentConfig())


def test_logits_cut_to_tokenizer_length(tok):
    model = make_model(tok, vocab_pad=37).eval()  # no dropout: two passes must agree
    ids = torch.tensor([[1, 2, 3, 4]])
    full = model(input_ids=ids).logits
    cut = logits_for(model, ids, len(tok))
    assert full.shape[-1] == len(tok) + 37 and cut.shape[-1] == len(tok)
    assert torch.equal(cut, full[..., : len(tok)])


def test_load_pretrained_round_trip_uses_safetensors(tmp_path, tok):
    model = make_model(tok).eval()
    path = save_pretrained_pair(tmp_path / "m", tok, model)
    assert (path / "model.safetensors").exists()
    loaded, loaded_tok = load_pretrained(str(path))
    loaded.eval()
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert loaded_tok.get_vocab() == tok.get_vocab()


def test_tokenizer_mismatch_is_refused(tok):
    other = make_tokenizer(["completely different words here " * 3, "other text entirely"] * 10, vocab_size=280)
    check_same_tokenizer(tok, tok)
    with pytest.raises(ConfigError, match="student.source is not allowed: its tokenizer differs"):
        check_same_tokenizer(tok, other)
