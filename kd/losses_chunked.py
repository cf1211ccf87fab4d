"""The distillation loss in chunks of tokens: peak memory bounded by the chunk, not by N x V.

Unchunked, the loss holds three to four fp32 (N, V) tensors (the student's softmax at 1
and at T, the teacher's, their difference): at V = 128,256 and 8,192 tokens, 4.2 GB
each. Here the rows are split into chunks; each chunk's loss (the same code,
:func:`kd.losses.loss_rows`, normalised by the whole batch's count) and its gradient
wrt the chunk's logits are computed in the forward pass, and only the gradient (N, V),
in the logits' dtype, is kept: the (N, V) temporaries of one chunk at a time. For forward
KL (and CE alone) the chunk calls the fused node's math (:func:`kd.losses_fused.forward_rows`)
without autograd and writes its softmax, then its gradient, straight into its rows of that
(N, V) buffer; the other divergences take autograd per chunk. This is
Liger-Kernel's chunked-loss idea without the lm_head (the cache holds logits, not hidden
states) and pure torch, so it runs alike on CPU and GPU.

The forward pass computes the gradient of ``loss`` only (what training backpropagates).
``ce`` and ``kd`` stay differentiable: if a caller backpropagates through them, their
gradients are recomputed chunk by chunk in the backward pass. Values and gradients equal
the unchunked loss up to summation order (tests/test_losses_chunked.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.losses_fused import known

#: ``chunk_tokens=None`` chunks once the logits have this many elements (256 MB in fp32):
#: below it (the world's 16 x 127 x 2,048 = 4.2M) the unchunked fused node is as small and
#: torch.compile sees one graph.
AUTO_CHUNK_ELEMENTS = 1 << 26
#: Elements per chunk when automatic: ~32M (128 MB of fp32 per buffer). On 2 CPU threads,
#: with the chunks' buffers reused, 261-row chunks at V = 128,256 measured faster than the
#: unchunked loss and 16-row chunks (8 MB, cache-sized) slower: each small op pays its
#: threads' start-up (bench/chunked_loss.py).
AUTO_CHUNK_ROW_ELEMENTS = 1 << 25


def should_chunk(chunk_tokens: int | None, n: int, vocab: int) -> bool:
    if chunk_tokens is None:
        return n * vocab > AUTO_CHUNK_ELEMENTS
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is not allowed: must be >= 0 (0 = never chunk)")
    return 0 < chunk_tokens < n


def auto_rows(vocab: int) -> int:
    """Rows per chunk when ``chunk_tokens`` is None, for logits of ``vocab``."""
    return max(1, AUTO_CHUNK_ROW_ELEMENTS // vocab)


def _slices(n: int, rows: int) -> list[slice]:
    return [slice(i, min(n, i + rows)) for i in range(0, n, rows)]


def _part(x: Tensor | None, sl: slice) -> Tensor | None:
    return None if x is None else x[sl]


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, labels: Tensor, teacher, idx, val, tail, args: tuple, rows: int, target=None,
                log_r=None):
        from kd.losses import IGNORE_INDEX, loss_rows
        from kd.losses_fused import backward_rows, forward_rows

        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if want_grad else None  # (N, V), the logits' dtype
        totals = torch.zeros(3, dtype=torch.float32, device=student.device)
        temperature, kd_weight, divergence = args[:3]
        direct = divergence == "forward_kl" or known(kd_weight, 0)  # loss_rows' fused node: call its math
        # One pair of fp32 (rows, V) buffers serves every chunk (kd.losses_fused.forward_rows).
        work = (torch.empty((rows, student.shape[-1]), dtype=torch.float32, device=student.device),
                torch.empty((rows, student.shape[-1]), dtype=torch.float32, device=student.device)) if direct else None
        for sl in _slices(student.shape[0], rows):
            if direct:
                # No autograd in the loop: the chunk's softmax goes straight into its rows of
                # ``grad`` and its gradient is computed there in place (no copy, no fresh
                # (rows, V) buffer for it); a low-precision gradient takes one copy.
                q_out = grad[sl] if want_grad and grad.dtype == torch.float32 else None
                *parts, saved = forward_rows(student[sl].detach(), labels[sl], _part(teacher, sl), _part(idx, sl),
                                             _part(val, sl), temperature, kd_weight, _part(tail, sl), count,
                                             _part(target, sl), _part(log_r, sl), q_out=q_out, work=work)
                if want_grad:
                    g = backward_rows(saved, temperature, kd_weight, 1.0, 0.0, 0.0)
                    if q_out is None:
                        grad[sl] = g
                del saved
            else:
                with torch.enable_grad():
                    s = student[sl].detach().requires_grad_(want_grad)
                    parts = loss_rows(s, labels[sl], _part(teacher, sl), _part(idx, sl), _part(val, sl),
                                      _part(tail, sl), *args, count=count, target=_part(target, sl),
                                      sample_log_r=_part(log_r, sl))
                    if want_grad:
                        (g,) = torch.autograd.grad(parts.loss, s)
                        grad[sl] = g
            totals += torch.stack([p.detach() for p in parts])
        ctx.save_for_backward(grad, labels, teacher, idx, val, tail, student, target, log_r)
        ctx.args, ctx.rows = args, rows
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: no zero tensors, no checks
        loss, ce, kd = totals.unbind()
        return loss.clone(), ce.clone(), kd.clone()

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kd):
        from kd.losses import IGNORE_INDEX, loss_rows

        grad, labels, teacher, idx, val, tail, student, target, log_r = ctx.saved_tensors
        out = None
        if g_loss is not None:
            out = grad.mul_(g_loss.to(grad.dtype))  # saved for this backward only: in place
        if g_ce is not None or g_kd is not None:  # rare (training uses loss): recompute by chunk
            count = (labels != IGNORE_INDEX).sum().clamp(min=1)
            extra = torch.zeros_like(student) if out is None else out
            for sl in _slices(student.shape[0], ctx.rows):
                with torch.enable_grad():
                    s = student[sl].detach().requires_grad_(True)
                    parts = loss_rows(s, labels[sl], _part(teacher, sl), _part(idx, sl), _part(val, sl),
                                      _part(tail, sl), *ctx.args, count=count, target=_part(target, sl),
                                      sample_log_r=_part(log_r, sl))
                    pairs = [(p, g) for p, g in ((parts.ce, g_ce), (parts.kd, g_kd))
                             if g is not None and p.requires_grad]
                    if not pairs:  # kd_weight = 0: kd is a constant
                        continue
                    (g,) = torch.autograd.grad([p for p, _ in pairs], s, [g for _, g in pairs])
                extra[sl] += g.to(extra.dtype)
            out = extra
        return out, None, None, None, None, None, None, None, None, None


def chunked_loss(student: Tensor, labels: Tensor, teacher: Tensor | None, idx: Tensor | None, val: Tensor | None,
                 tail: Tensor | None, args: tuple, chunk_tokens: int | None, target: Tensor | None = None,
                 log_r: Tensor | None = None):
    """:func:`kd.losses.loss_rows` over (N, V) rows, ``chunk_tokens`` rows at a time."""
    from kd.losses import LossParts

    rows = chunk_tokens or auto_rows(student.shape[-1])
    return LossParts(*_Chunked.apply(student, labels, teacher, idx, val, tail, args, rows, target, log_r))
