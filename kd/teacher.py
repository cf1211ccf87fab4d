"""The teacher: loaded from a hub id or path, or trained by the project and cached.

Training the teacher is the first step of the method when no pretrained one fits (the
embedded world, or a user's own corpus). The result is cached under
``cache_dir()/teachers/<fingerprint>`` where the fingerprint (:func:`teacher_key`) covers
everything its weights depend on: the teacher's shape and schedule, the training settings
it shares with the student (weight decay, gradient clipping, precision resolved), the data
it learns from (by contents) and the tokenizer, so every trial of every sweep shares it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerBase

from kd.cache import building_dir, fingerprint
from kd.config import KDConfig, LossConfig, TrainConfig
from kd.data import Blocks, blocks_fingerprint, data_key, load_blocks
from kd.device import precisions_served
from kd.paths import cache_dir
from kd.train import train

#: Bump whenever the training recipe changes what the same key trains (it is in the key).
RECIPE_VERSION = 1
#: teacher.* fields that do not change a trained teacher's weights: where it comes from,
#: and the settings of its outputs (the soft labels: kd.soft_labels keys them), so that a
#: sweep over teacher.top_k or the grid shares one teacher.
NOT_WEIGHTS = ("source", "trust_remote_code", "mode", "top_k", "soft_labels_dir", "soft_label_format",
               "grid_min_temperature", "grid_max_temperature", "grid_points", "tail_samples",
               "proposal_temperature",
               # Keyed through the tokenizer it trains, which the blocks' fingerprint covers.
               "vocab_size",
               # Keyed as the training config's seed (teacher_train_config), where it was 0
               # before it could be set: a seed-0 teacher keeps its cache entry.
               "seed")
#: train.* fields the teacher's training shares with the student's that do not change its
#: weights: ``eval_blocks`` (only what its history reports), and three that change them only
#: by floating-point rounding (the same initialisation, data order and arithmetic), so a
#: teacher trained on a CPU head serves trials on GPUs. Left out of its key.
NOT_WEIGHTS_TRAIN = ("eval_blocks", "device", "threads", "compile")


def data_tokenizer(cfg: KDConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a project-trained teacher uses: the world's, or one trained on the data."""
    if cfg.data.source == "world":
        from kd.world import ensure_world

        return AutoTokenizer.from_pretrained(str(ensure_world(cfg.data.world_size, cfg.data.world_seed) / "tokenizer"))
    # A user's own corpus: train the same byte-level BPE the world uses on its training
    # split, cached by the data settings and the source's contents.
    key = {"kind": "trained_tokenizer", **data_key(cfg.data), "vocab": cfg.teacher.vocab_size}
    path = cache_dir() / "tokenizers" / fingerprint(key)
    if not _tokenizer_complete(path):
        from kd.data import load_texts
        from kd.world import train_tokenizer

        tok = train_tokenizer(load_texts(cfg.data)["train"], vocab_size=cfg.teacher.vocab_size)
        with building_dir(path, complete=_tokenizer_complete) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(str(path))


def _tokenizer_complete(path: Path) -> bool:
    return (path / "tokenizer.json").exists()


def _teacher_complete(path: Path) -> bool:
    return (path / "model.safetensors").exists()


def _model_config(cfg: KDConfig, tokenizer: PreTrainedTokenizerBase):
    t = cfg.teacher
    # Pad the LM head to a multiple of 64, as released checkpoints do for speed: the
    # training loop must then cut logits to the tokenizer's length (kd.models.logits_for).
    vocab = -(-len(tokenizer) // 64) * 64
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if t.arch == "gpt2":
        # No dropout: the teacher memorises a small fact base, where dropout only slows it.
        return GPT2Config(n_layer=t.n_layer, n_embd=t.n_embd, n_head=t.n_head, n_positions=max(256, cfg.data.block_size),
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return LlamaConfig(num_hidden_layers=t.n_layer, hidden_size=t.n_embd, num_attention_heads=t.n_head,
                       num_key_value_heads=t.n_head, intermediate_size=4 * t.n_embd,
                       max_position_embeddings=max(256, cfg.data.block_size), **common)


def teacher_train_config(cfg: KDConfig, precision: str | None = None) -> TrainConfig:
    """The training settings of a teacher the project trains: the student's, with the
    teacher's schedule, and ``precision`` (resolved, in :func:`ensure_teacher`) if given."""
    t = cfg.teacher
    return replace(cfg.train, steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                   warmup_steps=max(1, t.steps // 20), eval_every=max(1, t.steps // 4),
                   precision=precision or cfg.train.precision)


def teacher_key(cfg: KDConfig, tokenizer: PreTrainedTokenizerBase, precision: str) -> dict[str, Any]:
    """Everything a trained teacher's weights depend on, with ``precision`` resolved.

    Every teacher.* field but :data:`NOT_WEIGHTS`, every field of the training config it
    runs with (:func:`teacher_train_config`: weight decay, gradient clipping, ...) but
    :data:`NOT_WEIGHTS_TRAIN`, the packed blocks (data settings, the source's
    contents, the tokenizer) and the recipe's version. New fields are keyed by default.
    """
    teacher = {k: v for k, v in asdict(cfg.teacher).items() if k not in NOT_WEIGHTS}
    train_cfg = {k: v for k, v in asdict(teacher_train_config(cfg, precision)).items() if k not in NOT_WEIGHTS_TRAIN}
    return {"kind": "teacher", "recipe": RECIPE_VERSION, "teacher": teacher, "train": train_cfg,
            "blocks": blocks_fingerprint(cfg.data, tokenizer)}


def teacher_fingerprint(cfg: KDConfig, tokenizer: PreTrainedTokenizerBase, precision: str | None = None) -> str:
    """The directory name of a trained teacher (``precision`` resolved here unless given)."""
    return fingerprint(teacher_key(cfg, tokenizer, precision or precisions_served(cfg.train.device,
                                                                                  cfg.train.precision)[0]))


def ensure_teacher(cfg: KDConfig, *, progress: bool = False, blocks: Blocks | None = None) -> str:
    """A hub id or directory to load the teacher from, training and caching it if needed."""
    if cfg.teacher.source != "train":
        return cfg.teacher.source
    tokenizer = data_tokenizer(cfg)
    # The entry of the precision this machine resolves to, else (train.precision=auto) one
    # another machine built: kd.device.precisions_served.
    served = precisions_served(cfg.train.device, cfg.train.precision)
    keys = {p: teacher_key(cfg, tokenizer, p) for p in served}
    for key in keys.values():
        path = cache_dir() / "teachers" / fingerprint(key)
        if _teacher_complete(path):
            return str(path)
    precision = served[0]
    path = cache_dir() / "teachers" / fingerprint(keys[precision])
    from transformers import AutoModelForCausalLM

    blocks = blocks or load_blocks(cfg.data, tokenizer)
    torch.manual_seed(cfg.teacher.seed)
    model = AutoModelForCausalLM.from_config(_model_config(cfg, tokenizer))
    if progress:
        print(f"training the teacher ({cfg.teacher.arch} {cfg.teacher.n_layer}x{cfg.teacher.n_embd}, "
              f"{cfg.teacher.steps} steps, {precision}) -> {path}", flush=True)
    history: list[dict] = []
    train(model, blocks.train, blocks.val, n_vocab=len(tokenizer), loss_cfg=LossConfig(kd_weight=0.0),
          cfg=teacher_train_config(cfg, precision), report=lambda m, _c: history.append(m), progress=progress)
    with building_dir(path, complete=_teacher_complete) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "teacher.json").write_text(json.dumps({"key": keys[precision], "history": history}, indent=1))
    return str(path)
