"""Captions of the text-to-image demo: named colours, garment names, templates, and the parse back.

A caption names one Fashion-MNIST class (by one of its words: "sneaker", "trainer", ...) and one of
`COLOURS` (by its name or a synonym: "red", "crimson", ...) through one of `TEMPLATES`. `parse`
inverts any caption these pieces can make, and finds the (class, colour) a free-form prompt names
when it names exactly one of each; otherwise it returns None (the prompt cannot be scored).
`HELD_OUT` lists the (class, colour) pairs kept out of training, for compositional generalisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "CLASS_WORDS",
    "COLOURS",
    "HELD_OUT",
    "TEMPLATES",
    "Colour",
    "caption",
    "fix_articles",
    "parse",
    "training_pairs",
]


@dataclass(frozen=True)
class Colour:
    """A named tint: the RGB a garment's intensity is multiplied by, and the words for it."""

    name: str
    rgb: tuple[float, float, float]  # max channel 1.0, so that the intensity is the max over channels
    synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


COLOURS: tuple[Colour, ...] = (
    Colour("red", (1.0, 0.12, 0.12), ("crimson", "scarlet")),
    Colour("orange", (1.0, 0.55, 0.08), ("tangerine",)),
    Colour("yellow", (1.0, 0.92, 0.1), ("golden",)),
    Colour("green", (0.12, 0.9, 0.2), ("emerald",)),
    Colour("blue", (0.15, 0.4, 1.0), ("azure",)),
    Colour("purple", (0.68, 0.2, 1.0), ("violet",)),
)

# Fashion-MNIST class index -> the words a caption may use for it (the first is the plain name)
CLASS_WORDS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "top"),
    ("trousers", "pants"),
    ("pullover", "sweater", "jumper"),
    ("dress",),
    ("coat", "jacket"),
    ("sandal",),
    ("shirt", "blouse"),
    ("sneaker", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)

TEMPLATES: tuple[str, ...] = (
    "a {colour} {garment}",
    "{garment}, {colour}",
    "a photo of a {colour} {garment}",
    "{colour} {garment}",
    "a {garment} in {colour}",
    "an image of a {colour} {garment}",
)

# (class, colour index) pairs never seen in training: one per colour, six distinct classes (10%)
HELD_OUT: frozenset[tuple[int, int]] = frozenset({(8, 0), (7, 1), (3, 2), (0, 3), (9, 4), (4, 5)})


def training_pairs() -> list[tuple[int, int]]:
    """Every (class, colour) pair training may use: all but `HELD_OUT`."""
    return [(c, k) for c in range(len(CLASS_WORDS)) for k in range(len(COLOURS)) if (c, k) not in HELD_OUT]


def fix_articles(text: str) -> str:
    """ "a" before a vowel becomes "an" ("an orange bag")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(cls: int, colour: int, g: torch.Generator | None = None, *, plain: bool = False) -> str:
    """A caption for (class, colour): template and words drawn with `g`, or the first of each with
    ``plain`` (the evaluation prompts: "a red sneaker")."""
    if plain:
        return fix_articles(TEMPLATES[0].format(colour=COLOURS[colour].name, garment=CLASS_WORDS[cls][0]))

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    return fix_articles(
        pick(TEMPLATES).format(colour=pick(COLOURS[colour].words), garment=pick(CLASS_WORDS[cls]))
    )


def _index(words_per_item) -> list[tuple[re.Pattern, int]]:
    pats = []
    for i, words in enumerate(words_per_item):
        for w in words:
            pats.append((re.compile(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])"), i))
    return pats


_CLASS_PATTERNS = _index(CLASS_WORDS)
_COLOUR_PATTERNS = _index(c.words for c in COLOURS)


def _found(patterns, text: str) -> set[int]:
    hits = set()
    masked = text
    # longest words first, so that "ankle boot" is not also read as "boot", nor "t-shirt" as "shirt"
    for pat, i in sorted(patterns, key=lambda p: -len(p[0].pattern)):
        if pat.search(masked):
            hits.add(i)
            masked = pat.sub(" ", masked)
    return hits


def parse(text: str) -> tuple[int, int] | None:
    """(class, colour index) of a prompt that names exactly one garment class and one colour; None
    for any other prompt (an unknown garment or colour, or several)."""
    t = text.lower()
    classes, colours = _found(_CLASS_PATTERNS, t), _found(_COLOUR_PATTERNS, t)
    if len(classes) != 1 or len(colours) != 1:
        return None
    return next(iter(classes)), next(iter(colours))
