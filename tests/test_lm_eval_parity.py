"""Our completion and multiple-choice scores equal lm-evaluation-harness's on the same items.

A tiny GPT-2 is first fitted for a few seconds to the items, so that some completions
are greedy-correct and some are not (a random model gets every one wrong, which would
make accuracy parity vacuous). lm-eval runs fully offline on local custom tasks (YAML +
jsonl with absolute paths, see STACK.md). CI installs the eval extra, so this runs there;
without lm-eval a developer sees a skip.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd import evaluate as ev  # noqa: E402
from test_evaluate import sample_items, tiny_model, tiny_tokenizer  # noqa: E402

import lm_eval  # noqa: E402  (the eval extra; the README test command installs it)

COMPLETION_YAML = """\
task: kd_parity_completion
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

CHOICE_YAML = """\
task: kd_parity_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: ctx
doc_to_choice: endings
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _fitted_model(tok, texts, steps=40):
    """A tiny GPT-2 fitted to part of ``texts``: some items right, some wrong."""
    model = tiny_model("gpt2", seed=3, n_positions=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = ev.left_pad([tok.encode(t) for t in texts], tok.eos_token_id, torch.device("cpu"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _samples(results, task):
    """Per-document (loglikelihood, is_greedy) lists from lm-eval, ordered by doc_id."""
    rows = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[tuple(r[0]) if isinstance(r, list) else tuple(r) for r in s["resps"]] for s in rows]


def test_completion_and_choice_match_lm_eval(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = tiny_tokenizer()
    completion, choice, _ = sample_items()
    choice = choice + [dict(c, label=(c["label"] + 1) % 4) for c in choice]  # some wrong labels too
    fitted = [it["text"] for it in completion[:3]] + [c["ctx"] + " " + c["endings"][c["label"]] for c in choice[:2]]
    model = _fitted_model(tok, fitted)

    for name, rows, yaml in (("completion", completion, COMPLETION_YAML), ("choice", choice, CHOICE_YAML)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(yaml.format(path=data.resolve()))

    # logits_cache=False: lm-eval 0.4.13's logits cache mis-scores a request whose full token
    # sequence equals another request's in the same batch but is split at a different point
    # (here the completion "...born in 1961 in" + " Osterby." and the choice "...born in" +
    # " 1961 in Osterby."); each request scored alone, or without the cache, equals ours.
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", logits_cache=False)
    results = simple_evaluate(model=lm, tasks=["kd_parity_completion", "kd_parity_choice"],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), log_samples=True,
                              bootstrap_iters=0)
    harness = results["results"]

    ours_c = ev.eval_completion(model, tok, completion, batch_size=3)
    ours_m = ev.eval_choice(model, tok, choice, batch_size=5)
    assert 0.0 < ours_c["acc"] < 1.0, "the fitted model should get some completions right and some wrong"
    assert ours_c["acc"] == harness["kd_parity_completion"]["acc,none"]
    assert ours_m["acc"] == harness["kd_parity_choice"]["acc,none"]
    assert ours_m["acc_norm"] == harness["kd_parity_choice"]["acc_norm,none"]

    # and item by item: the same log-likelihoods and greedy flags
    pairs = [ev.split_completion(it["text"]) for it in completion]
    for (ll, greedy), theirs in zip(ev.score_pairs(model, tok, pairs), _samples(results, "kd_parity_completion")):
        assert ll == pytest.approx(theirs[0][0], abs=1e-4) and greedy == bool(theirs[0][1])
    for lls, theirs in zip(ev.score_choices(model, tok, choice), _samples(results, "kd_parity_choice")):
        assert lls == pytest.approx([t[0] for t in theirs], abs=1e-4)


def test_kd_eval_harness_end_to_end(tmp_path):
    """``kd eval --task lambada --harness <custom task>``: both figures in one JSON, equal."""
    from test_evaluate import _kd_main, saved_model

    completion, _, _ = sample_items()
    data = tmp_path / "completion.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in completion))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "completion.yaml").write_text(COMPLETION_YAML.format(path=data.resolve()))
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(saved_model(tmp_path)), "--task", "lambada", "--data", str(data),
            "--harness", "kd_parity_completion", "--include-path", str(tasks), "--out", str(out)]
    assert _kd_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["acc"] == report["harness"]["kd_parity_completion"]["acc,none"]
