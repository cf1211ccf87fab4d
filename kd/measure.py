"""Size and speed of a model: parameters, bytes, analytic FLOPs per token, decode latency.

Names are those of :mod:`kd.metrics`. Latency is timed honestly: a fixed thread count,
warm-up runs first, the median of several repeats, batch 1, greedy decoding with the
KV cache (what a user of the student waits for).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import struct
import time
from collections.abc import Iterator
from typing import Any

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """``params`` (every distinct parameter) and ``params_non_embedding``.

    Non-embedding excludes every ``nn.Embedding`` table (token and learned position
    embeddings). A tied lm_head shares the token table and is counted once (in the
    embedding); an untied lm_head is a matmul on every token and counts as non-embedding.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb_ids: set[int] = set()
    emb = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Embedding) and id(mod.weight) not in emb_ids:
            emb_ids.add(id(mod.weight))
            emb += mod.weight.numel()
    return {"params": total, "params_non_embedding": total - emb}


def _saved_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict ``save_pretrained`` writes: persistent entries, each storage once."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied weights (lm_head.weight is wte.weight): saved once
            continue
        seen.add(key)
        out[name] = t
    return out


def size_mb(model: torch.nn.Module) -> float:
    """Bytes of the model's safetensors serialisation / 1e6, computed without writing it.

    safetensors stores an 8-byte header length, a JSON header (name -> dtype, shape,
    offsets; padded with spaces to a multiple of 8) and the raw tensor bytes; tied
    weights are stored once.
    """
    tensors = _saved_tensors(model)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES.get(t.dtype, "F32"), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    n_header = len(json.dumps(header, separators=(",", ":")).encode())
    n_header += -n_header % 8
    return (struct.calcsize("<Q") + n_header + offset) / 1e6


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    if default is not None:
        return default
    raise ValueError(f"config of model_type={getattr(config, 'model_type', '?')!r} has none of {names}: "
                     "flops_per_token knows GPT-2 and Llama-style configs")


def flops_per_token(config: Any, n_ctx: int | None = None) -> int:
    """Analytic forward FLOPs per token (Kaplan et al. 2020, Table 1), multiply-add = 2 FLOPs.

        flops = 2 * N_layers + 2 * n_layer * n_ctx * n_embd + 2 * n_embd * vocab_size

    - ``N_layers``: weights of the attention and MLP matmuls, all layers (biases and norms
      left out, as Kaplan does). GPT-2: ``n_layer * (4 * d^2 + 2 * d * d_ff)``; Llama:
      ``n_layer * (2 * d^2 + 2 * d * d_kv + 3 * d * d_ff)`` with ``d_kv = n_kv_heads * head_dim``.
    - ``2 * n_layer * n_ctx * n_embd``: attention scores over a context of ``n_ctx``
      (default: the config's context length).
    - ``2 * n_embd * vocab_size``: the output logits. Kaplan drops it for large models;
      for the small students here it is a large share, so it is kept.
    """
    d = _cfg(config, "n_embd", "hidden_size")
    n_layer = _cfg(config, "n_layer", "num_hidden_layers")
    vocab = _cfg(config, "vocab_size")
    n_ctx = n_ctx or _cfg(config, "n_positions", "max_position_embeddings", "n_ctx")
    if getattr(config, "model_type", "") == "gpt2":
        d_ff = config.n_inner or 4 * d
        layer = 4 * d * d + 2 * d * d_ff
    else:  # Llama-style: separate q, k, v, o; gated MLP with three matrices
        n_head = _cfg(config, "num_attention_heads")
        head_dim = getattr(config, "head_dim", None) or d // n_head
        d_kv = _cfg(config, "num_key_value_heads", default=n_head) * head_dim
        d_q = n_head * head_dim
        layer = 2 * d * d_q + 2 * d * d_kv + 3 * d * _cfg(config, "intermediate_size")
    return int(2 * n_layer * layer + 2 * n_layer * n_ctx * d + 2 * d * vocab)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (``None`` = leave as is), then restore."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(model: torch.nn.Module, tokenizer: Any = None, *, prompt_len: int = 32, new_tokens: int = 32,
            repeats: int = 5, warmup: int = 2, threads: int | None = 1, seed: int = 0) -> dict[str, float]:
    """Batch-1 greedy decode with the KV cache: median ms per new token and prefill tokens/s.

    The prompt is ``prompt_len`` seeded random token ids (content does not change the
    cost). Each repeat times the prefill, then ``new_tokens`` single-token steps fed back
    greedily. ``threads`` is fixed (default 1: the same on every machine and unaffected
    by other processes on the host); on a GPU it does not matter.
    """
    from kd.evaluate import max_length

    if prompt_len + new_tokens > max_length(model):
        raise ValueError(f"prompt_len={prompt_len} + new_tokens={new_tokens} exceeds the model's context length "
                         f"{max_length(model)}: choose smaller values")
    device = next(model.parameters()).device
    vocab = len(tokenizer) if tokenizer is not None else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    decode_ms, prefill_s = [], []
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.no_grad():
            for r in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1, :vocab].argmax(-1, keepdim=True)
                _sync(device)
                t1 = time.perf_counter()
                cache = out.cache
                for _ in range(new_tokens):
                    out = model(input_ids=nxt, cache=cache, use_cache=True)
                    cache = out.cache
                    nxt = out.logits[:, -1, :vocab].argmax(-1, keepdim=True)
                _sync(device)
                t2 = time.perf_counter()
                if r >= warmup:
                    prefill_s.append(t1 - t0)
                    decode_ms.append((t2 - t1) * 1000 / new_tokens)
    finally:
        model.train(was_training)
    return {"latency_ms_per_token": statistics.median(decode_ms),
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill_s)}


def measure_size(model: torch.nn.Module) -> dict[str, float]:
    """The size metrics of :mod:`kd.metrics` (params, size_mb, flops_per_token): no timing."""
    out: dict[str, float] = dict(count_params(model))
    out["size_mb"] = size_mb(model)
    out["flops_per_token"] = flops_per_token(model.config)
    return out


def measure_model(model: torch.nn.Module, tokenizer: Any = None, **latency_kwargs: Any) -> dict[str, float]:
    """Every size and speed metric of :mod:`kd.metrics` for one model.

    Latency uses a 32-token prompt and 32 new tokens, shrunk to fit a shorter context.
    """
    from kd.evaluate import max_length

    ctx = max_length(model)
    latency_kwargs.setdefault("new_tokens", min(32, ctx // 2))
    latency_kwargs.setdefault("prompt_len", min(32, ctx - latency_kwargs["new_tokens"]))
    out = measure_size(model)
    out.update(latency(model, tokenizer, **latency_kwargs))
    return out
