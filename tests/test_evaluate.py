"""Evaluators: batched (padded) results equal an item-at-a-time reference; metrics arithmetic.

The tiny tokenizer and models are made here (no downloads) and reused by the other
evaluation test modules (``from test_evaluate import tiny_tokenizer, tiny_model``).
"""

from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd import evaluate as ev  # noqa: E402

SENTENCES = [
    "Mara Velin was born in 1961 in Osterby.",
    "Tomas Rell studied chemistry at the University of Karvik.",
    "The old fisherman lit the lamp and went down to the harbour.",
    "Question: Where was Mara Velin born?\nAnswer: Osterby",
    "Question: What did Tomas Rell study?\nAnswer: chemistry",
    "She opened the door, and the cat ran out into the garden.",
    "Ilsa Dorn works for Brightwater Mills as an engineer.",
]
NAMES = ["Mara", "Tomas", "Ilsa", "Osterby", "Karvik", "harbour", "garden", "lamp", "chemistry"]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, wrapped as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_model(arch: str = "gpt2", *, vocab_pad: int = 0, seed: int = 0, n_positions: int = 64):
    """A seeded 2-layer model; ``vocab_pad`` extra output rows mimic a padded vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(tiny_tokenizer()) + vocab_pad
    eos = tiny_tokenizer().eos_token_id
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=eos, eos_token_id=eos)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return LlamaForCausalLM(cfg).eval()


def sample_items():
    """Completion, choice and QA items in the canonical schemas, of varied lengths."""
    completion = [{"text": s} for s in SENTENCES[:3] + SENTENCES[5:]] + [{"text": "Osterby"}]
    choice = [
        {"ctx": "Mara Velin was born in", "endings": ["1961 in Osterby.", "Karvik.", "a lamp", "the garden"],
         "label": 0},
        {"ctx": "The cat ran", "endings": ["out into the garden.", "chemistry", "up", "to Karvik at night."],
         "label": 0},
        {"ctx": "Tomas Rell studied", "endings": ["lamp", "chemistry at the University of Karvik.", "x", "yy"],
         "label": 1},
    ]
    qa = [{"question": "Where was Mara Velin born?", "answer": ["Osterby", "in Osterby"]},
          {"question": "What did Tomas Rell study?", "answer": ["chemistry"]},
          {"question": "Who works for Brightwater Mills?", "answer": ["Ilsa Dorn"]}]
    return completion, choice, qa


# ------------------------------------------------------------- reference (unbatched)


def ref_score(model, tok, context, continuation):
    """One pair, no padding, full logits: the reference the batched scorer must equal."""
    ctx, cont = ev.encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1, : len(tok)]
    lp = torch.log_softmax(logits.float(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def ref_generate(model, tok, prompt, max_new_tokens=8):
    ids = tok.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1, : len(tok)].argmax())
            out.append(nxt)
            if "\n" in tok.decode([nxt]) or nxt == tok.eos_token_id:
                break
    return tok.decode(out, skip_special_tokens=True).split("\n")[0].strip()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_scores_equal_unbatched(arch):
    tok, model = tiny_tokenizer(), tiny_model(arch, vocab_pad=5)
    completion, choice, _ = sample_items()
    pairs = [ev.split_completion(it["text"]) for it in completion]
    pairs += [(it["ctx"], " " + e) for it in choice for e in it["endings"]]
    got = ev.score_pairs(model, tok, pairs, batch_size=4)
    for (c, x), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = ref_score(model, tok, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_generation_equals_unbatched(arch):
    tok, model = tiny_tokenizer(), tiny_model(arch, seed=1)
    prompts = ["Mara", "Question: Where was Mara Velin born?\nAnswer:", "The old fisherman lit the"]
    got = ev.generate_greedy(model, tok, prompts, max_new_tokens=8, batch_size=3)
    assert got == [ref_generate(model, tok, p) for p in prompts]


def test_model_mode_restored_and_no_grad():
    tok, model = tiny_tokenizer(), tiny_model()
    model.train()
    ev.score_pairs(model, tok, [("Mara Velin", " was")])
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_encode_pair_moves_trailing_space_and_handles_empty_context():
    tok = tiny_tokenizer()
    ctx, cont = ev.encode_pair(tok, "Mara Velin was ", "born")
    assert ctx == tok.encode("Mara Velin was") and tok.decode(cont) == " born"
    ctx, cont = ev.encode_pair(tok, "", "Osterby")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "Osterby"
    assert ev.split_completion("a b c") == ("a b", " c")
    assert ev.split_completion("Osterby") == ("", " Osterby")


class Oracle(torch.nn.Module):
    """A 'model' forced to be right: it puts all mass on the next token of known texts."""

    def __init__(self, tok, texts, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"n_positions": 256})()
        self.tok, self.vocab = tok, vocab
        self.seqs = [tok.encode(t) for t in texts]

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b in range(input_ids.shape[0]):
            row = input_ids[b][attention_mask[b].bool()].tolist() if attention_mask is not None else input_ids[b].tolist()
            off = input_ids.shape[1] - len(row)
            for t in range(len(row)):
                for s in self.seqs:  # the known text that continues this prefix
                    if s[: t + 1] == row[: t + 1] and len(s) > t + 1:
                        logits[b, off + t, s[t + 1]] = 20.0
                        break
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def test_oracle_is_always_right():
    tok = tiny_tokenizer()
    completion, choice, _ = sample_items()
    texts = [it["text"] for it in completion[:-1]]
    texts += [it["ctx"] + " " + it["endings"][it["label"]] for it in choice]
    oracle = Oracle(tok, texts, len(tok) + 3)
    assert ev.eval_completion(oracle, tok, completion[:-1], batch_size=3)["acc"] == 1.0
    res = ev.eval_choice(oracle, tok, choice, batch_size=5)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0


def test_perplexity_matches_reference_and_uniform_model():
    tok, model = tiny_tokenizer(), tiny_model(n_positions=16)
    texts = SENTENCES[:4]
    got = ev.perplexity(model, tok, texts, block_size=8, batch_size=3)
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eos_token_id]
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, 8):
            w = torch.tensor(ids[i:i + 9])
            if len(w) < 2:
                continue
            lp = torch.log_softmax(model(input_ids=w[None, :-1]).logits[0, :, : len(tok)], -1)
            nll -= lp.gather(-1, w[1:, None]).sum().item()
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    # a model with all-zero logits is uniform: perplexity = vocabulary size
    zero = tiny_model()
    for p in zero.parameters():
        torch.nn.init.zeros_(p)
    assert ev.perplexity(zero, tok, texts)["ppl"] == pytest.approx(len(tok), rel=1e-4)


def test_acc_norm_divides_by_characters():
    tok = tiny_tokenizer()
    item = {"ctx": "x", "endings": ["ab", "abcdef"], "label": 1}
    # ll: -2 for 2 chars (-1/char), -3 for 6 chars (-0.5/char): acc picks 0, acc_norm picks 1
    orig = ev.score_choices
    try:
        ev.score_choices = lambda *a, **k: [[-2.0, -3.0]]
        res = ev.eval_choice(None, tok, [item])
    finally:
        ev.score_choices = orig
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_normalisation_and_f1_arithmetic():
    assert ev.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert ev.normalize_answer("an apple a day") == "apple day"
    assert ev.token_f1("the quick brown fox", "quick fox jumps") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("x", "") == 0.0
    em, f1 = ev.qa_scores("in Osterby", ["Osterby", "in Osterby"])
    assert (em, f1) == (1.0, 1.0)
    em, f1 = ev.qa_scores("Osterby town", ["Osterby", "Karvik"])
    assert em == 0.0 and f1 == pytest.approx(2 / 3)


def test_qa_prompt_format():
    shots = [{"question": "Q1?", "answer": ["A1", "a1"]}]
    assert ev.qa_prompt("Q2?", shots) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer:"


def test_eval_qa_batched_equals_reference_and_scores():
    tok, model = tiny_tokenizer(), tiny_model(seed=2, n_positions=256)
    _, _, qa = sample_items()
    shots = [{"question": "What did Tomas Rell study?", "answer": ["chemistry"]}]
    res = ev.eval_qa(model, tok, qa, fewshot=shots, max_new_tokens=6, batch_size=2)
    preds = [ref_generate(model, tok, ev.qa_prompt(it["question"], shots), 6) for it in qa]
    scores = [ev.qa_scores(p, it["answer"]) for p, it in zip(preds, qa)]
    assert res["em"] == pytest.approx(sum(s[0] for s in scores) / 3)
    assert res["f1"] == pytest.approx(sum(s[1] for s in scores) / 3)


def test_evaluate_world_reads_the_four_files(tmp_path):
    tok, model = tiny_tokenizer(), tiny_model()
    completion, choice, qa = sample_items()
    for name, rows in (("completion", completion), ("choice", choice), ("qa", qa), ("qa_fewshot", qa[:1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = ev.evaluate_world(model, tok, tmp_path, limit=2, batch_size=4)
    assert set(res) == {"acc_completion", "acc_choice", "em_qa", "f1_qa", "acc_mean"}
    assert res["acc_mean"] == pytest.approx(sum(res[k] for k in ("acc_completion", "acc_choice", "em_qa", "f1_qa")) / 4)
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in res.values())
    with pytest.raises(FileNotFoundError, match="choice.jsonl"):
        (tmp_path / "choice.jsonl").unlink()
        ev.evaluate_world(model, tok, tmp_path)


# ------------------------------------------------------------------- kd eval (CLI)


def _kd_main(argv):
    """The real ``kd`` entry point when kd.cli registers ``eval``; else the module's own."""
    try:
        from kd.cli import main

        return main(argv)
    except ImportError:
        from kd.cli_eval import main

        return main(argv[1:])


def saved_model(tmp_path):
    d = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_kd_eval_world_and_lambada_end_to_end(tmp_path, capsys):
    model_dir = saved_model(tmp_path)
    completion, choice, qa = sample_items()
    world = tmp_path / "world"
    world.mkdir()
    for name, rows in (("completion", completion), ("choice", choice), ("qa", qa), ("qa_fewshot", qa[:1])):
        (world / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "world.json"
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "world", "--data", str(world), "--limit", "2",
                     "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"acc_completion", "acc_choice", "em_qa", "f1_qa", "acc_mean"}
    assert "acc_mean" in capsys.readouterr().out

    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps(r) + "\n" for r in completion))
    out = tmp_path / "lambada.json"
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "lambada", "--data", str(lambada),
                     "--out", str(out)]) == 0
    expected = ev.eval_completion(tiny_model("gpt2"), tiny_tokenizer(), completion)
    assert json.loads(out.read_text())["metrics"] == pytest.approx(expected)


def test_kd_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
    model_dir = saved_model(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{"question": "q2"}\n')
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "nq_open", "--data", str(bad)]) == 2
    assert "bad.jsonl:2: field 'answer'" in capsys.readouterr().err
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "world", "--data", str(tmp_path)]) == 2
    assert "must be a world directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        good = tmp_path / "good.jsonl"
        good.write_text('{"question": "q", "answer": ["a"]}\n')
        assert _kd_main(["eval", "--model", str(model_dir), "--task", "nq_open", "--data", str(good),
                         "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip().endswith(
            "--device='cuda' is not allowed here: no CUDA device is visible (use cpu or auto)")
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if the eval extra were missing
    assert _kd_main(["eval", "--model", str(model_dir), "--harness", "lambada_openai"]) == 2
    assert "pip install -e .[eval]" in capsys.readouterr().err


def test_an_empty_normalised_prediction_never_matches():
    """"." and "---" both normalise to "": that is no answer, not a right one."""
    assert ev.normalize_answer(".") == ev.normalize_answer("---") == ""
    assert ev.qa_scores(".", ["---"]) == (0.0, 0.0)
    assert ev.qa_scores("", [""]) == (0.0, 0.0)
    assert ev.qa_scores("the", ["a"]) == (0.0, 0.0)  # articles alone normalise away too
    assert ev.qa_scores("Osterby.", ["---", "osterby"]) == (1.0, 1.0)


def test_completion_with_explicit_context_and_continuation_scores_that_split():
    tok, model = tiny_tokenizer(), tiny_model()
    text = [{"text": "Mara Velin was born in Osterby"}]
    pair = [{"context": "Mara Velin was born in", "continuation": " Osterby", "text": "ignored when split"}]
    records: list[dict] = []
    assert ev.eval_completion(model, tok, pair, records=records) == pytest.approx(ev.eval_completion(model, tok, text))
    assert records[0]["target"] == " Osterby" and set(records[0]) == {"target", "loglik", "correct"}


def test_kd_eval_records_data_sha256_and_predictions(tmp_path):
    import hashlib

    model_dir = saved_model(tmp_path)
    _, _, qa = sample_items()
    data = tmp_path / "nq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa))
    out = tmp_path / "nq.json"
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "nq_open", "--data", str(data), "--out", str(out),
                     "--predictions"]) == 0
    report = json.loads(out.read_text())
    assert report["data_sha256"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    preds = report["predictions"]["nq_open"]
    assert [p["question"] for p in preds] == [it["question"] for it in qa]
    assert all(set(p) == {"question", "prediction", "answer", "em", "f1"} for p in preds)
    assert report["metrics"]["em"] == pytest.approx(sum(p["em"] for p in preds) / len(preds))
    # Without the flag: the hash, no per-item outputs.
    assert _kd_main(["eval", "--model", str(model_dir), "--task", "nq_open", "--data", str(data), "--out",
                     str(out)]) == 0
    report = json.loads(out.read_text())
    assert "predictions" not in report and report["data_sha256"][str(data)] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_kd_eval_harness_task_without_offline_data_is_one_line_and_fast(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    import time

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = saved_model(tmp_path)
    capsys.readouterr()  # save_pretrained's own progress bar
    t0 = time.monotonic()
    assert _kd_main(["eval", "--model", str(model_dir), "--harness", "lambada_openai"]) == 2
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--harness task 'lambada_openai' cannot run offline: its data (EleutherAI/lambada_openai)" in err[0]
    assert "--include-path" in err[0] and "dataset_path: json" in err[0]


def test_kd_eval_refuses_missing_files_and_bad_out_before_loading(tmp_path, capsys):
    """Checked before the model loads (``--model`` here does not even exist), in one line each."""
    data = tmp_path / "nq.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": ["a"]}) + "\n")
    missing = str(tmp_path / "no-model")
    cases = [
        (["--task", "nq_open", "--data", str(tmp_path / "missing.jsonl")], "--data='", "no such file"),
        (["--task", "nq_open", "--data", str(data), "--fewshot", str(tmp_path / "shots.jsonl")], "--fewshot=",
         "no such file"),
        (["--task", "nq_open", "--data", str(data), "--out", str(tmp_path)], "--out=", "it is a directory"),
        (["--task", "nq_open", "--data", str(data), "--out", str(data / "x.json")], "--out=", "is a file"),
        (["--task", "nq_open", "--data", str(data)], f"--model={missing!r} could not be loaded", ""),
    ]
    for args, key, why in cases:
        assert _kd_main(["eval", "--model", missing, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and why in err[0], (args, err)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert _kd_main(["eval", "--model", str(not_a_model), "--task", "nq_open", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be loaded" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "nq.jsonl"]
