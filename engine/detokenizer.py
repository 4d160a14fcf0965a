"""Turn a stream of generated token ids into final text deltas, with stop strings applied.

Two things make this more than `decode(new_token)`:
- A byte-level BPE token can hold part of a multi-byte UTF-8 character, and sentencepiece decodes a token's
  leading space differently at the start of a text. So each step decodes a short window of preceding tokens
  plus the new ones and emits only what the new tokens added; while the window ends in U+FFFD (an incomplete
  character) nothing is emitted and the window grows until the character is complete.
- A stop string can span tokens, so text that might be the start of a stop string is held back until the next
  tokens show whether it is; the stop string (and anything after it) is never emitted unless asked for.
"""
import logging
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

# How many prompt tokens to decode as context before the first generated token (leading-space handling).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-sequence streaming decoder. Call `add` for each generated token, then `flush` if the sequence ends
    for a reason other than a stop string (length, EOS, stop token)."""

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self._include_stop = include_stop_str_in_output
        # The decode window: context tokens whose text is already accounted for, then the tokens not decoded yet.
        # It starts as the end of the prompt, which is context only and never output.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)  # where the not-yet-decoded tokens start in the window
        self._prefix_text = self._decode(self._ids)  # text of the context tokens
        self._delivered: list[str] = []  # output delivered so far, joined lazily by `text`
        self._pending = ""  # decoded output not delivered yet: a possible start of a stop string
        self.stop_reason: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        """The output text delivered so far (everything returned by `add`/`flush`)."""
        if len(self._delivered) > 1:
            self._delivered[:] = ["".join(self._delivered)]
        return self._delivered[0] if self._delivered else ""

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became final (possibly "")."""
        if self.finished:
            logger.debug("token %d added after the sequence finished; ignored", token_id)
            return ""
        self._ids.append(token_id)
        window_text = self._decode(self._ids)
        if len(window_text) > len(self._prefix_text) and not window_text.endswith(_REPLACEMENT_CHAR):
            self._pending += window_text[len(self._prefix_text):]
            # The newly decoded tokens become the next step's context; older ones are no longer needed.
            del self._ids[:self._read_offset]
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended without a stop string: release everything still held back."""
        if self.finished:
            return ""
        window_text = self._decode(self._ids)
        if len(window_text) > len(self._prefix_text):
            # Whatever is left is final now, even an incomplete character.
            self._pending += window_text[len(self._prefix_text):]
        delta = self._release(final=True)
        self.finished = True
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _release(self, final: bool) -> str:
        """Apply stop strings to the pending text and deliver the part that is final now."""
        match = self._find_stop()
        if match is not None:
            start, stop = match
            cut = start + len(stop) if self._include_stop else start
            self.stop_reason, self.finished = stop, True
            return self._deliver(cut)
        if final or not self._stops:
            return self._deliver(len(self._pending))
        return self._deliver(len(self._pending) - self._partial_stop_suffix())

    def _find_stop(self) -> tuple[int, str] | None:
        """The stop string that completes first in the pending text (ties: the one starting first), if any.

        Searching only the pending text is enough: delivered text was already known not to start a stop string."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = self._pending.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return (best[1], best[2]) if best else None

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the pending text that is the beginning of some stop string."""
        text, held = self._pending, 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _deliver(self, upto: int) -> str:
        """Move pending[:upto] to the output; after a stop match the rest of the pending text is dropped."""
        delta = self._pending[:upto]
        if delta:
            self._delivered.append(delta)
        self._pending = "" if self.finished else self._pending[upto:]
        return delta
