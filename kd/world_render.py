"""The embedded world's vocabulary and templates: invented people, their facts, and text.

Pure Python and seeded: every function takes a ``random.Random`` and draws from it in a
fixed order, so one seed gives one world. Nothing here iterates over a set (string
hashing is randomised per process), so the output is byte-identical across runs.
:mod:`kd.world` assembles these pieces into documents and evaluation sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRIBUTES = ("birth_year", "birth_city", "university", "field", "employer")

# Syllables for invented names. Combinations are checked for uniqueness, not for
# resemblance to anyone: a full name is two invented words, which no real person has.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p",
           "r", "s", "st", "t", "th", "v", "w", "z", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd", "rk", "x", "th")
_SURNAME_ENDS = ("son", "wick", "holt", "ard", "mer", "ley", "ov", "ani", "ez", "berg", "ton", "ski")
_CITY_ENDS = ("holm", "port", "ford", "mere", "wick", "dale", "stead", "burg", "haven", "gate")
_UNI_FORMS = ("{x} University", "University of {x}", "{x} Institute of Technology", "{x} College")
_COMPANY_ENDS = ("Systems", "Labs", "Foods", "Shipping", "Bank", "Motors", "Press", "Textiles",
                 "Energy", "Pharma", "Robotics", "Insurance")
FIELDS = ("chemistry", "linguistics", "geology", "astronomy", "economics", "architecture",
          "botany", "mathematics", "philosophy", "medicine", "history", "music", "physics",
          "zoology", "sociology", "engineering", "law", "statistics", "agriculture", "oceanography")
YEARS = tuple(range(1940, 2000))


@dataclass(frozen=True)
class Person:
    """One invented person and their facts (values as they appear in text)."""

    name: str
    birth_year: str
    birth_city: str
    university: str
    field: str
    employer: str

    def fact(self, attribute: str) -> str:
        return getattr(self, attribute)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_syllables: int, end: str = "") -> str:
    return ("".join(_syllable(rng) for _ in range(n_syllables)) + end).capitalize()


def _unique(rng: random.Random, n: int, make, used: set[str]) -> list[str]:
    """``n`` new strings from ``make(rng)``, none in ``used`` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        w = make(rng)
        if w not in used and 4 <= len(w) <= 16:
            used.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Pools:
    """The value sets facts are drawn from (also the distractors of multiple choice)."""

    birth_year: tuple[str, ...]
    birth_city: tuple[str, ...]
    university: tuple[str, ...]
    field: tuple[str, ...]
    employer: tuple[str, ...]
    first_names: tuple[str, ...]
    story_names: tuple[str, ...]

    def values(self, attribute: str) -> tuple[str, ...]:
        return getattr(self, attribute)


def make_pools(rng: random.Random, n_people: int) -> Pools:
    used: set[str] = set()
    cities = _unique(rng, 40, lambda r: _word(r, 1, r.choice(_CITY_ENDS)), used)
    unis = [rng.choice(_UNI_FORMS).format(x=x)
            for x in _unique(rng, 24, lambda r: _word(r, 2), used)]
    companies = [f"{x} {rng.choice(_COMPANY_ENDS)}"
                 for x in _unique(rng, 30, lambda r: _word(r, 2), used)]
    # First names are shared by about two people each, as in life: a person is their full name.
    firsts = _unique(rng, max(8, n_people // 2), lambda r: _word(r, 2), used)
    story_names = _unique(rng, 40, lambda r: _word(r, 2), used)
    return Pools(tuple(str(y) for y in YEARS), tuple(cities), tuple(unis), FIELDS,
                 tuple(companies), tuple(firsts), tuple(story_names))


def make_people(rng: random.Random, n: int, pools: Pools) -> list[Person]:
    used = set(pools.first_names) | set(pools.story_names)
    lasts = _unique(rng, n, lambda r: _word(r, 1, r.choice(_SURNAME_ENDS)), used)
    people = []
    for last in lasts:  # surnames are unique, so full names are too
        people.append(Person(
            name=f"{rng.choice(pools.first_names)} {last}",
            **{a: rng.choice(pools.values(a)) for a in ATTRIBUTES},
        ))
    return people


def answer_aliases(attribute: str, value: str) -> list[str]:
    """Accepted answers: the value, plus the distinctive word of a school or company."""
    if attribute == "university":
        core = value.replace("University of ", "").replace(" University", "")
        core = core.replace(" Institute of Technology", "").replace(" College", "")
        return [value, core]
    if attribute == "employer":
        return [value, value.split(" ")[0]]
    return [value]


# ------------------------------------------------------------------- biographies

# One sentence per fact, the full name in every sentence (a model learns facts far
# better when each sentence names the person in full; measured on this world).
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{name} was born in {v}.",
        "{name} was born in the year {v}.",
        "{name} came into the world in {v}.",
        "The birth year of {name} is {v}.",
        "In {v}, {name} was born.",
        "{name} entered life in the year {v}.",
    ),
    "birth_city": (
        "{name} was born in the city of {v}.",
        "{name} is a native of {v}.",
        "The hometown of {name} is {v}.",
        "{v} is the birthplace of {name}.",
        "{name} first saw the light of day in {v}.",
        "The city where {name} was born is {v}.",
    ),
    "university": (
        "{name} graduated from {v}.",
        "{name} studied at {v}.",
        "{name} attended {v}.",
        "{name} received a degree from {v}.",
        "{v} is where {name} went to university.",
        "{name} earned a diploma at {v}.",
    ),
    "field": (
        "{name} majored in {v}.",
        "{name} chose to study {v}.",
        "The field of study of {name} is {v}.",
        "{name} devoted years of study to {v}.",
        "{name} has a background in {v}.",
        "{name} specialized in {v}.",
    ),
    "employer": (
        "{name} is employed by {v}.",
        "{name} works for {v}.",
        "{name} has a job at {v}.",
        "{v} employs {name}.",
        "{name} took a position at {v}.",
        "{name} earns a living at {v}.",
    ),
}

#: Multiple-choice contexts: prefixes of biography templates, so an ending is a fact.
CHOICE_CONTEXTS: dict[str, str] = {
    "birth_year": "{name} was born in the year",
    "birth_city": "{name} was born in the city of",
    "university": "{name} graduated from",
    "field": "{name} majored in",
    "employer": "{name} is employed by",
}


def render_bio(rng: random.Random, person: Person) -> str:
    """One biography: every fact once, each with a random template, in random order."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(rng.choice(BIO_TEMPLATES[a]).format(name=person.name, v=person.fact(a))
                    for a in attrs)


# ------------------------------------------------------------------------- QA

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_year": ("In what year was {name} born?", "When was {name} born?",
                   "What is the birth year of {name}?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?",
                   "What is the hometown of {name}?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "What university did {name} graduate from?"),
    "field": ("What did {name} study?", "What was the major of {name}?",
              "In which field did {name} specialize?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?",
                 "Where does {name} work?"),
}


def question(rng: random.Random, person: Person, attribute: str) -> str:
    return rng.choice(QUESTIONS[attribute]).format(name=person.name)


# ---------------------------------------------------------------------- stories

# LAMBADA-shaped: the final slot (after the last space) repeats a value introduced
# earlier, and the story between makes it the only sensible last word. Some stories
# carry a distractor of the same kind, so the model must track who had what.
OBJECTS = ("lantern", "umbrella", "compass", "notebook", "key", "scarf", "kettle", "violin",
           "telescope", "basket", "hammer", "candle", "blanket", "mirror", "clock", "ladder",
           "map", "whistle", "helmet", "camera", "bucket", "ribbon", "shovel", "flute",
           "teapot", "wallet", "pillow", "bicycle", "necklace", "rope")
PLACES = ("library", "garden", "kitchen", "market", "harbor", "museum", "station", "bakery",
          "theater", "park", "workshop", "chapel", "greenhouse", "stable", "attic")
ANIMALS = ("goat", "parrot", "rabbit", "donkey", "tortoise", "ferret", "goose", "hedgehog",
           "pony", "cat", "owl", "lamb", "duck", "dog", "pig")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "pink")
FOODS = ("pancakes", "dumplings", "soup", "pie", "bread", "noodles", "cheese", "biscuits",
         "porridge", "plums", "cherries", "stew", "muffins", "figs", "rice")
JOBS = ("baker", "carpenter", "plumber", "doctor", "tailor", "painter", "gardener",
        "teacher", "sailor", "mechanic", "locksmith", "fisher")

# Slots: a b c (names), o p (objects), pl (place), an (animal), co (color),
# f g (foods), j (job), t (town). The last slot of each template is the target.
STORY_TEMPLATES: tuple[str, ...] = (
    "{a} kept a small {o} in a drawer by the window. Every morning {a} checked that it was "
    "still there. One day a friend asked what was hidden in the drawer, and {a} smiled and "
    "took out the {o}",
    "{a} and {b} planted a garden together. {a} chose roses and {b} chose tulips. When summer "
    "came, the tulips died in the heat but the roses grew tall, and everyone thanked {a}",
    "{a} lost a {o} at the {pl}. {b} searched the whole {pl} for an hour. At last {b} found it "
    "under a bench and gave {a} back the {o}",
    "When {a} was a child, the family had a pet {an} that slept by the stove. Years later, "
    "whenever {a} saw a farm, {a} thought of that old {an}",
    "{a} painted the front door {co}. The neighbors said it was too bright, but {a} liked it. "
    "The next spring {a} painted the fence to match, so now the door and the fence are both {co}",
    "{a} baked {f} for the festival, and {b} brought {g}. By noon all the {g} was gone, but "
    "there was still plenty of {f}",
    "{a} borrowed a {o} from {b} and promised to return it on Friday. On Friday {a} knocked on "
    "the door of {b} and handed over the {o}",
    "The {an} at the farm of {a} escaped one night. {a} and {b} looked everywhere. At dawn "
    "they heard a noise in the barn, and there, asleep in the hay, was the {an}",
    "{a} has two cousins, {b} and {c}. {b} lives by the sea and {c} lives in the mountains. "
    "This winter {a} wants to go skiing, so the visit will be to {c}",
    "{a} ordered {f} and {b} ordered {g}. The waiter brought the {g} first, and a few minutes "
    "later he came back with the {f}",
    "{a} gave {b} a {o} and gave {c} a {p}. {b} wished for the {p} and asked to trade, so in "
    "the end {b} had the {p} and {c} had the {o}",
    "Before the long trip, {a} packed a {o} and a {p}. On the first night the {p} blew away "
    "in the wind, so the only thing left in the bag was the {o}",
    "{a} works as a {j} in {t}. When anyone in {t} needs a {j}, they knock on the door of {a}",
    "{a} and {b} met at the {pl} every Sunday. One Sunday {b} was sick, so {a} walked to the "
    "house of {b} instead of the {pl}. The next week they were both back at the {pl}",
    "{a} moved from {t} to the coast many years ago. Still, every summer {a} takes the slow "
    "train back home to {t}",
    "{a} bought a {co} hat and a {o}. On the way home {a} dropped the hat in a puddle, so "
    "only the {o} was still clean. The hat is no longer {co}",
    "The {an} of {a} and the {an2} of {b} were best friends. When {b} moved away, the {an2} "
    "went along, and the {an} of {a} waited at the gate for the {an2}",
    "{a} told {b} a secret: the old {o} in the {pl} was full of gold coins. That night {b} "
    "crept into the {pl} and opened the {o}",
)


def render_story(rng: random.Random, template: str, pools: Pools) -> tuple[str, str]:
    """Fill a story template; return ``(text without final punctuation, target word)``."""
    a, b, c = rng.sample(pools.story_names, 3)
    o, p = rng.sample(OBJECTS, 2)
    f, g = rng.sample(FOODS, 2)
    an, an2 = rng.sample(ANIMALS, 2)
    text = template.format(a=a, b=b, c=c, o=o, p=p, pl=rng.choice(PLACES), an=an, an2=an2,
                           co=rng.choice(COLORS), f=f, g=g, j=rng.choice(JOBS),
                           t=rng.choice(pools.birth_city))
    return text, text.rsplit(" ", 1)[1]
