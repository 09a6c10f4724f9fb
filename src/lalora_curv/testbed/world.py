"""A procedural world for the embedded benchmark, generated from a seed.

Memorised facts (source) and arithmetic word problems (target); nothing is read from disk.

Source sub-domains, scored as 4-way multiple choice (in the spirit of HellaSwag, WinoGrande and
ARC: knowledge the pretrained model holds):

* ``colours``: ``"the colour of {e} is"`` -> ``" {colour}"``;
* ``friends``: ``"the friend of {e} is"`` -> ``" {entity}"``;
* ``kinds``: ``"{e} is a kind of"`` -> ``" {kind}"``.

Target domain, scored by generated exact match (in the spirit of GSM8K):
``"question : {e} has {a} stones and finds {b} more . answer :"`` -> ``" {a + b}"``, ``b`` in
1-3 (counting on), numbers single tokens 0-99; test problems name other entities than training
ones. A second target for sequential tasks, :meth:`World.holdings`, asks how many stones each
entity has (new facts). Pretraining text holds every fact sentence and
counting strings (``"count : 17 18 19 ..."``), without which small models cannot learn the
arithmetic (see the project's testbed notes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lalora_curv.tasks.multiple_choice import MultipleChoiceItem

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
KINDS = ("bird", "fish", "tree", "stone", "cloud", "flower")
SOURCES = ("colours", "friends", "kinds")
MAX_NUMBER = 99
TEMPLATE_WORDS = (
    "the",
    "colour",
    "of",
    "is",
    "friend",
    "a",
    "kind",
    "question",
    "has",
    "stones",
    "and",
    "finds",
    "more",
    "how",
    "many",
    "does",
    "have",
    "answer",
    "count",
    ".",
    ":",
    "?",
)


@dataclass
class World:
    """Entities and their facts, and the target problems, from ``seed``."""

    seed: int = 0
    num_entities: int = 48
    entities: list[str] = field(init=False)
    colour: dict[str, str] = field(init=False)
    friend: dict[str, str] = field(init=False)
    kind: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        consonants, vowels = "bdfgklmnprstvz", "aeiou"
        names: set[str] = set()
        while len(names) < self.num_entities:
            names.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)))
        self.entities = sorted(names)
        self.colour = {e: rng.choice(COLOURS) for e in self.entities}
        self.kind = {e: rng.choice(KINDS) for e in self.entities}
        self.friend = {e: rng.choice([x for x in self.entities if x != e]) for e in self.entities}

    @property
    def vocabulary(self) -> list[str]:
        """Every word of the world: template words, colours, kinds, entities, numbers 0-99."""
        numbers = [str(n) for n in range(MAX_NUMBER + 1)]
        return [*TEMPLATE_WORDS, *COLOURS, *KINDS, *self.entities, *numbers]

    # ---------------------------------------------------------------- source
    def fact(self, source: str, e: str) -> tuple[str, str]:
        """(context, answer) of one fact."""
        if source == "colours":
            return f"the colour of {e} is", self.colour[e]
        if source == "friends":
            return f"the friend of {e} is", self.friend[e]
        return f"{e} is a kind of", self.kind[e]

    def source_items(self, source: str) -> list[MultipleChoiceItem]:
        """4-way multiple choice over every entity, distractors drawn with a fixed seed."""
        rng = random.Random(f"{self.seed}/{source}")
        pool = {"colours": COLOURS, "kinds": KINDS}.get(source, tuple(self.entities))
        items = []
        for e in self.entities:
            context, answer = self.fact(source, e)
            options = [answer, *rng.sample([x for x in pool if x != answer], 3)]
            rng.shuffle(options)
            items.append(
                MultipleChoiceItem(
                    (context,) * 4, tuple(" " + o for o in options), options.index(answer), True
                )
            )
        return items

    # ---------------------------------------------------------------- target
    def problems(self, split: str, n: int) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) word problems.

        Train and test share the numbers (a tiny model learns the target's facts, it does not
        generalise arithmetic) but not the people: the test problems name entities that no
        training problem names.
        """
        rng = random.Random(f"{self.seed}/problems/{split}")
        people = self.entities[split == "test" :: 2]
        out = []
        for _ in range(n):
            a, b = rng.randint(0, MAX_NUMBER - 3), rng.randint(1, 3)  # counting on from a
            e = rng.choice(people)
            out.append(
                (f"question : {e} has {a} stones and finds {b} more . answer :", f" {a + b}")
            )
        return out

    # ---------------------------------------------------------------- a second target
    def holdings(self) -> list[tuple[str, str]]:
        """A second target task (sequential tasks): every entity holds a number of stones.

        ``"question : how many stones does {e} have ? answer :"`` -> ``" {n}"``, new facts
        to memorise (train = test, like the source facts) whose template shares words with the
        word problems, so that learning it interferes with them. Drawn from its own seed: the
        world's other content is unchanged.
        """
        rng = random.Random(f"{self.seed}/holdings")
        return [
            (
                f"question : how many stones does {e} have ? answer :",
                f" {rng.randint(0, MAX_NUMBER)}",
            )
            for e in self.entities
        ]

    # ---------------------------------------------------------------- pretraining
    def pretraining_texts(self, rng: random.Random, n: int) -> list[str]:
        """``n`` sentences: facts (three quarters) and counting strings."""
        texts = []
        for _ in range(n):
            if rng.random() < 0.75:
                context, answer = self.fact(rng.choice(SOURCES), rng.choice(self.entities))
                texts.append(f"{context} {answer} .")
            else:
                start = rng.randint(0, MAX_NUMBER - 8)
                texts.append("count : " + " ".join(str(k) for k in range(start, start + 8)))
        return texts
