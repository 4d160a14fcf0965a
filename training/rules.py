"""Verifiable rewards for RL: a rule that scores an answer to a prompt in [0, 1] from the prompt's own text, no
model involved. The arithmetic rules read "a plus b" in the question (the questions `make data` writes):

- `sum`: 1 if the answer's last integer is a + b (the answer is right, in any wording);
- `sum_sentence`: 1 if the answer is the sentence "a plus b is N." with N = a + b (right, and in the form the
  preference data prefers); 0.5 if it keeps the sentence with a wrong N or gives the right sum in other words.

The rule sees the whole question and answer, so a rollout cannot earn it without answering."""
import re
from collections.abc import Callable

_QUESTION = re.compile(r"(-?\d+) plus (-?\d+)")


def operands(question: str) -> tuple[int, int] | None:
    m = _QUESTION.search(question)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _right(a: int, b: int, answer: str) -> bool:
    numbers = re.findall(r"-?\d+", answer)
    return bool(numbers) and int(numbers[-1]) == a + b


def sum_rule(a: int, b: int, answer: str) -> float:
    return float(_right(a, b, answer))


def sum_sentence_rule(a: int, b: int, answer: str) -> float:
    kept = re.fullmatch(rf"{a} plus {b} is -?\d+\.", answer.strip()) is not None
    right = _right(a, b, answer)
    return 1.0 if kept and right else 0.5 if kept or right else 0.0


RULES: dict[str, Callable[[int, int, str], float]] = {"sum": sum_rule, "sum_sentence": sum_sentence_rule}


def check_rule(name: str) -> Callable[[int, int, str], float]:
    if name not in RULES:
        raise ValueError(f"setting rule: {name!r} is not one of {', '.join(RULES)} (or empty for none)")
    return RULES[name]
