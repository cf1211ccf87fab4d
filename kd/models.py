"""Load a teacher, build a student from it, and keep their vocabularies honest.

Teachers come from a hub id or a local ``save_pretrained`` directory through
``AutoModelForCausalLM`` (weights from safetensors; ``trust_remote_code`` only when asked),
or are trained on the embedded world by :mod:`kd.teacher`. A student is the teacher's
config with depth and width overridden (GPT-2 and Llama families), initialised at random
or from the teacher's embeddings and evenly spaced layers (narrower students take the
leading slice of every weight: whole heads, the first residual and MLP channels).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kd.config import ConfigError, StudentConfig

# Per family: the config fields for depth, width, heads, MLP width, and where the layers sit.
_FAMILIES: dict[str, dict[str, str]] = {
    "gpt2": {"layers": "n_layer", "width": "n_embd", "heads": "n_head", "inner": "n_inner",
             "blocks": "transformer.h", "fused_qkv": "attn.c_attn."},
    "llama": {"layers": "num_hidden_layers", "width": "hidden_size", "heads": "num_attention_heads",
              "inner": "intermediate_size", "blocks": "model.layers"},
}
# Families that share Llama's layout closely enough for the same surgery.
_ALIASES = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama"}


def family(config: Any) -> str:
    """The supported family of a transformers config, or a clear error."""
    kind = _ALIASES.get(config.model_type, config.model_type)
    if kind not in _FAMILIES:
        raise ConfigError(
            f"teacher model_type={config.model_type!r} is not allowed: students can be built from "
            f"{', '.join(sorted([*_FAMILIES, *_ALIASES]))} models"
        )
    return kind


def load_pretrained(source: str, *, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Weights load from safetensors only (``use_safetensors=True``): a pickle checkpoint is
    refused rather than unpickled. A path that is not a folder raises FileNotFoundError at
    once; with the hub out of reach, hub lookups run offline (they fail at once, not after
    retries).
    """
    _before_hub(source)
    model = AutoModelForCausalLM.from_pretrained(
        source, trust_remote_code=trust_remote_code, use_safetensors=True, dtype=torch.float32
    )
    return model, load_tokenizer(source, trust_remote_code=trust_remote_code)


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local directory alone, with a pad token."""
    _before_hub(source)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; batching needs one and eos is the
        # conventional stand-in (padded positions are masked anyway).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _before_hub(source: str | Path) -> None:
    """A clear path that is no folder fails here, in one line; a name that is not a local
    folder is a hub id, looked up offline when the hub cannot be reached (kd.hub)."""
    from kd import hub

    source = str(source)  # callers pass the cached teacher's folder as a Path
    hub.check_local_folder(source)
    if not Path(source).expanduser().exists():
        hub.offline_unless_reachable()


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def student_config(teacher_config: Any, spec: StudentConfig) -> Any:
    """The teacher's config with the student's depth, width and heads.

    ``spec.n_head == 0`` keeps the teacher's head size; the MLP keeps the teacher's ratio
    of inner width to model width.
    """
    names = _FAMILIES[family(teacher_config)]
    cfg = copy.deepcopy(teacher_config)
    t_width = getattr(teacher_config, names["width"])
    t_heads = getattr(teacher_config, names["heads"])
    head_dim = t_width // t_heads
    heads = spec.n_head or max(1, spec.n_embd // head_dim)
    if spec.n_embd % heads:
        raise ConfigError(f"student.n_embd={spec.n_embd} is not allowed: must be divisible by the "
                          f"number of heads {heads} (set student.n_head)")
    setattr(cfg, names["layers"], spec.n_layer)
    setattr(cfg, names["width"], spec.n_embd)
    setattr(cfg, names["heads"], heads)
    t_inner = getattr(teacher_config, names["inner"], None)
    if t_inner:
        setattr(cfg, names["inner"], int(round(t_inner * spec.n_embd / t_width)))
    if hasattr(cfg, "num_key_value_heads") and getattr(teacher_config, "num_key_value_heads", None):
        group = max(1, t_heads // teacher_config.num_key_value_heads)
        cfg.num_key_value_heads = max(1, heads // group) if heads % group == 0 else heads
    if hasattr(cfg, "head_dim") and getattr(cfg, "head_dim", None):
        cfg.head_dim = spec.n_embd // heads
    return cfg


def build_student(teacher: PreTrainedModel, spec: StudentConfig, *, seed: int = 0) -> PreTrainedModel:
    """A student of the teacher's family with ``spec``'s depth and width.

    ``spec.init == "teacher"`` copies the embeddings, the final norm, an untied LM head
    and evenly spaced transformer layers (``round(linspace(0, L_t - 1, L_s))``), as
    DistilBERT/DistilGPT2 did. A narrower student (same head size) gets the leading slice
    of every weight along each dimension that shrinks: its heads are the teacher's first
    heads, its residual and MLP channels the first ones, consistently in every layer, so
    the residual stream still lines up (the "weight selection" of Xu et al., 2024,
    "Initializing Models with Larger Ones").
    """
    cfg = student_config(teacher.config, spec)
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if spec.init == "teacher":
        _copy_from_teacher(student, teacher)
    return student


def _leading(t: torch.Tensor, shape: torch.Size, fused_dim: int | None) -> torch.Tensor:
    """The leading slice of ``t`` with ``shape``; along ``fused_dim`` (GPT-2's q|k|v) per third."""
    for dim, n in enumerate(shape):
        if t.shape[dim] == n:
            continue
        if dim == fused_dim:
            t = torch.cat([c.narrow(dim, 0, n // 3) for c in t.chunk(3, dim)], dim)
        else:
            t = t.narrow(dim, 0, n)
    return t


def _copy_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    names = _FAMILIES[family(teacher.config)]
    s_width = getattr(student.config, names["width"])
    t_width = getattr(teacher.config, names["width"])
    s_head = s_width // getattr(student.config, names["heads"])
    t_head = t_width // getattr(teacher.config, names["heads"])
    if s_width > t_width or s_head != t_head:
        raise ConfigError(f"student.n_embd={s_width} is not allowed with student.init=teacher: it must be at "
                          f"most the teacher's width {t_width}, with the teacher's head size {t_head}")
    s_blocks, t_blocks = _get(student, names["blocks"]), _get(teacher, names["blocks"])
    picks = torch.linspace(0, len(t_blocks) - 1, len(s_blocks)).round().long().tolist()
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    prefix = names["blocks"] + "."
    fused = names.get("fused_qkv")
    new_state = {}
    for key, target in s_state.items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            src = f"{prefix}{picks[int(idx)]}.{rest}"
        else:
            src = key  # embeddings, final norm, lm_head
        if src not in t_state or t_state[src].dim() != target.dim():
            continue
        # GPT-2's Conv1D keeps q|k|v side by side in its last dimension (weight and bias)
        fused_dim = target.dim() - 1 if fused and fused in key else None
        if all(t >= s for t, s in zip(t_state[src].shape, target.shape)):
            new_state[key] = _leading(t_state[src], target.shape, fused_dim).clone()
    student.load_state_dict(new_state, strict=False)
    if student.config.tie_word_embeddings:
        student.tie_weights()


def vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """The number of real token ids: logits beyond it are padding rows of the LM head."""
    return len(tokenizer)


def check_same_tokenizer(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                         *, key: str = "student.source") -> None:
    """Raise unless both tokenizers map every string to the same ids.

    Distillation compares distributions position by position and id by id; different
    vocabularies make that comparison meaningless rather than merely worse.
    """
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        a, b = len(teacher_tok), len(student_tok)
        raise ConfigError(
            f"{key} is not allowed: its tokenizer differs from the teacher's "
            f"({b} vs {a} tokens); teacher and student must share one tokenizer"
        )
    if teacher_tok.eos_token != student_tok.eos_token:
        raise ConfigError(f"{key} is not allowed: eos token {student_tok.eos_token!r} differs from "
                          f"the teacher's {teacher_tok.eos_token!r}")


def logits_for(model: torch.nn.Module, input_ids: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Forward pass returning logits cut to the tokenizer's length.

    Many checkpoints pad the LM head (e.g. to a multiple of 64); those rows are not real
    tokens, and leaving them in would put probability mass on ids the data never has.
    Shape: ``(B, T) -> (B, T, n_vocab)``.
    """
    # No KV cache: nothing here decodes token by token, so building one is wasted work.
    logits = model(input_ids=input_ids, use_cache=False).logits
    return logits[..., :n_vocab]
