"""The world's task families: each draws a problem of a given size and solves it exactly.

Every task works on digit strings (each digit is its own token), so sizes count tokens and one
model can learn them all: lists of digits to reverse or sort, and multi-digit addition with
carries in the reasoning-on form: a `<think>` trace writes the operands and the sum in aligned
columns least significant digit first (a carry chain: each sum digit depends on the one before
it), and the answer, the sum, is the trace's last row read backwards. A two-step expression
(`arith`, its trace the intermediate result) is available but not in the default world: a
1M-parameter model did not learn it (nor addition written most significant digit first, without a
trace) to 95% within a CPU pretraining budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # the exact assistant answer (with its `<think>` trace when the task reasons)
    size: int  # the task's length measure: list items or operand digits


@dataclass(frozen=True)
class Task:
    """A family of problems with exact answers.

    `sizes` is the trained range of the length measure; the held-out "beyond" split uses
    `sizes[1] + 1`. `reasoning` tasks answer as `<think>trace</think>result` under the
    "detailed thinking on" system prompt; the others answer directly under "... off"."""

    name: str
    sizes: tuple[int, int]
    reasoning: bool
    draw: Callable[[random.Random, int], Problem]  # (rng, size) -> a problem of that size
    solve: Callable[[str], str]  # the prompt -> the exact answer: the independent checker


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


def _number(rng: random.Random, n: int) -> int:
    """A number of exactly n digits (0 allowed for n == 1)."""
    return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10**n)


def _operand_text(prompt: str) -> str:
    return prompt.split(": ", 1)[1]


# --- reverse / sort: lists of digits --------------------------------------------------------------


def _solve_reverse(prompt: str) -> str:
    return _operand_text(prompt)[::-1]


def _draw_reverse(rng: random.Random, size: int) -> Problem:
    prompt = f"Reverse: {_digits(rng, size)}"
    return Problem(prompt, _solve_reverse(prompt), size)


def _solve_sort(prompt: str) -> str:
    return "".join(sorted(_operand_text(prompt)))


def _draw_sort(rng: random.Random, size: int) -> Problem:
    prompt = f"Sort: {_digits(rng, size)}"
    return Problem(prompt, _solve_sort(prompt), size)


# --- addition with carries, reasoning on -----------------------------------------------------------


ADD_SIZES = (1, 5)  # operand digits of the trained range


def _solve_add(prompt: str) -> str:
    """Column addition written out, least significant digit first: both operands reversed and
    zero-padded to one column more than the range's longest operand (two reversal copies, the
    skill the reverse task teaches), then the sum in the same columns, so each sum digit reads its
    two operand digits and the carry at fixed distances behind it; the answer is the sum read back
    without its leading zeros. The width grows with operands beyond the trained range, so the
    solver holds at every size."""
    a, b = _operand_text(prompt).split("+")
    width = max(ADD_SIZES[1], len(a), len(b)) + 1  # room for the carry out of the top digit
    total = int(a) + int(b)
    columns = "+".join(str(x).zfill(width)[::-1] for x in (int(a), int(b)))
    return f"{THINK_OPEN}{columns}={str(total).zfill(width)[::-1]}{THINK_CLOSE}{total}"


def _draw_add(rng: random.Random, size: int) -> Problem:
    """The longer operand has `size` digits; the other 1..size."""
    a, b = _number(rng, size), _number(rng, rng.randint(1, size))
    if rng.random() < 0.5:
        a, b = b, a
    prompt = f"Add: {a}+{b}"
    return Problem(prompt, _solve_add(prompt), size)


# --- two-step arithmetic with a reasoning trace -------------------------------------------------------


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _solve_arith(prompt: str) -> str:
    expr = _operand_text(prompt)
    op1_at = next(i for i, c in enumerate(expr) if c in "+-" and i > 0)
    op2_at = next(i for i, c in enumerate(expr) if c in "+-" and i > op1_at)
    a, op1, b, op2, c = expr[:op1_at], expr[op1_at], expr[op1_at + 1 : op2_at], expr[op2_at], expr[op2_at + 1 :]
    first = _apply(int(a), op1, int(b))
    return f"{THINK_OPEN}{a}{op1}{b}={first}{THINK_CLOSE}{_apply(first, op2, int(c))}"


def _draw_arith(rng: random.Random, size: int) -> Problem:
    """a op b op c, left to right, every operand of 1..size digits (one of exactly `size`), no
    negative intermediate or result (redrawn until so: deterministic under the seeded rng)."""
    while True:
        lengths = [rng.randint(1, size) for _ in range(3)]
        lengths[rng.randrange(3)] = size
        a, b, c = (_number(rng, n) for n in lengths)
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        first = _apply(a, op1, b)
        if first >= 0 and _apply(first, op2, c) >= 0:
            prompt = f"Compute: {a}{op1}{b}{op2}{c}"
            return Problem(prompt, _solve_arith(prompt), size)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("reverse", (2, 12), False, _draw_reverse, _solve_reverse),
        Task("sort", (2, 12), False, _draw_sort, _solve_sort),
        Task("add", ADD_SIZES, True, _draw_add, _solve_add),
        Task("arith", (1, 2), True, _draw_arith, _solve_arith),
    )
}


def final_answer(answer: str) -> str:
    """The answer after its reasoning trace (the whole answer when it has none)."""
    return answer.rsplit(THINK_CLOSE, 1)[-1]
