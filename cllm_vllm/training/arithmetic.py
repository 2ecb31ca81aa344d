"""GSM8K-style arithmetic word problems with step-by-step solutions, generated from templates.

The specialised domain of the bundled model: a narrow domain where a CLLM learns to emit
long stretches (the solution's fixed phrasing, the copied numbers) in one step. Problems
are deterministic in ``(seed, index)``; :func:`split` keeps the held-out set disjoint from
training by question text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

NAMES = ("Ann", "Ben", "Carla", "Dev", "Elif", "Farid", "Gina", "Hugo", "Ines", "Jon",
         "Kemal", "Lena", "Mia", "Nate", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
         "stamps", "eggs", "flowers", "coins")
THINGS = ("notebook", "pen", "sandwich", "ticket", "toy car", "plant", "mug", "hat")
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


def _t_buy_give(r: random.Random):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 60), r.randint(2, 40)
    c = r.randint(1, a + b)
    q = (f"{n} has {a} {it}. {n} buys {b} more {it} and then gives away {c}. "
         f"How many {it} does {n} have now?")
    s = (f"After buying, {n} has {a} + {b} = {a + b} {it}. After giving away {c}, "
         f"{n} has {a + b} - {c} = {a + b - c} {it}.")
    return q, s, a + b - c


def _t_packs(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 12), r.randint(2, 25)
    q = f"{n} buys {a} packs of {it}. Each pack has {b} {it}. How many {it} does {n} buy?"
    s = f"{n} buys {a} packs with {b} {it} each, so {a} * {b} = {a * b} {it}."
    return q, s, a * b


def _t_change(r):
    n, th = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(2, 20), r.randint(2, 9)
    c = a * b + r.randint(0, 50)
    q = (f"A {th} costs ${a}. {n} buys {b} of them and pays with ${c}. "
         f"How much change does {n} get?")
    s = (f"The {th}s cost {b} * {a} = ${a * b}. The change is {c} - {a * b} = "
         f"${c - a * b}.")
    return q, s, c - a * b


def _t_share(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    b, k = r.randint(2, 9), r.randint(2, 15)
    q = (f"{n} has {b * k} {it} and shares them equally among {b} friends. "
         f"How many {it} does each friend get?")
    s = f"Each friend gets {b * k} / {b} = {k} {it}."
    return q, s, k


def _t_reading(r):
    n = r.choice(NAMES)
    a, b, c = r.randint(5, 40), r.randint(2, 9), r.randint(1, 30)
    q = (f"{n} reads {a} pages a day for {b} days and then reads {c} more pages. "
         f"How many pages does {n} read in total?")
    s = (f"In {b} days {n} reads {a} * {b} = {a * b} pages. In total {n} reads "
         f"{a * b} + {c} = {a * b + c} pages.")
    return q, s, a * b + c


def _t_speed(r):
    a, b = r.randint(10, 90), r.randint(2, 8)
    q = f"A train travels {a} km every hour. How far does it travel in {b} hours?"
    s = f"In {b} hours the train travels {a} * {b} = {a * b} km."
    return q, s, a * b


def _t_times_as_many(r):
    n, m = r.sample(NAMES, 2)
    it = r.choice(ITEMS)
    a, b = r.randint(2, 30), r.randint(2, 5)
    q = (f"{n} has {a} {it}. {m} has {b} times as many {it} as {n}. "
         f"How many {it} do they have together?")
    s = (f"{m} has {a} * {b} = {a * b} {it}. Together they have {a} + {a * b} = "
         f"{a + a * b} {it}.")
    return q, s, a + a * b


def _t_wage(r):
    n = r.choice(NAMES)
    a, b, c = r.randint(8, 30), r.randint(2, 10), r.randint(2, 4)
    q = (f"{n} earns ${a} an hour and works {b} hours a week. "
         f"How much does {n} earn in {c} weeks?")
    s = (f"In one week {n} earns {a} * {b} = ${a * b}. In {c} weeks {n} earns "
         f"{a * b} * {c} = ${a * b * c}.")
    return q, s, a * b * c


def _t_chairs(r):
    a, b = r.randint(2, 15), r.randint(3, 20)
    c = r.randint(1, a * b)
    q = (f"A hall has {a} rows of {b} chairs. {c} chairs are taken. "
         f"How many chairs are free?")
    s = (f"The hall has {a} * {b} = {a * b} chairs. Free chairs: {a * b} - {c} = "
         f"{a * b - c}.")
    return q, s, a * b - c


def _t_spending(r):
    n = r.choice(NAMES)
    t1, t2 = r.sample(THINGS, 2)
    b, c = r.randint(1, 40), r.randint(1, 40)
    a = b + c + r.randint(0, 60)
    q = (f"{n} had ${a}. {n} spent ${b} on a {t1} and ${c} on a {t2}. "
         f"How much money does {n} have left?")
    s = (f"{n} spent {b} + {c} = ${b + c}. {n} has {a} - {b + c} = ${a - b - c} left.")
    return q, s, a - b - c


def _t_half(r):
    n, m = r.sample(NAMES, 2)
    it = r.choice(ITEMS)
    a = 2 * r.randint(2, 40)
    b = r.randint(1, 30)
    q = (f"{n} has {a} {it} and gives half of them to {m}. Then {n} finds {b} more. "
         f"How many {it} does {n} have now?")
    s = (f"{n} gives away {a} / 2 = {a // 2} {it} and keeps {a // 2}. Then {n} has "
         f"{a // 2} + {b} = {a // 2 + b} {it}.")
    return q, s, a // 2 + b


def _t_boxes(r):
    it = r.choice(ITEMS)
    a, k = r.randint(2, 12), r.randint(2, 20)
    q = f"A box holds {a} {it}. How many boxes are needed for {a * k} {it}?"
    s = f"The number of boxes is {a * k} / {a} = {k}."
    return q, s, k


TEMPLATES: tuple[Callable, ...] = (
    _t_buy_give, _t_packs, _t_change, _t_share, _t_reading, _t_speed, _t_times_as_many,
    _t_wage, _t_chairs, _t_spending, _t_half, _t_boxes,
)


def problem(seed: int, index: int) -> dict:
    """One problem: ``{"question", "answer" (solution text), "result" (int)}``."""
    r = random.Random(seed * 7_919_993 + index)
    q, s, result = r.choice(TEMPLATES)(r)
    return {"question": q, "answer": f"{s} The answer is {result}.", "result": result}


def split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and held-out problems; no held-out question appears in training."""
    train = [problem(seed, i) for i in range(n_train)]
    seen = {p["question"] for p in train}
    test, i = [], 0
    while len(test) < n_test:
        p = problem(seed + 1, i)
        i += 1
        if p["question"] not in seen:
            seen.add(p["question"])
            test.append(p)
    return train, test


def extract_answer(text: str) -> int | None:
    """The integer after the first "The answer is", or None."""
    m = ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
