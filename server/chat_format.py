"""Engine outputs -> OpenAI response bodies and SSE chunks, for chat and for (legacy) completions.

Streams send what each step made final: the detokenizer's text only grows (stop strings are held back until
they are ruled out), so the concatenated deltas always equal the non-streamed text.
"""
import time
from collections.abc import AsyncIterator

from engine import CompletionOutput, RequestOutput
from text.reasoning import Reasoning, StreamingReasoning, split
from text.tool_parser import StreamingToolParser, parse_tool_calls


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Formatter:
    object_name = ""

    def __init__(self, request_id: str, model: str, tokenizer, num_logprobs: int):
        self.request_id, self.model, self.tokenizer = request_id, model, tokenizer
        self.num_logprobs = num_logprobs
        self.prompt_logprobs: int | None = None
        self.created = int(time.time())

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:self.num_logprobs]

    def _vllm_prompt_logprobs(self, out: RequestOutput) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, decoded_token}} for
        the token itself and the top alternatives asked for."""
        if self.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        result = []
        for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
            if entry is None:
                result.append(None)
                continue
            keep = dict(sorted(entry.items(), key=lambda kv: -kv[1])[:self.prompt_logprobs])
            keep[token_id] = entry[token_id]
            result.append({str(i): {"logprob": lp, "decoded_token": self._token(i)} for i, lp in keep.items()})
        return result

    def _body(self, choices: list[dict], **extra) -> dict:
        return {"id": self.request_id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}


class ChatFormatter(_Formatter):
    """Chat bodies; with `parse_tools`, tool calls in the answer become `tool_calls` (streamed through the same
    parser's incremental twin, so the streamed deltas add up to the non-streamed message)."""
    object_name = "chat.completion"

    def __init__(self, request_id: str, model: str, tokenizer, n: int, top_logprobs: int, parse_tools: bool = False,
                 reasoning: Reasoning | None = None, prompt_logprobs: int | None = None):
        super().__init__(request_id, model, tokenizer, top_logprobs)
        self.n, self.parse_tools, self.reasoning = n, parse_tools, reasoning
        self.prompt_logprobs = prompt_logprobs

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None) -> dict | None:
        if entries is None:
            return None
        content = []
        for token_id, entry in zip(token_ids, entries):
            text = self._token(token_id)
            top = [{"token": (t := self._token(i)), "logprob": lp, "bytes": list(t.encode())}
                   for i, lp in self._top(entry)]
            content.append({"token": text, "logprob": entry[token_id], "bytes": list(text.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def _message(self, o: CompletionOutput) -> tuple[dict, str | None]:
        thought, text = split(o.text, self.reasoning)
        # both names: SGLang, llama.cpp and most clients read reasoning_content; vLLM and Ollama reasoning
        message = {"role": "assistant", "content": text}
        if self.reasoning is not None:
            message |= {"reasoning_content": thought, "reasoning": thought}
        if not self.parse_tools:
            return message, o.finish_reason
        content, calls = parse_tool_calls(text)
        message["content"] = content
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return message, _finish_reason(o.finish_reason, bool(calls))

    def response(self, out: RequestOutput) -> dict:
        choices = []
        for o in out.outputs:
            message, finish_reason = self._message(o)
            choices.append({"index": o.index, "message": message,
                            "logprobs": self._logprobs(o.token_ids, o.logprobs), "finish_reason": finish_reason})
        completion = sum(len(o.token_ids) for o in out.outputs)
        extra = {} if self.prompt_logprobs is None else {"prompt_logprobs": self._vllm_prompt_logprobs(out)}
        return self._body(choices, usage=_usage(len(out.prompt_token_ids), completion), **extra)

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool):
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
            body = self._body([{"index": index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": finish_reason}], **extra)
            body["object"] = "chat.completion.chunk"
            return body

        for i in range(self.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        progress = _Progress(self.n)
        tools = [_ToolStream() for _ in range(self.n)] if self.parse_tools else None
        thinking = [StreamingReasoning(self.reasoning) for _ in range(self.n)]
        last = None
        async for _, out in outputs:
            last = out
            for o in out.outputs:
                new = progress.advance(o)
                if new is None:
                    continue
                delta, token_ids, entries = new
                logprobs = self._logprobs(token_ids, entries)
                thought, delta = thinking[o.index].feed(delta, final=o.finish_reason is not None)
                if thought:
                    yield chunk(o.index, {"reasoning_content": thought, "reasoning": thought}, logprobs, None)
                    logprobs = None
                if tools is None:
                    if delta or o.finish_reason or not thought:
                        yield chunk(o.index, {"content": delta}, logprobs, o.finish_reason)
                    continue
                for delta, logprobs, finish_reason in tools[o.index].advance(delta, logprobs, o.finish_reason):
                    yield chunk(o.index, delta, logprobs, finish_reason)
        if include_usage and last is not None:
            body = self._body([], usage=_usage(len(last.prompt_token_ids), sum(len(o.token_ids) for o in last.outputs)))
            body["object"] = "chat.completion.chunk"
            yield body


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


class _ToolStream:
    """One choice's text deltas -> chat deltas with content and tool calls. A call goes out as OpenAI streams
    it: a first delta with id, type and name (arguments ""), then its arguments; it is sent once the parser
    knows it is a call, i.e. when its closing tag arrives. Logprobs wait for the next delta that is sent."""

    def __init__(self):
        self.parser = StreamingToolParser()
        self.called = False
        self.logprobs: dict | None = None

    def advance(self, text: str, logprobs: dict | None, finish_reason: str | None):
        if logprobs is not None:
            self.logprobs = logprobs if self.logprobs is None else {
                "content": self.logprobs["content"] + logprobs["content"]}
        pieces = self.parser.feed(text) + (self.parser.finish() if finish_reason else [])
        deltas = []
        for piece in pieces:
            if piece.tool_index is None:
                deltas.append({"content": piece.content})
                continue
            self.called = True
            deltas.append({"tool_calls": [{"index": piece.tool_index, "id": piece.id, "type": "function",
                                           "function": {"name": piece.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": piece.tool_index, "function": {"arguments": piece.arguments}}]})
        if finish_reason and not deltas:
            deltas.append({})
        for k, delta in enumerate(deltas):
            logprobs, self.logprobs = self.logprobs, None
            yield delta, logprobs, _finish_reason(finish_reason, self.called) if k == len(deltas) - 1 else None


class CompletionFormatter(_Formatter):
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, tokenizer, n: int, num_prompts: int, echo: bool,
                 logprobs: int | None, prompt_logprobs: int | None = None):
        super().__init__(request_id, model, tokenizer, logprobs or 0)
        self.n, self.num_prompts, self.echo, self.want_logprobs = n, num_prompts, echo, logprobs is not None
        self.prompt_logprobs = prompt_logprobs

    def _top_by_text(self, entry: dict[int, float]) -> dict[str, float]:
        """The legacy format keys alternatives by text: of two tokens that read the same (say, partial UTF-8 bytes),
        the likelier one's logprob is kept."""
        top: dict[str, float] = {}
        for token_id, logprob in self._top(entry):
            top.setdefault(self._token(token_id), logprob)
        return top

    def _echoed_logprobs(self, out: RequestOutput) -> dict:
        """The prompt's part of `logprobs` with echo, as OpenAI's legacy completions: the first token has none."""
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
        for token_id, entry in zip(out.prompt_token_ids, entries):
            text = self._token(token_id)
            tokens.append(text)
            token_logprobs.append(None if entry is None else entry[token_id])
            top.append(None if entry is None else self._top_by_text(entry))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _with_prompt(self, out: RequestOutput, generated: dict | None) -> dict | None:
        if not (self.echo and self.want_logprobs):
            return generated
        echoed = self._echoed_logprobs(out)
        return {key: echoed[key] + (generated or {}).get(key, []) for key in echoed}


    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None, offset: int) -> dict | None:
        if not self.want_logprobs or entries is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self._token(token_id)
            tokens.append(text)
            token_logprobs.append(entry[token_id])
            top.append(self._top_by_text(entry))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _prefix(self, out: RequestOutput) -> str:
        if not self.echo:
            return ""
        return out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for p, out in enumerate(outs):
            prefix = self._prefix(out)
            for o in out.outputs:
                choice = {"index": p * self.n + o.index, "text": prefix + o.text,
                          "logprobs": self._with_prompt(out, self._logprobs(o.token_ids, o.logprobs, len(prefix))),
                          "finish_reason": o.finish_reason}
                if self.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out)
                choices.append(choice)
        prompt_tokens = sum(len(out.prompt_token_ids) for out in outs)
        completion = sum(len(o.token_ids) for out in outs for o in out.outputs)
        return self._body(choices, usage=_usage(prompt_tokens, completion))

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool):
        extra = {"usage": None} if include_usage else {}
        progress = [_Progress(self.n) for _ in range(self.num_prompts)]
        echo_len: dict[tuple[int, int], int] = {}  # per choice: length of the echoed prompt (sent first)
        last: dict[int, RequestOutput] = {}
        async for p, out in outputs:
            last[p] = out
            for o in out.outputs:
                new = progress[p].advance(o)
                if new is None:
                    continue
                delta, token_ids, entries = new
                offset = echo_len.get((p, o.index), 0) + len(o.text) - len(delta)
                logprobs, choice = self._logprobs(token_ids, entries, offset), {}
                if (p, o.index) not in echo_len:  # the first chunk of a choice: the echo and the prompt's logprobs
                    prefix = self._prefix(out)
                    echo_len[(p, o.index)] = len(prefix)
                    delta = prefix + delta
                    logprobs = self._with_prompt(out, self._logprobs(token_ids, entries, offset + len(prefix)))
                    if self.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = self._vllm_prompt_logprobs(out)
                yield self._body([{"index": p * self.n + o.index, "text": delta, "logprobs": logprobs,
                                   "finish_reason": o.finish_reason, **choice}], **extra)
        if include_usage:
            prompt_tokens = sum(len(out.prompt_token_ids) for out in last.values())
            completion = sum(len(o.token_ids) for out in last.values() for o in out.outputs)
            yield self._body([], usage=_usage(prompt_tokens, completion))


class _Progress:
    """What each choice of one request has already been sent."""

    def __init__(self, n: int):
        self.text = [0] * n
        self.tokens = [0] * n
        self.done = [False] * n

    def advance(self, o: CompletionOutput) -> tuple[str, list[int], list | None] | None:
        """(new text, new token ids, their logprobs) since the last call, or None when there is nothing to send."""
        i = o.index
        if self.done[i]:
            return None
        delta = o.text[self.text[i]:]
        token_ids = o.token_ids[self.tokens[i]:]
        entries = o.logprobs[self.tokens[i]:] if o.logprobs is not None else None
        self.text[i], self.tokens[i] = len(o.text), len(o.token_ids)
        self.done[i] = o.finish_reason is not None
        if not delta and not o.finish_reason and not (entries and token_ids):
            return None
        return delta, token_ids, entries
