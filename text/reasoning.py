"""Reasoning a thinking model writes before its answer, split off the answer.

One convention so far, `think` (Qwen3, DeepSeek-R1, QwQ and most open thinking models): the reasoning sits between
`<think>` and `</think>`, then the answer follows. Some templates open `<think>` in the prompt itself (DeepSeek-R1,
Qwen3's thinking-only releases), so the answer starts inside the reasoning; others add an empty block to the prompt
when thinking is off (Qwen3 with enable_thinking=False), so the answer has none.

`split` handles a finished answer; `StreamingReasoning` the same text as it grows. Both use one function whose
unfinished reading is always a prefix of the finished one (a tag still being written is held back), so a stream's
pieces add up to exactly the non-streamed split.
"""
from dataclasses import dataclass

CONVENTIONS = {"think": ("<think>", "</think>")}
ALIASES = {"qwen3": "think", "deepseek_r1": "think", "deepseek-r1": "think"}
SETTINGS = ("auto", "none", *CONVENTIONS, *ALIASES)


@dataclass(frozen=True)
class Reasoning:
    """A model's reasoning convention, and whether its prompt leaves it inside an open block."""
    open: str
    close: str
    starts_inside: bool = False


def reasoning_for(setting: str, template: str | None, prompt: str = "") -> Reasoning | None:
    """The convention for `--reasoning-parser setting` (auto: `think` when the chat template mentions the tag),
    with `starts_inside` read off the rendered prompt."""
    if setting not in SETTINGS:
        raise ValueError(f"reasoning parser must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "none":
        return None
    if setting == "auto":
        found = [name for name, (open_tag, _) in CONVENTIONS.items() if template and open_tag in template]
        if not found:
            return None
        setting = found[0]
    open_tag, close_tag = CONVENTIONS[ALIASES.get(setting, setting)]
    if prompt.rstrip().endswith(close_tag):  # an empty block in the prompt: thinking is off for this request
        return None
    return Reasoning(open_tag, close_tag, prompt.rfind(open_tag) > prompt.rfind(close_tag))


def _held_back(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _split(text: str, r: Reasoning, final: bool) -> tuple[str | None, str]:
    """(reasoning or None, answer). Unfinished (`final` False): only what no continuation can change."""
    if r.starts_inside:
        body_start = 0
    else:
        stripped = text.lstrip()
        if stripped.startswith(r.open):
            body_start = len(text) - len(stripped) + len(r.open)
        elif not final and r.open.startswith(stripped):
            return None, ""  # maybe the opening tag, still being written
        else:
            return None, text
    end = text.find(r.close, body_start)
    if end < 0:  # still reasoning (or never closed: all of it was reasoning)
        body = text[body_start:]
        return body if final else body[:len(body) - _held_back(body, r.close)], ""
    answer = text[end + len(r.close):]
    stripped = answer.lstrip()
    if not final and not stripped:
        return text[body_start:end], ""  # whitespace after the tag is dropped only once more text shows it led
    return text[body_start:end], stripped


def split(text: str, r: Reasoning | None) -> tuple[str | None, str]:
    """(reasoning, answer) of a finished answer; reasoning None when the model wrote none."""
    return (None, text) if r is None else _split(text, r, True)


@dataclass
class StreamingReasoning:
    """Feed text deltas; get (reasoning delta, answer delta) pairs that add up to `split` of the whole text."""
    reasoning: Reasoning | None
    text: str = ""
    sent: tuple[int, int] = (0, 0)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        if self.reasoning is None:
            return "", delta
        thought, answer = _split(self.text, self.reasoning, final)
        thought = thought or ""
        out = thought[self.sent[0]:], answer[self.sent[1]:]
        self.sent = (len(thought), len(answer))
        return out
