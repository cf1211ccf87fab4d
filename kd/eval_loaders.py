"""Loaders for the public benchmark formats, normalised to the evaluators' three schemas.

- completion ``{"text"}`` (target = last space-separated word) or ``{"context",
  "continuation"}`` (target = the continuation, as llm-foundry's LAMBADA files have it): LAMBADA;
- choice ``{"ctx", "endings", "label"}``: HellaSwag, StoryCloze 2016;
- qa ``{"question", "answer": [aliases]}``: NQ-open, WebQuestions, TriviaQA.

Each loader takes a local file (.jsonl, a .json array or .jsonl content, .csv) or, when
the name is not a file, a hub dataset id read with ``datasets.load_dataset``. A row that
does not fit its schema raises a ValueError naming the file (or dataset) and line (or row).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class _Bad(Exception):
    """A row that does not fit; the loader adds where it is."""


# ---------------------------------------------------------------------------- rows


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array (WebQuestions' original files)
        dec, pos = json.JSONDecoder(), text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                row, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None
            yield f"{path}:{line}", row
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            try:
                yield f"{path}:{line}", json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _hub_rows(dataset_id: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # offline, unknown id, gated: say what was tried
        raise ValueError(f"could not load {dataset_id!r} (config {config!r}, split {split!r}): it is not a local "
                         f"file, and the hub said: {e}") from e
    for i, row in enumerate(ds):
        yield f"{dataset_id}[{split}] row {i}", row


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".csv"))


def read_rows(source: str | Path, *, config: str | None = None, split: str = "test") -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of a local file or hub dataset; ``where`` names file and line."""
    path = Path(source).expanduser()
    if path.is_file():
        return _csv_rows(path) if path.suffix == ".csv" else _json_rows(path)
    if path.is_dir() or _looks_like_path(str(source)):
        raise FileNotFoundError(f"data={str(source)!r}: no such file (expected a .jsonl, .json or .csv file, "
                                "or a hub dataset id)")
    return _hub_rows(str(source), config, split)


def _load(source: str | Path, convert: Callable[[Any], dict], *, config: str | None, split: str,
          limit: int | None) -> list[dict]:
    out: list[dict] = []
    for where, row in read_rows(source, config=config, split=split):
        if limit is not None and len(out) >= limit:
            break
        try:
            if not isinstance(row, dict):
                raise _Bad(f"expected an object, got {type(row).__name__}")
            out.append(convert(row))
        except _Bad as e:
            raise ValueError(f"{where}: {e}") from None
    return out


# ------------------------------------------------------------------------ checkers


def _str(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"field {key!r} must be a non-empty string, got {v!r}")
    return v


def _aliases(values: Any, key: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _Bad(f"field {key!r} must be a non-empty list of strings, got {values!r}")
    out = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    if not out:
        raise _Bad(f"field {key!r} has only empty answers")
    return out


def _label(value: Any, n: int, key: str, base: int = 0) -> int:
    try:
        label = int(value) - base
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < n:
        raise _Bad(f"field {key!r} must be an integer in {base}..{n - 1 + base}, got {value!r} "
                   "(a test split without labels cannot be scored)")
    return label


# ---------------------------------------------------------------------- converters


def _lambada(row: dict) -> dict:
    if "text" not in row and "context" in row:  # llm-foundry: {"context", "continuation": " word"}
        ctx, cont = _str(row, "context"), _str(row, "continuation")
        if not ctx[-1].isspace() and not cont[0].isspace():
            cont = " " + cont  # the word follows a space, as lm-eval's lambada_openai scores it
        return {"text": ctx + cont, "context": ctx, "continuation": cont}
    return {"text": _str(row, "text")}


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (WikiHow markup out, single spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    if "ctx_a" in row:
        ctx = _str(row, "ctx_a") + " " + str(row.get("ctx_b") or "").capitalize()
    else:
        ctx = _str(row, "ctx")
    if row.get("activity_label"):
        ctx = f"{row['activity_label']}: {ctx}"
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise _Bad(f"field 'endings' must be a list of at least 2 non-empty strings, got {endings!r}")
    return {"ctx": _hellaswag_clean(ctx), "endings": [_hellaswag_clean(e) for e in endings],
            "label": _label(row.get("label"), len(endings), "label")}


_STORY_KEYS = {  # the 2016 CSV's columns, and the hub `story_cloze` schema's
    "csv": ([f"InputSentence{i}" for i in range(1, 5)], ["RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"],
            "AnswerRightEnding"),
    "hub": ([f"input_sentence_{i}" for i in range(1, 5)], ["sentence_quiz1", "sentence_quiz2"],
            "answer_right_ending"),
}


def _storycloze(row: dict) -> dict:
    sentences, quiz, answer = _STORY_KEYS["hub" if "input_sentence_1" in row else "csv"]
    ctx = " ".join(_str(row, k).strip() for k in sentences)
    return {"ctx": ctx, "endings": [_str(row, k).strip() for k in quiz], "label": _label(row.get(answer), 2, answer, 1)}


def _nq_open(row: dict) -> dict:
    return {"question": _str(row, "question"), "answer": _aliases(row.get("answer"), "answer")}


_TARGET_VALUE = re.compile(r'\(description (?:"((?:[^"\\]|\\.)*)"|([^()]*?))\)')


def _webquestions(row: dict) -> dict:
    if "utterance" in row:  # Berant et al.'s release: targetValue "(list (description X) ...)"
        found = [a or b for a, b in _TARGET_VALUE.findall(str(row.get("targetValue", "")))]
        return {"question": _str(row, "utterance"), "answer": _aliases(found, "targetValue")}
    key = "qText" if "qText" in row else "question"
    return {"question": _str(row, key), "answer": _aliases(row.get("answers"), "answers")}


def _triviaqa(row: dict) -> dict:
    if "question" not in row and "context" in row:  # llm-foundry: {"context": question, "answer", "aliases"}
        row = {**row, "question": row["context"]}
    answer = row.get("answer")
    if isinstance(answer, dict):  # hub `trivia_qa`: {"value", "aliases", ...}
        values = [answer.get("value")] if isinstance(answer.get("value"), str) else []
        values += answer.get("aliases") or []
        return {"question": _str(row, "question"), "answer": _aliases(values, "answer.aliases")}
    values = ([answer] if isinstance(answer, str) else list(answer or [])) + list(row.get("aliases") or [])
    return {"question": _str(row, "question"), "answer": _aliases(values, "answer/aliases")}


# -------------------------------------------------------------------------- public

#: task -> (family, converter, default hub config, default split)
TASKS: dict[str, tuple[str, Callable[[dict], dict], str | None, str]] = {
    "lambada": ("completion", _lambada, None, "test"),
    "hellaswag": ("choice", _hellaswag, None, "validation"),
    "storycloze": ("choice", _storycloze, "2016", "validation"),
    "nq_open": ("qa", _nq_open, None, "validation"),
    "webquestions": ("qa", _webquestions, None, "test"),
    "triviaqa": ("qa", _triviaqa, "rc.nocontext", "validation"),
}


def load_task(task: str, source: str | Path, *, limit: int | None = None, config: str | None = None,
              split: str | None = None) -> list[dict]:
    """Items of a public benchmark in the evaluators' schema (see :data:`TASKS`)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known: choose one of {', '.join(TASKS)}")
    _, convert, default_config, default_split = TASKS[task]
    return _load(source, convert, config=config or default_config, split=split or default_split, limit=limit)


def load_lambada(source: str | Path, **kw: Any) -> list[dict]:
    """LAMBADA jsonl ``{"text"}`` (or hub ``EleutherAI/lambada_openai``) -> ``{"text"}``; llm-foundry's
    ``{"context", "continuation"}`` -> those two plus ``text``."""
    return load_task("lambada", source, **kw)


def load_hellaswag(source: str | Path, **kw: Any) -> list[dict]:
    """HellaSwag in the ``Rowan/hellaswag`` schema -> ``{"ctx", "endings", "label"}``, lm-eval's preprocessing."""
    return load_task("hellaswag", source, **kw)


def load_storycloze(source: str | Path, **kw: Any) -> list[dict]:
    """StoryCloze 2016 CSV (``InputSentence1..4``, ``RandomFifthSentenceQuiz1/2``, ``AnswerRightEnding``)."""
    return load_task("storycloze", source, **kw)


def load_nq_open(source: str | Path, **kw: Any) -> list[dict]:
    """NQ-open jsonl ``{"question", "answer": [...]}`` -> qa items."""
    return load_task("nq_open", source, **kw)


def load_webquestions(source: str | Path, **kw: Any) -> list[dict]:
    """WebQuestions: ``web_questions`` schema (``question``, ``answers``), the JSON array (``qText``,
    ``answers``) or Berant et al.'s ``utterance``/``targetValue`` -> qa items."""
    return load_task("webquestions", source, **kw)


def load_triviaqa(source: str | Path, **kw: Any) -> list[dict]:
    """TriviaQA: ``trivia_qa`` schema (``answer.aliases``), jsonl ``question``/``answer``/``aliases``, or
    llm-foundry's ``context``/``answer``/``aliases`` (the question in ``context``)."""
    return load_task("triviaqa", source, **kw)
