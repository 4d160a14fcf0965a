"""Turn Hermes/Qwen-style model output into OpenAI chat `tool_calls`.

The model writes optional text and one or more blocks of the form

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

`parse_tool_calls` handles a finished answer; `StreamingToolParser` does the
same incrementally. Both share one scanner (`_scan`), and the streaming side
only emits what the scanner reports as *settled* (no continuation of the text
could change it), so the accumulated stream always equals the one-shot parse.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Callable

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object as a JSON string


@dataclass
class Delta:
    """One piece of a streamed chat chunk: content text or a tool call fragment."""
    content: str | None = None
    tool_index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class _Call:
    name: str
    arguments: str


_Segment = str | _Call  # text outside calls, or a parsed call


def _as_call(body: str) -> _Call | None:
    """The call a block body describes, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if not isinstance(args, dict):
        return None
    return _Call(obj["name"], json.dumps(args, ensure_ascii=False))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _object_end(text: str, start: int) -> int | None:
    """Index just past the `}` balancing the `{` at `start`, or None if the
    text ends first. Braces inside JSON strings are ignored."""
    depth, in_str, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _match_block(text: str, start: int, final: bool) -> tuple[int, _Call | None] | None:
    """Decide the block opening at `start`: (end, call) where call is None for a
    block kept as text, or None when more text is needed to decide (only when
    not `final`).

    Rules: a JSON object (found by brace matching, so `</tool_call>` inside a
    string is fine) followed by optional whitespace and the closing tag, or by
    the end of the whole output, is a call if it is a valid one. Anything else
    is text up to the first closing tag, or up to the end if there is none.
    """
    n = len(text)
    body = start + len(OPEN)
    j = _skip_ws(text, body)
    if j < n and text[j] == "{":
        end = _object_end(text, j)
        if end is None:
            if not final:
                return None  # the object may still close, even past a `</tool_call>`
        else:
            k = _skip_ws(text, end)
            if text.startswith(CLOSE, k):
                return k + len(CLOSE), _as_call(text[j:end])
            if k == n:
                # Models often stop at EOS right after the JSON, without the tag.
                return (n, _as_call(text[j:end])) if final else None
            if not final and CLOSE.startswith(text[k:]):
                return None
    elif j == n and not final:
        return None
    close = text.find(CLOSE, body)
    if close >= 0:
        return close + len(CLOSE), None
    return (n, None) if final else None


def _partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _scan(text: str, final: bool) -> tuple[list[_Segment], int]:
    """Split `text` into settled segments; also return how much of `text` they
    cover. With `final` everything is settled; otherwise an undecided tail (a
    partial opening tag, or a block not yet decidable) is left over."""
    segments: list[_Segment] = []
    pos = 0
    while pos < len(text):
        start = text.find(OPEN, pos)
        if start < 0:
            end = len(text) if final else len(text) - _partial_prefix_len(text[pos:], OPEN)
            if end > pos:
                segments.append(text[pos:end])
            return segments, end
        if start > pos:
            segments.append(text[pos:start])
            pos = start
        block = _match_block(text, start, final)
        if block is None:
            break
        end, call = block
        segments.append(call if call is not None else text[start:end])
        pos = end
    return segments, pos


def parse_tool_calls(
    text: str, id_factory: Callable[[], str] = new_call_id
) -> tuple[str | None, list[ToolCall]]:
    """Return (content, tool calls) for a finished answer. Content is the text
    outside valid call blocks, stripped, or None when empty."""
    segments, _ = _scan(text, final=True)
    content = "".join(s for s in segments if isinstance(s, str)).strip()
    calls = [ToolCall(id_factory(), s.name, s.arguments) for s in segments if isinstance(s, _Call)]
    return content or None, calls


class StreamingToolParser:
    """Incremental `parse_tool_calls`: `feed` each text delta, then `finish`.

    Accumulating the returned deltas OpenAI-style (content concatenated; per
    tool_index, id and name from the first delta, arguments concatenated) gives
    exactly `parse_tool_calls` of the whole text, with "" for a None content.
    A call is emitted whole (id, name, all arguments) in one delta once its
    closing tag arrives, or at `finish` for an unterminated final call.
    """

    def __init__(self, id_factory: Callable[[], str] = new_call_id) -> None:
        self._id_factory = id_factory
        self._buffer = ""  # text not yet settled
        self._calls = 0
        self._started = False  # has any non-whitespace content been emitted
        self._pending_ws = ""  # trailing whitespace, emitted only if text follows

    def feed(self, delta_text: str) -> list[Delta]:
        self._buffer += delta_text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        deltas = self._drain(final=True)
        self._pending_ws = ""  # the one-shot content is stripped at the end too
        return deltas

    def _drain(self, final: bool) -> list[Delta]:
        segments, used = _scan(self._buffer, final)
        self._buffer = self._buffer[used:]
        deltas: list[Delta] = []
        for seg in segments:
            if isinstance(seg, _Call):
                deltas.append(Delta(tool_index=self._calls, id=self._id_factory(),
                                    name=seg.name, arguments=seg.arguments))
                self._calls += 1
            elif (text := self._content(seg)):
                deltas.append(Delta(content=text))
        return deltas

    def _content(self, text: str) -> str:
        """Apply the one-shot strip rule to streamed text."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending_ws + text
        kept = text.rstrip()
        self._pending_ws = text[len(kept):]
        return kept
