"""The compact cache end to end on a 32k-vocabulary teacher (random init, save_pretrained,
a tokenizer with 32,768 real entries): built by kd.soft_labels, read back by a trial,
and its loss at T=4 equal to the (k + 1)-bucket loss from the teacher's dense logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.config import ConfigError, load_config
from kd.data import load_blocks
from kd.losses import distillation_loss
from kd.soft_labels import check_temperatures, ensure_soft_labels, resolve_format

VOCAB = 32_768


@pytest.fixture(scope="module")
def big_teacher(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from kd.world import ensure_world

    root = tmp_path_factory.mktemp("big")
    world = ensure_world("tiny")
    words = sorted({w for f in world.glob("*.jsonl") for w in f.read_text().split()})
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in words + [f"filler{i}" for i in range(VOCAB)]:
        if len(vocab) < VOCAB:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")
    assert len(fast) == VOCAB
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # a peaked, LM-like head: random init alone is near-uniform
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    return root


def _cfg(root, **extra):
    over = {"data.world_size": "tiny", "data.block_size": 32, "data.max_blocks": 6,
            "teacher.source": str(root / "teacher"), "student.n_layer": 1, "student.n_embd": 16,
            "train.steps": 2, "train.eval_every": 2, "train.eval_blocks": 2, "train.batch_size": 2,
            "train.warmup_steps": 1, "train.threads": 2, "train.precision": "fp32", "train.device": "cpu",
            "train.compile": "false", "teacher.mode": "cache", "loss.kd_weight": 1.0, "loss.temperature": 4.0,
            "teacher.top_k": 32, "teacher.soft_labels_dir": str(root / "soft"), "output_dir": str(root / "run"), **extra}
    return load_config(overrides=over)


def _buckets(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    head = x.gather(-1, idx)
    return torch.cat([head, (x.sum(-1) - head.sum(-1)).clamp(min=0)[:, None]], -1)


def test_compact_cache_on_a_32k_teacher_gives_the_bucket_loss(big_teacher):
    from kd.models import load_pretrained

    cfg = _cfg(big_teacher, **{"teacher.tail_samples": 0})
    teacher, tok = load_pretrained(cfg.teacher.source)
    assert resolve_format(cfg, len(tok)) == ("compact", 32)
    blocks = load_blocks(cfg.data, tok)
    labels = ensure_soft_labels(cfg, cfg.teacher.source, tok, blocks.train)
    m = labels.manifest
    assert labels.compact and m["layout"] == "compact" and m["index_dtype"] == "int16" and len(m["betas"]) == 9
    n = len(blocks.train)
    batch = {"input_ids": blocks.train[:, :-1], "labels": blocks.train[:, 1:], "block_index": torch.arange(n)}
    targets = labels.teacher_fn()(batch)
    with torch.no_grad():
        dense = teacher.eval()(batch["input_ids"]).logits[..., :VOCAB].half().double()
    torch.manual_seed(1)
    student = dense.float() * 0.5 + torch.randn(dense.shape)
    got = distillation_loss(student, batch["labels"], temperature=4.0, kd_weight=1.0, **targets).kd
    # Reference: the (k + 1)-bucket forward KL from the dense logits, fp64.
    keep = batch["labels"].reshape(-1) != -100
    idx = targets["topk_indices"].reshape(-1, 32).long()[keep]
    p = F.softmax(dense.reshape(-1, VOCAB)[keep] / 4.0, -1)
    q = F.softmax(student.double().reshape(-1, VOCAB)[keep] / 4.0, -1)
    pb, qb = _buckets(p, idx), _buckets(q, idx)
    expected = 16.0 * (torch.xlogy(pb, pb) - torch.xlogy(pb, qb)).sum(-1).mean()
    assert pb[:, -1].mean() > 0.05  # a real tail at T=4: the bucket matters
    assert abs(got.double() - expected) / expected < 1e-4, (got, expected)
    # A trial distills from it (the teacher is not run: its tail comes from the cache).
    from kd.run import distill

    metrics = distill(cfg, evaluate=False)
    assert math.isfinite(metrics["kd_loss"]) and metrics["kd_loss"] > 0


def test_the_sampled_tail_through_the_cache_estimates_the_dense_loss(big_teacher):
    """The default compact cache keeps 64 tail draws per token: its loss at T = 4 is close
    to the dense teacher's (the buckets alone are not), and rebuilding it draws the same ids."""
    from kd.models import load_pretrained

    cfg = _cfg(big_teacher)
    teacher, tok = load_pretrained(cfg.teacher.source)
    blocks = load_blocks(cfg.data, tok)
    labels = ensure_soft_labels(cfg, cfg.teacher.source, tok, blocks.train)
    m = labels.manifest
    assert m["tail_samples"] == 64 and m["proposal_temperature"] == 4.0 and m["key"]["tail_samples"] == 64
    n = len(blocks.train)
    batch = {"input_ids": blocks.train[:, :-1], "labels": blocks.train[:, 1:], "block_index": torch.arange(n)}
    targets = labels.teacher_fn()(batch)
    assert targets["tail_sample_indices"].shape == (n, blocks.train.shape[1] - 1, 64)
    head = targets["topk_indices"].long()
    assert not (targets["tail_sample_indices"].long().unsqueeze(-1) == head.unsqueeze(-2)).any()  # tail only
    with torch.no_grad():
        dense = teacher.eval()(batch["input_ids"]).logits[..., :VOCAB].half().float()
    torch.manual_seed(1)
    student = dense * 0.5 + torch.randn(dense.shape)
    kw = dict(temperature=4.0, kd_weight=1.0)
    full = distillation_loss(student, batch["labels"], teacher_logits=dense, **kw).kd
    sampled = distillation_loss(student, batch["labels"], **kw, **targets).kd
    buckets = distillation_loss(student, batch["labels"], **kw, **{
        k: v for k, v in targets.items() if k not in ("tail_sample_indices", "tail_sample_values",
                                                      "proposal_temperature")}).kd
    assert abs(sampled / full - 1) < 0.05, (sampled, full)
    assert abs(buckets / full - 1) > 0.3, (buckets, full)
    # Rebuilt from scratch (another directory), the draws are the same: seeded per block.
    again = ensure_soft_labels(_cfg(big_teacher, **{"teacher.soft_labels_dir": str(big_teacher / "soft2")}),
                               cfg.teacher.source, tok, blocks.train)
    assert np.array_equal(again.lookup_samples(np.arange(n))[0], labels.lookup_samples(np.arange(n))[0])


def test_temperatures_outside_the_grid_are_refused_in_one_line(big_teacher):
    cfg = _cfg(big_teacher)
    check_temperatures(cfg, 0.5, 8.0, VOCAB)
    with pytest.raises(ConfigError) as e:
        check_temperatures(cfg, 1.0, 16.0, VOCAB)
    assert "[1, 16] is not allowed" in str(e.value) and "\n" not in str(e.value)
    assert "widen teacher.grid_min_temperature/teacher.grid_max_temperature" in str(e.value)
    wide = _cfg(big_teacher, **{"teacher.grid_max_temperature": 16.0})  # the moved grid keys are what it reads
    check_temperatures(wide, 1.0, 16.0, VOCAB)
    check_temperatures(_cfg(big_teacher, **{"teacher.soft_label_format": "dense"}), 0.1, 50.0, VOCAB)  # dense: any T
    with pytest.raises(ConfigError, match="loss.temperature=20.0 is not allowed: must be in the compact"):
        _cfg(big_teacher, **{"teacher.soft_label_format": "compact", "loss.temperature": 20.0})
    with pytest.raises(ConfigError, match="teacher.grid_points=1 is not allowed"):
        _cfg(big_teacher, **{"teacher.grid_points": 1})
    with pytest.raises(ConfigError, match="teacher.soft_label_format='sparse' is not allowed"):
        _cfg(big_teacher, **{"teacher.soft_label_format": "sparse"})


def test_auto_format_follows_the_vocabulary(big_teacher):
    cfg = _cfg(big_teacher, **{"teacher.top_k": 0})
    assert resolve_format(cfg, 2048) == ("dense", 2048)
    assert resolve_format(cfg, 8192) == ("dense", 8192)
    assert resolve_format(cfg, 32000) == ("compact", 64)
    assert resolve_format(_cfg(big_teacher, **{"teacher.soft_label_format": "topk"}), 32000) == ("topk", 32)
    assert np.iinfo(np.int16).max + 1 == VOCAB  # int16 ids reach exactly this vocabulary


@pytest.mark.parametrize("vocab", [70_000, 140_000])
def test_cache_keeps_token_ids_past_int16_and_17_bits(tmp_path, vocab):
    from kd.compact import compress, temperature_grid
    from kd.soft_labels import load_soft_labels, write_cache

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * 3, vocab, generator=g)
    logits[:, -5:] += 30.0  # the largest logits sit at the last ids
    betas = temperature_grid(0.5, 8.0, 3)
    values, idx, lse, slope = compress(logits, 8, betas)
    batch = {"block_index": np.arange(2), "topk_values": values.reshape(2, 3, 8).numpy(),
             "topk_indices": idx.reshape(2, 3, 8).numpy().astype(np.int32),
             "tail_lse": lse.reshape(2, 3, 3).numpy(), "tail_slope": slope.reshape(2, 3, 3).numpy()}
    key = {"test": vocab, "layout": "compact", "betas": list(betas)}
    from kd.cache import fingerprint

    path = write_cache(tmp_path / fingerprint(key), key, [batch], n_blocks=2, n_vocab=vocab)
    labels = load_soft_labels(path, key)
    assert labels.manifest["index_dtype"] == "int32" and labels.compact
    assert int(labels.indices.max()) == vocab - 1 and int(labels.indices[..., :5].min()) >= vocab - 5
    fn = labels.teacher_fn()({"input_ids": torch.zeros(2, 3, dtype=torch.long), "block_index": torch.arange(2)})
    torch.testing.assert_close(fn["topk_tail_lse"], torch.from_numpy(batch["tail_lse"]))
    assert fn["tail_betas"] == betas
