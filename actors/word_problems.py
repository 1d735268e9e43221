"""Multi-step word problems from templates: shopping, ages and travel stories.

Each story opens with a value and changes it once per step; the worked solution has one line per
step, so the answer is always an exact integer that the steps derive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kemi", "Liam", "Mei", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara")
MAX_WORD_STEPS = len(_NAMES) - 1  # an ages story names a new person per step
_GOODS = ("notebooks", "pens", "apples", "stickers", "candles", "mugs")
_CHORES = ("for walking a dog", "for washing a car", "for tutoring", "for mowing a lawn")


@dataclass
class _Story:
    """Who a word problem is about; ages stories add a person per step."""

    people: list[str]
    named: int = 1  # people[:named] have appeared

    @property
    def name(self) -> str:
        return self.people[0]

    @property
    def last(self) -> str:
        return self.people[self.named - 1]

    def introduce(self) -> tuple[str, str]:
        """(the new person, the one before them)."""
        self.named += 1
        return self.people[self.named - 1], self.people[self.named - 2]


# A step turns the running value into a new one: (sentence, worked line, new value), or None
# when it does not fit the value (spending more than is left). Every theme has, for any value,
# some step that fits (earn; older or younger; ride), so picking steps at random ends.
_Step = Callable[[random.Random, int, _Story], "tuple[str, str, int] | None"]


def _shop_buy(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    n, price = rng.randint(2, 6), rng.randint(2, 9)
    if n * price > v:
        return None
    goods, cost = rng.choice(_GOODS), n * price
    return (f"{story.name} buys {n} {goods} for ${price} each.",
            f"{n} {goods} cost {n} * {price} = {cost} dollars, so {v} - {cost} = {v - cost}.", v - cost)


def _shop_earn(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    m = rng.randint(5, 40)
    return f"{story.name} earns ${m} {rng.choice(_CHORES)}.", f"{v} + {m} = {v + m}.", v + m


def _shop_gift(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    m = rng.randint(3, 30)
    if m > v:
        return None
    return f"{story.name} spends ${m} on a gift.", f"{v} - {m} = {v - m}.", v - m


def _age_older(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    k = rng.randint(2, 15)
    if v + k > 95:
        return None  # younger always fits such an old person
    who, than = story.introduce()
    return f"{who} is {k} years older than {than}.", f"{who} is {v} + {k} = {v + k}.", v + k


def _age_younger(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    k = rng.randint(1, 12)
    if k >= v:
        return None
    who, than = story.introduce()
    return f"{who} is {k} years younger than {than}.", f"{who} is {v} - {k} = {v - k}.", v - k


def _age_times(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    m = rng.choice((2, 3))
    if v * m > 90:
        return None
    who, than = story.introduce()
    word = "twice" if m == 2 else "three times"
    return f"{who} is {word} as old as {than}.", f"{who} is {v} * {m} = {v * m}.", v * m


def _age_half(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    if v % 2 or v < 4:
        return None
    who, than = story.introduce()
    return f"{who} is half as old as {than}.", f"{who} is {v} / 2 = {v // 2}.", v // 2


def _trip_ride(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    speed, hours = rng.randint(8, 25), rng.randint(1, 4)
    km = speed * hours
    return (f"Then {story.name} rides at {speed} km per hour for {hours} hours.",
            f"{speed} * {hours} = {km} km more, so {v} + {km} = {v + km}.", v + km)


def _trip_walk(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    d = rng.randint(1, 9)
    return f"Then {story.name} walks {d} km further.", f"{v} + {d} = {v + d}.", v + d


def _trip_back(rng: random.Random, v: int, story: _Story) -> tuple[str, str, int] | None:
    d = rng.randint(2, 20)
    if d >= v:
        return None
    return f"Then {story.name} turns back toward the start for {d} km.", f"{v} - {d} = {v - d}.", v - d


def _open_shop(rng: random.Random, story: _Story) -> tuple[str, str, int]:
    v = rng.randint(20, 120)
    return f"{story.name} has ${v}.", f"{story.name} starts with {v} dollars.", v


def _open_ages(rng: random.Random, story: _Story) -> tuple[str, str, int]:
    v = rng.randint(4, 40)
    return f"{story.name} is {v} years old.", f"{story.name} is {v}.", v


def _open_trip(rng: random.Random, story: _Story) -> tuple[str, str, int]:
    speed, hours = rng.randint(8, 25), rng.randint(1, 4)
    return (f"{story.name} rides a bike along a straight road at {speed} km per hour for {hours} hours.",
            f"First {speed} * {hours} = {speed * hours} km.", speed * hours)


@dataclass(frozen=True)
class _Theme:
    opening: Callable[[random.Random, _Story], tuple[str, str, int]]
    steps: tuple[_Step, ...]
    question: Callable[[_Story], str]


_THEMES = {
    "shopping": _Theme(_open_shop, (_shop_earn, _shop_buy, _shop_gift),
                       lambda s: f"How many dollars does {s.name} have now?"),
    "ages": _Theme(_open_ages, (_age_older, _age_younger, _age_times, _age_half), lambda s: f"How old is {s.last}?"),
    "travel": _Theme(_open_trip, (_trip_ride, _trip_walk, _trip_back),
                     lambda s: f"How many km from the start is {s.name} now?"),
}


def draw_word_problem(rng: random.Random, difficulty: int) -> tuple[str, str, int]:
    """(prompt, worked solution, answer) of a story with `difficulty` steps after its opening."""
    theme = _THEMES[rng.choice(sorted(_THEMES))]
    story = _Story(rng.sample(_NAMES, difficulty + 1))
    sentence, line, value = theme.opening(rng, story)
    text, work = [sentence], [line]
    for _ in range(difficulty):
        sentence, line, value = _pick_step(rng, theme.steps, value, story)
        text.append(sentence)
        work.append(line)
    prompt = " ".join(text) + " " + theme.question(story)
    return prompt, "\n".join(f"Step {i}: {w}" for i, w in enumerate(work, 1)), value


def _pick_step(rng: random.Random, steps: tuple[_Step, ...], value: int, story: _Story) -> tuple[str, str, int]:
    while True:  # a step that does not fit is redrawn; one always fits (see _Step)
        made = rng.choice(steps)(rng, value, story)
        if made is not None:
            return made


