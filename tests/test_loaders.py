"""Every public-format loader: a sample file in its schema, and a malformed row."""

from __future__ import annotations

import csv
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kd import eval_loaders as L  # noqa: E402


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_lambada(tmp_path):
    f = _jsonl(tmp_path / "lambada.jsonl", [{"text": "he opened the door and saw his brother"}, {"text": "a b c"}])
    assert L.load_lambada(f) == [{"text": "he opened the door and saw his brother"}, {"text": "a b c"}]
    assert L.load_lambada(f, limit=1) == [{"text": "he opened the door and saw his brother"}]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok text"}, {"txt": "typo"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text'"):
        L.load_lambada(bad)
    broken = _jsonl(tmp_path / "broken.jsonl", [{"text": "ok text"}, "", '{"text": "unterminated'])
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: not valid JSON"):
        L.load_lambada(broken)


HELLASWAG_ROW = {
    "ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
    "ctx_b": "then", "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles. then",
    "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.",
                ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."],
    "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "train", "split_type": "indomain", "label": "3",
}


def test_hellaswag(tmp_path):
    wikihow = {"activity_label": "Home and Garden", "ctx": "[header] How to clean a grill [title] Heat the grill.",
               "endings": ["[step] Scrub it.", "Eat it.", "Sell it.", "Paint it."], "label": 0}
    items = L.load_hellaswag(_jsonl(tmp_path / "hs.jsonl", [HELLASWAG_ROW, wikihow]))
    assert items[0]["ctx"] == ("Removing ice from car: Then, the man writes over the snow covering the window of a "
                               "car, and a woman wearing winter clothes smiles. Then")
    assert items[0]["label"] == 3 and items[0]["endings"][3] == ", the man continues removing the snow on his car."
    assert items[1]["ctx"] == "Home and Garden: How to clean a grill. Heat the grill."
    assert items[1]["endings"][0] == " Scrub it."  # exactly lm-eval's preprocessing (leading space kept)
    bad = dict(HELLASWAG_ROW, label="")  # the hub's test split: no labels
    with pytest.raises(ValueError, match=r"hs_bad\.jsonl:2: field 'label' must be an integer in 0\.\.3"):
        L.load_hellaswag(_jsonl(tmp_path / "hs_bad.jsonl", [HELLASWAG_ROW, bad]))
    with pytest.raises(ValueError, match=r"hs_bad2\.jsonl:1: field 'endings'"):
        L.load_hellaswag(_jsonl(tmp_path / "hs_bad2.jsonl", [dict(HELLASWAG_ROW, endings="one")]))


STORY_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def _story_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STORY_HEADER)
        w.writerows(rows)
    return path


def test_storycloze(tmp_path):
    row = ["id1", "Rick grew up in a troubled household.", "He never found good support in family, and turned to gangs.",
           "It wasn't long before Rick got shot in a robbery.", "The incident caused him to turn a new leaf.",
           "He is happy now.", "He joined a gang.", "1"]
    items = L.load_storycloze(_story_csv(tmp_path / "sc.csv", [row, row[:-1] + ["2"]]))
    assert items[0] == {"ctx": " ".join(row[1:5]), "endings": ["He is happy now.", "He joined a gang."], "label": 0}
    assert items[1]["label"] == 1
    hub = {f"input_sentence_{i}": f"S{i}." for i in range(1, 5)}
    hub.update(sentence_quiz1="A.", sentence_quiz2="B.", answer_right_ending=2, story_id="x")
    assert L.load_storycloze(_jsonl(tmp_path / "sc.jsonl", [hub]))[0] == {"ctx": "S1. S2. S3. S4.",
                                                                          "endings": ["A.", "B."], "label": 1}
    with pytest.raises(ValueError, match=r"sc_bad\.csv:3: field 'AnswerRightEnding' must be an integer in 1\.\.2"):
        L.load_storycloze(_story_csv(tmp_path / "sc_bad.csv", [row, row[:-1] + ["3"]]))
    with pytest.raises(ValueError, match=r"sc_bad2\.csv:2: field 'InputSentence3'"):
        L.load_storycloze(_story_csv(tmp_path / "sc_bad2.csv", [row[:3] + [""] + row[4:]]))


def test_nq_open(tmp_path):
    rows = [{"question": "where is the eiffel tower", "answer": ["Paris", "Paris, France", "Paris"]}]
    assert L.load_nq_open(_jsonl(tmp_path / "nq.jsonl", rows)) == [
        {"question": "where is the eiffel tower", "answer": ["Paris", "Paris, France"]}]
    with pytest.raises(ValueError, match=r"nq_bad\.jsonl:2: field 'answer' must be a non-empty list"):
        L.load_nq_open(_jsonl(tmp_path / "nq_bad.jsonl", [rows[0], {"question": "q", "answer": []}]))


def test_webquestions_hub_schema_and_original_array(tmp_path):
    hub = [{"url": "http://www.freebase.com/view/en/justin_bieber", "question": "what is the name of justin bieber brother?",
            "answers": ["Jazmyn Bieber", "Jaxon Bieber"]}]
    assert L.load_webquestions(_jsonl(tmp_path / "wq.jsonl", hub))[0]["answer"] == ["Jazmyn Bieber", "Jaxon Bieber"]
    array = [{"qId": "wqr000001", "qText": "what is the name of justin bieber brother?", "answers": ["Jazmyn Bieber"]},
             {"url": "u", "targetValue": '(list (description "Jaxon Bieber") (description Canada))',
              "utterance": "who?"}]
    (tmp_path / "wq.json").write_text(json.dumps(array, indent=2))
    items = L.load_webquestions(tmp_path / "wq.json")
    assert items == [{"question": "what is the name of justin bieber brother?", "answer": ["Jazmyn Bieber"]},
                     {"question": "who?", "answer": ["Jaxon Bieber", "Canada"]}]
    bad = array[:1] + [{"qId": "wqr000002", "qText": "q?", "answers": "not a list", "extra": None}]
    bad[1]["answers"] = 42
    (tmp_path / "wq_bad.json").write_text(json.dumps(bad, indent=2))
    line = [i for i, x in enumerate((tmp_path / "wq_bad.json").read_text().splitlines(), 1) if x == "  {"][1]
    with pytest.raises(ValueError, match=rf"wq_bad\.json:{line}: field 'answers'"):
        L.load_webquestions(tmp_path / "wq_bad.json")


def test_triviaqa_both_schemas(tmp_path):
    hub = {"question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?", "question_id": "tc_33",
           "answer": {"aliases": ["Sunset Blvd", "Sunset Boulevard"], "normalized_aliases": ["sunset blvd"],
                      "value": "Sunset Boulevard", "normalized_value": "sunset boulevard", "type": "WikipediaEntity"}}
    flat = {"question": "Who wrote Hamlet?", "answer": "William Shakespeare", "aliases": ["Shakespeare"]}
    items = L.load_triviaqa(_jsonl(tmp_path / "tq.jsonl", [hub, flat]))
    assert items[0]["answer"] == ["Sunset Boulevard", "Sunset Blvd"]
    assert items[1] == {"question": "Who wrote Hamlet?", "answer": ["William Shakespeare", "Shakespeare"]}
    with pytest.raises(ValueError, match=r"tq_bad\.jsonl:2: field 'answer.aliases'"):
        L.load_triviaqa(_jsonl(tmp_path / "tq_bad.jsonl", [hub, dict(hub, answer={"aliases": [1]})]))
    with pytest.raises(ValueError, match=r"tq_bad2\.jsonl:1: expected an object"):
        L.load_triviaqa(_jsonl(tmp_path / "tq_bad2.jsonl", [["a", "list"]]))


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "q1", "answer": {"aliases": ["a"], "value": "A"}}, {"question": "q2", "answer": {}}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match=r"mandarjoshi/trivia_qa\[validation\] row 1: field 'answer.aliases'"):
        L.load_triviaqa("mandarjoshi/trivia_qa")
    assert calls == [("mandarjoshi/trivia_qa", "rc.nocontext", "validation")]
    assert L.load_triviaqa("mandarjoshi/trivia_qa", limit=1) == [{"question": "q1", "answer": ["A", "a"]}]


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        L.load_lambada(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="choose one of lambada"):
        L.load_task("squad", tmp_path)
    # offline, a hub id that is not cached fails with a message naming it
    with pytest.raises(ValueError, match="could not load 'no-such-org/no-such-set'"):
        L.load_nq_open("no-such-org/no-such-set")


def test_llm_foundry_lambada_and_triviaqa(tmp_path):
    """llm-foundry's local_data files: LAMBADA as context/continuation, TriviaQA as context/answer/aliases."""
    lam = _jsonl(tmp_path / "lambada_openai.jsonl", [
        {"context": "he opened the door and saw his", "continuation": " brother"},
        {"context": "she sat down and read the", "continuation": "letter"},  # no space on either side
    ])
    assert L.load_lambada(lam) == [
        {"text": "he opened the door and saw his brother", "context": "he opened the door and saw his",
         "continuation": " brother"},
        {"text": "she sat down and read the letter", "context": "she sat down and read the",
         "continuation": " letter"},
    ]
    with pytest.raises(ValueError, match=r"lam_bad\.jsonl:1: field 'continuation'"):
        L.load_lambada(_jsonl(tmp_path / "lam_bad.jsonl", [{"context": "no target here"}]))
    tq = _jsonl(tmp_path / "triviaqa.jsonl", [
        {"context": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
         "answer": "Sunset Boulevard", "aliases": ["Sunset Blvd", "Sunset Boulevard", "Sunset Blvd."]},
    ])
    assert L.load_triviaqa(tq) == [{"question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
                                    "answer": ["Sunset Boulevard", "Sunset Blvd", "Sunset Blvd."]}]
