"""The embedded default corpus: a seeded world of invented people, and its evaluation sets.

No model or data set can be downloaded where the project runs, so it makes its own text:
invented people with facts (birth year and city, university, field, employer), rendered
into biographies by many paraphrase templates in varied order; short stories whose last
word is fixed by their context; and question-answer documents for half of the people.
The evaluation sets use the schemas of real benchmarks so one evaluator serves both:

- ``completion.jsonl`` ``{"text"}`` (LAMBADA): predict the last whitespace-separated word
  (the text ends with it, no punctuation after it); held-out story instances;
- ``choice.jsonl`` ``{"ctx", "endings": [4], "label"}`` (HellaSwag): the ending continues
  ``ctx + " "``; one true fact and three values of the same attribute, about anyone;
- ``qa.jsonl`` ``{"question", "answer": [aliases]}`` (NQ-open): about the half of the
  people whose QA pairs were held out of training, so their facts are only in biographies;
- ``qa_fewshot.jsonl``: a few training pairs in the same schema, for few-shot prompts.

Sizes (training tokens with the world's own tokenizer at seed 0, one eos per document;
``world.json`` has the exact counts): ``tiny`` 40 people, 779 documents, ~32k tokens (tests);
``small`` 100 people, 1,645 documents, ~68k; ``default`` 200 people (the main job),
12,982 documents, ~580k tokens (399k of them biographies, 40-50 per person; 4 QA
documents per QA-trained person), so the default teacher's 1,500 steps of 16 x 128
tokens (3.07M tokens) are ~5 passes over everything and
~240 sightings of each fact: a 4x256 model was measured to need ~30 passes over a fact
before held-out QA works, and many renderings per fact (rather than many passes over a
few) keep the teacher from memorising documents, which is what makes its soft labels
worth distilling (:data:`SIZES`). More people at the same budget means fewer sightings
per fact, and held-out QA collapses.

Pure Python (``random.Random(seed)``) and byte-identical for a seed; torch is never imported.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from kd.cache import building_dir, fingerprint
from kd.config import WORLD_SIZES, ConfigError
from kd.paths import cache_dir
from kd.world_render import (ATTRIBUTES, CHOICE_CONTEXTS, STORY_TEMPLATES, Person, Pools,
                             answer_aliases, make_people, make_pools, question, render_bio,
                             render_story)

#: Bump whenever generation changes what a (size, seed) produces: it is in the fingerprint.
WORLD_VERSION = 4

#: The QA text format, the same in training documents and evaluation prompts. A prompt is
#: the template cut before `` {answer}``; generation stops at a newline.
QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

#: 2048 ids: the world's text is a few hundred template words plus a few hundred invented
#: names, so 2048 gives whole words for the template vocabulary and one to three tokens per
#: name, while the embedding matrix stays small next to the transformer (0.4M of the 4x192
#: default teacher's 2.2M parameters), so students of different depth and width differ in their
#: transformer, and dense teacher soft labels stay cheap.
VOCAB_SIZE = 2048


@dataclass(frozen=True)
class WorldSize:
    people: int
    train_stories: int
    completion: int
    val_stories: int
    choice_per_person: int = 2
    # Many renderings per person, few passes over each: a teacher sees every fact ~100
    # times either way (measured: facts need 30+ passes), but with 2-4 bios and 300
    # stories the default teacher made 34 passes over one 46K-token corpus and memorised
    # its documents: validation loss rose from 1.28 (step 190) to 1.78 (step 760), CE-only
    # students beat it on validation loss, and distilling from it hurt (QA EM 0.29). With
    # 8-12 bios and 3x the stories (12 passes over 134K tokens) the same teacher reaches
    # validation loss 0.71-0.82, QA EM 0.81, multiple choice 0.98, completion 0.50.
    bios_per_person: tuple[int, int] = (8, 12)
    fewshot: int = 5
    # QA documents per QA-trained person (each asks all five facts, in fresh wordings and
    # order): the QA format's share of the text, which a student must see enough of in its
    # few hundred steps to answer questions about the held-out half.
    qa_docs_per_person: int = 1


SIZES: dict[str, WorldSize] = {
    # Stories: ~6 instances per template at least, or a model cannot learn to copy the
    # earlier word (40 stories for 18 templates gave tiny completion accuracy 0.03).
    "tiny": WorldSize(people=40, train_stories=360, completion=60, val_stories=30),
    "small": WorldSize(people=100, train_stories=600, completion=150, val_stories=50),
    # The main job's world: 4x the renderings of version 3 (8-12 bios, 900 stories), at
    # which the default teacher made 15 passes and memorised its documents (training loss
    # 0.05 nats/token, validation 1.02): on its own training text its soft labels were
    # one-hot (top probability 0.97 on average), so distilling them taught a student no
    # more than the labels, and CE-only students beat it on validation. With 40-50 bios and
    # 3,600 stories the same teacher ends at training loss 0.52, validation 0.54, acc_mean
    # 0.93 (0.75 before), and distilling from it beats CE-only: completion 0.52 +- 0.01
    # against 0.41 +- 0.03 over 3 seeds (BENCHMARKS.md). Four QA documents per person keep
    # the QA format's share of the text (1.5% with one, the students' QA swung 0.54-0.65
    # between seeds); the teacher then answers 99.6% of held-out questions.
    "default": WorldSize(people=200, train_stories=3600, completion=300, val_stories=75,
                         bios_per_person=(40, 50), qa_docs_per_person=4),
}
assert tuple(SIZES) == WORLD_SIZES


@dataclass
class World:
    """A generated world in memory: documents (plain text) and evaluation records."""

    size: str
    seed: int
    people: list[Person]
    qa_trained: list[Person]
    """People whose QA pairs are in training; the others are asked about in ``qa``."""
    qa_heldout: list[Person]
    train: list[str]
    train_kinds: list[str]
    """Parallel to ``train``: ``bio``, ``qa`` or ``story``."""
    val: list[str]
    completion: list[dict]
    choice: list[dict]
    qa: list[dict]
    qa_fewshot: list[dict]
    counts: dict[str, int] = field(default_factory=dict)


def _check_size(size: str) -> WorldSize:
    if size not in SIZES:
        raise ConfigError(f"data.world_size={size!r} is not allowed: choose one of {', '.join(SIZES)}")
    return SIZES[size]


def _qa_pairs(rng: random.Random, person: Person) -> list[tuple[str, str, str]]:
    """``(question, attribute, answer)`` for every fact of ``person``, in random order."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return [(question(rng, person, a), a, person.fact(a)) for a in attrs]


def _choice_item(rng: random.Random, person: Person, attribute: str, pools: Pools) -> dict:
    true = person.fact(attribute)
    endings = rng.sample([v for v in pools.values(attribute) if v != true], 3)
    label = rng.randrange(4)
    endings.insert(label, true)
    return {"ctx": CHOICE_CONTEXTS[attribute].format(name=person.name), "endings": endings,
            "label": label}


def _stories(rng: random.Random, n: int, pools: Pools, seen: set[str]) -> list[tuple[str, str]]:
    """``n`` story instances whose text is not in ``seen`` (updated), cycling templates."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        text, target = render_story(rng, STORY_TEMPLATES[len(out) % len(STORY_TEMPLATES)], pools)
        if text not in seen:
            seen.add(text)
            out.append((text, target))
    return out


def generate_world(size: str = "default", seed: int = 0) -> World:
    """Generate the world of ``size`` (tiny, small, default) from ``seed``, in memory."""
    spec = _check_size(size)
    rng = random.Random(seed)
    pools = make_pools(rng, spec.people)
    people = make_people(rng, spec.people, pools)
    order = list(range(len(people)))
    rng.shuffle(order)
    half = len(people) // 2
    qa_trained = [people[i] for i in sorted(order[:half])]
    qa_heldout = [people[i] for i in sorted(order[half:])]

    bios: list[str] = []
    for p in people:
        texts: list[str] = []
        k = rng.randint(*spec.bios_per_person)
        while len(texts) < k:
            t = render_bio(rng, p)
            if t not in texts:
                texts.append(t)
        bios.extend(texts)
    qa_pairs = [_qa_pairs(rng, p) for p in qa_trained]
    # Further renderings only where the size asks for them, so that a size with one QA
    # document per person draws what it always drew.
    more = [_qa_pairs(rng, p) for _ in range(spec.qa_docs_per_person - 1) for p in qa_trained]
    qa_docs = ["\n\n".join(QA_TEMPLATE.format(question=q, answer=v) for q, _, v in pairs)
               for pairs in qa_pairs + more]
    seen_stories: set[str] = set()
    train_stories = [t + "." for t, _ in _stories(rng, spec.train_stories, pools, seen_stories)]
    tagged = [("bio", t) for t in bios] + [("qa", t) for t in qa_docs] + [("story", t) for t in train_stories]
    rng.shuffle(tagged)
    train = [t for _, t in tagged]
    train_kinds = [k for k, _ in tagged]

    # Validation: fresh renderings (a biography per person not in training) and new stories.
    seen_bios = set(bios)
    val: list[str] = []
    for p in people:
        t = render_bio(rng, p)
        while t in seen_bios:
            t = render_bio(rng, p)
        val.append(t)
    val += [t + "." for t, _ in _stories(rng, spec.val_stories, pools, seen_stories)]

    completion = [{"text": t} for t, _ in _stories(rng, spec.completion, pools, seen_stories)]
    choice = [_choice_item(rng, p, a, pools)
              for p in people for a in rng.sample(ATTRIBUTES, spec.choice_per_person)]
    qa = [{"question": question(rng, p, a), "answer": answer_aliases(a, p.fact(a))}
          for p in qa_heldout for a in ATTRIBUTES]
    # Few-shot examples are pairs seen in training, one per person, attributes rotating.
    qa_fewshot = [{"question": q, "answer": answer_aliases(a, v)}
                  for i, pairs in enumerate(rng.sample(qa_pairs, spec.fewshot))
                  for q, a, v in pairs if a == ATTRIBUTES[i % len(ATTRIBUTES)]]

    counts = {"people": len(people), "qa_trained_people": len(qa_trained),
              "qa_heldout_people": len(qa_heldout), "train_docs": len(train),
              "train_bios": len(bios), "train_qa_docs": len(qa_docs),
              "train_stories": len(train_stories), "val_docs": len(val),
              "completion": len(completion), "choice": len(choice), "qa": len(qa),
              "qa_fewshot": len(qa_fewshot)}
    return World(size, seed, people, qa_trained, qa_heldout, train, train_kinds, val, completion,
                 choice, qa, qa_fewshot, counts)


# ------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def _n_tokens(tokenizer, texts: list[str]) -> int:
    """Tokens of ``texts`` packed as training sees them: each document plus one eos."""
    enc = tokenizer.backend_tokenizer.encode_batch(texts)
    return sum(len(e.ids) + 1 for e in enc)


# ----------------------------------------------------------------------- files


def world_fingerprint(size: str, seed: int) -> str:
    return fingerprint({"kind": "world", "world_version": WORLD_VERSION, "size": size, "seed": seed})


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_world(world: World, out: Path) -> dict:
    """Write every file of ``world`` (and its tokenizer) into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", [{"text": t} for t in world.train])
    _write_jsonl(out / "val.jsonl", [{"text": t} for t in world.val])
    _write_jsonl(out / "completion.jsonl", world.completion)
    _write_jsonl(out / "choice.jsonl", world.choice)
    _write_jsonl(out / "qa.jsonl", world.qa)
    _write_jsonl(out / "qa_fewshot.jsonl", world.qa_fewshot)
    tokenizer = train_tokenizer(world.train)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    tokens = {"train": _n_tokens(tokenizer, world.train), "val": _n_tokens(tokenizer, world.val)}
    for kind in ("bio", "qa", "story"):
        tokens[f"train_{kind}"] = _n_tokens(tokenizer, [t for t, k in zip(world.train, world.train_kinds)
                                                        if k == kind])
    info = {
        "world_version": WORLD_VERSION, "size": world.size, "seed": world.seed,
        "fingerprint": world_fingerprint(world.size, world.seed),
        "counts": world.counts,
        "tokens": tokens,
        "vocab_size": len(tokenizer),
        "files": ["train.jsonl", "val.jsonl", "completion.jsonl", "choice.jsonl", "qa.jsonl",
                  "qa_fewshot.jsonl", "tokenizer/"],
    }
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_world(size: str = "default", seed: int = 0) -> Path:
    """Build the world once under ``cache_dir()/worlds/<fingerprint>/``; return that directory.

    A second call (any process) is a cache hit. The files are written to a temporary
    directory beside the target and renamed into place (:func:`kd.cache.building_dir`), so
    an interrupted build leaves no half-written world; a directory there without
    ``world.json`` is such a leftover and is replaced.
    """
    _check_size(size)
    final = cache_dir() / "worlds" / world_fingerprint(size, seed)
    if _world_complete(final):
        return final
    with building_dir(final, complete=_world_complete) as tmp:
        write_world(generate_world(size, seed), tmp)
    return final


def _world_complete(path: Path) -> bool:
    return (path / "world.json").is_file()
