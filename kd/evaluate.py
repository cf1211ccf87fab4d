"""Evaluators for the method's task families: perplexity, completion, multiple choice, QA.

Every evaluator is batched: sequences are left-padded (so the positions that are scored,
or the next token that is generated, sit at the right edge of every row), with an
attention mask and explicit position ids (GPT-2 learns absolute positions: without
them a left-padded row would start at position ``pad_len`` instead of 0). Scoring follows
lm-evaluation-harness so that our figures match its on the same items and model:

- a (context, continuation) pair is tokenized as ``encode(context + continuation)`` split
  after ``len(encode(context))`` tokens, trailing spaces of the context moved into the
  continuation; an empty context is replaced by the BOS/EOS token;
- completion (LAMBADA): context = text up to the last space, continuation = " " + last
  word; ``acc`` = every continuation token is the greedy choice;
- multiple choice: continuation = " " + ending; ``acc_norm`` divides each ending's
  log-likelihood by its length in characters.

Logits wider than the tokenizer (vocabulary padded for speed) are cut to ``len(tokenizer)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kd.world import QA_TEMPLATE

#: The evaluation prompt: the QA template cut before `` {answer}``.
QA_PROMPT = QA_TEMPLATE.split(" {answer}")[0]
_DEFAULT_MAX_LENGTH = 2048


# ------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode under ``torch.no_grad`` and restore its mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def max_length(model: torch.nn.Module) -> int:
    """The longest input the model takes (as lm-eval resolves it)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return _DEFAULT_MAX_LENGTH


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab(tokenizer: Any) -> int:
    return len(tokenizer)


def _prefix_id(tokenizer: Any) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a bos_token nor an eos_token; set one to score empty contexts")
    return tid


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad token lists into ``input_ids``, ``attention_mask``, ``position_ids`` (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    # positions count real tokens only: a padded row starts at 0 like an unpadded one
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's HFLM makes them."""
    if not context:
        cont = tokenizer.encode(continuation)
        prefix = _prefix_id(tokenizer)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


# -------------------------------------------------------------------------- scoring


def score_pairs(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                batch_size: int = 32) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, and whether it is greedy.

    Returns ``[(sum of continuation token log-probs, every token is the argmax), ...]``.
    """
    enc = [encode_pair(tokenizer, c, x) for c, x in pairs]
    limit, vocab, pad = max_length(model), _vocab(tokenizer), _pad_id(tokenizer)
    device = _device(model)
    # longest first: similar lengths share a batch, and an out-of-memory shows up at once
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(enc)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            # the model sees context + continuation minus the last token, left-truncated
            inputs = [(enc[i][0] + enc[i][1])[-(limit + 1):][:-1] for i in idx]
            keep = max(len(enc[i][1]) for i in idx)
            logits = model(**left_pad(inputs, pad, device), logits_to_keep=keep).logits  # (B, keep, V')
            logp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
            for row, i in enumerate(idx):
                cont = torch.tensor(enc[i][1], device=device)
                lp = logp[row, keep - len(cont):]  # (len(cont), V): right-aligned
                ll = lp.gather(-1, cont[:, None]).sum().item()
                out[i] = (ll, bool((lp.argmax(-1) == cont).all()))
    return out


def split_completion(text: str) -> tuple[str, str]:
    """LAMBADA split: context up to the last space, target `` " " + last word``.

    A one-word text gets an empty context (scored after BOS/EOS) and still the leading
    space, exactly as lm-eval's ``lambada_openai`` template renders it.
    """
    ctx, _, word = text.rpartition(" ")
    return ctx, " " + word


def completion_pair(item: dict) -> tuple[str, str]:
    """(context, target) of a completion item: its explicit ``context``/``continuation``, else
    :func:`split_completion` of its ``text``."""
    if "context" in item and "continuation" in item:
        return item["context"], item["continuation"]
    return split_completion(item["text"])


def eval_completion(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict], *,
                    batch_size: int = 32, records: list[dict] | None = None) -> dict[str, float]:
    """LAMBADA-style completion: ``acc`` (all target tokens greedy) and mean target log-likelihood.

    ``records``, when given, gets one ``{"target", "loglik", "correct"}`` per item.
    """
    pairs = [completion_pair(it) for it in items]
    scores = score_pairs(model, tokenizer, pairs, batch_size=batch_size)
    if records is not None:
        records += [{"target": t, "loglik": ll, "correct": g} for (_, t), (ll, g) in zip(pairs, scores)]
    n = max(len(scores), 1)
    return {"acc": sum(g for _, g in scores) / n, "loglik": sum(ll for ll, _ in scores) / n, "n": len(scores)}


def score_choices(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict], *,
                  batch_size: int = 32) -> list[list[float]]:
    """Log-likelihood of every ending of every ``{"ctx", "endings", "label"}`` item."""
    pairs = [(it["ctx"], " " + e) for it in items for e in it["endings"]]
    flat = [ll for ll, _ in score_pairs(model, tokenizer, pairs, batch_size=batch_size)]
    out, k = [], 0
    for it in items:
        out.append(flat[k:k + len(it["endings"])])
        k += len(it["endings"])
    return out


def eval_choice(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict], *,
                batch_size: int = 32, records: list[dict] | None = None) -> dict[str, float]:
    """Multiple choice: ``acc`` (argmax log-likelihood) and ``acc_norm`` (per character).

    ``records``, when given, gets one ``{"label", "pred", "pred_norm", "loglik"}`` per item.
    """
    lls = score_choices(model, tokenizer, items, batch_size=batch_size)
    acc = acc_norm = 0
    for it, ll in zip(items, lls):
        pred, pred_norm = _argmax(ll), _argmax([x / len(e) for x, e in zip(ll, it["endings"])])
        acc += pred == it["label"]
        acc_norm += pred_norm == it["label"]
        if records is not None:
            records.append({"label": it["label"], "pred": pred, "pred_norm": pred_norm, "loglik": ll})
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": len(items)}


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, as numpy


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, block_size: int = 128,
               batch_size: int = 8) -> dict[str, float]:
    """Perplexity of ``texts`` joined by the EOS token, in windows of ``block_size`` context.

    Windows of ``block_size + 1`` tokens overlap by one, so every token after the first
    is predicted exactly once; ``block_size`` is capped at the model's context length.
    Returns ``{"loss": nats/token, "ppl": exp(loss), "tokens"}``.
    """
    block_size = min(block_size, max_length(model))
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for t in texts:
        ids += tokenizer.encode(t) + ([sep] if sep is not None else [])
    windows = [ids[i:i + block_size + 1] for i in range(0, max(len(ids) - 1, 0), block_size)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("perplexity needs at least two tokens of text")
    vocab, pad, device = _vocab(tokenizer), _pad_id(tokenizer), _device(model)
    nll, count = 0.0, 0
    with eval_mode(model):
        for idx in _batches(list(range(len(windows))), batch_size):
            batch = left_pad([windows[i][:-1] for i in idx], pad, device)
            logp = torch.log_softmax(model(**batch).logits[..., :vocab].float(), dim=-1)  # (B, T, V)
            width = logp.shape[1]
            for row, i in enumerate(idx):
                tgt = torch.tensor(windows[i][1:], device=device)
                nll -= logp[row, width - len(tgt):].gather(-1, tgt[:, None]).sum().item()
                count += len(tgt)
    return {"loss": nll / count, "ppl": math.exp(nll / count), "tokens": count}


# ------------------------------------------------------------------------------- QA


def normalize_answer(s: str) -> str:
    """SQuAD/NQ normalisation: lower case, no punctuation, no a/an/the, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised prediction and gold answer (SQuAD's: 1 when both are empty;
    :func:`qa_scores` never scores an empty prediction)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, aliases: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of a prediction, each the maximum over the gold aliases.

    A prediction that normalises to nothing (``"."``, ``""``) matches nothing, not even a
    gold answer that also normalises to nothing (``"---"``).
    """
    pred = normalize_answer(prediction)
    if not pred:
        return 0.0, 0.0
    em = max(float(pred == normalize_answer(a)) for a in aliases)
    return em, max(token_f1(prediction, a) for a in aliases)


def qa_prompt(question: str, fewshot: Sequence[dict] = ()) -> str:
    """Few-shot prompt: solved examples in the QA template, then the question.

    Examples are separated by a blank line, as QA pairs are in the world's training
    documents (and as lm-eval's default few-shot delimiter).
    """
    shots = [QA_TEMPLATE.format(question=ex["question"], answer=ex["answer"][0]) for ex in fewshot]
    return "\n\n".join([*shots, QA_PROMPT.format(question=question)])


_NEWLINE_IDS: dict[tuple[int, int], torch.Tensor] = {}


def _stop_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of every token whose text contains a newline, plus EOS (cached per tokenizer)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, t in enumerate(texts) if "\n" in t]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        _NEWLINE_IDS[key] = torch.tensor(sorted(set(ids)), dtype=torch.long)
    return _NEWLINE_IDS[key]


def generate_greedy(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 16,
                    batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts``, cut at the first newline (KV cache, left padding)."""
    limit, vocab, pad, device = max_length(model), _vocab(tokenizer), _pad_id(tokenizer), _device(model)
    stop = _stop_ids(tokenizer).to(device)
    if max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be below the model's context length {limit}")
    enc = [tokenizer.encode(p)[-(limit - max_new_tokens):] for p in prompts]  # keep room for the answer
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out = [""] * len(enc)
    with eval_mode(model):
        for idx in _batches(order, batch_size):
            batch = left_pad([enc[i] for i in idx], pad, device)
            mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
            res = model(**batch, use_cache=True, logits_to_keep=1)
            new = torch.empty((len(idx), 0), dtype=torch.long, device=device)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                nxt = res.logits[:, -1, :vocab].argmax(-1)  # (B,)
                nxt = torch.where(done, pad, nxt)
                new = torch.cat([new, nxt[:, None]], dim=1)
                done |= torch.isin(nxt, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos + 1
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                            cache=res.cache, use_cache=True)
            stop_set = set(stop.tolist())
            for row, i in enumerate(idx):
                toks = new[row].tolist()
                end = next((k + 1 for k, t in enumerate(toks) if t in stop_set), len(toks))
                text = tokenizer.decode(toks[:end], skip_special_tokens=True)
                out[i] = text.split("\n")[0].strip()
    return out


def eval_qa(model: torch.nn.Module, tokenizer: Any, items: Sequence[dict], *, fewshot: Sequence[dict] = (),
            max_new_tokens: int = 16, batch_size: int = 32, records: list[dict] | None = None) -> dict[str, float]:
    """Closed-book QA: greedy answer after a few-shot prompt; EM and F1 over the aliases.

    ``records``, when given, gets one ``{"question", "prediction", "answer", "em", "f1"}`` per item.
    """
    preds = generate_greedy(model, tokenizer, [qa_prompt(it["question"], fewshot) for it in items],
                            max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [qa_scores(p, it["answer"]) for p, it in zip(preds, items)]
    if records is not None:
        records += [{"question": it["question"], "prediction": p, "answer": it["answer"], "em": e, "f1": f}
                    for p, it, (e, f) in zip(preds, items, scores)]
    n = max(len(items), 1)
    return {"em": sum(e for e, _ in scores) / n, "f1": sum(f for _, f in scores) / n, "n": len(items)}


# ---------------------------------------------------------------------------- world


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a jsonl file (blank lines skipped); a bad line names the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def evaluate_world(model: torch.nn.Module, tokenizer: Any, world_dir: str | Path, *, limit: int | None = None,
                   batch_size: int = 32) -> dict[str, float]:
    """The world's three task families: ``acc_completion``, ``acc_choice``, ``em_qa``, ``f1_qa``, ``acc_mean``.

    ``limit`` caps the items of each set (the first N).
    """
    d = Path(world_dir)
    missing = [n for n in ("completion.jsonl", "choice.jsonl", "qa.jsonl") if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"world_dir={str(d)!r} lacks {', '.join(missing)}: expected a world directory "
                                "(kd.world.ensure_world)")
    fewshot = read_jsonl(d / "qa_fewshot.jsonl") if (d / "qa_fewshot.jsonl").is_file() else []
    comp = eval_completion(model, tokenizer, read_jsonl(d / "completion.jsonl", limit), batch_size=batch_size)
    choice = eval_choice(model, tokenizer, read_jsonl(d / "choice.jsonl", limit), batch_size=batch_size)
    qa = eval_qa(model, tokenizer, read_jsonl(d / "qa.jsonl", limit), fewshot=fewshot, batch_size=batch_size)
    out = {"acc_completion": comp["acc"], "acc_choice": choice["acc"], "em_qa": qa["em"], "f1_qa": qa["f1"]}
    out["acc_mean"] = sum(out.values()) / 4
    return out
