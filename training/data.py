"""Training data: text files and JSONL read with errors that name the file and line, documents tokenized into
one stream, and the stream cut into fixed-length samples whose order depends only on (seed, sample index), so a
run resumes at any step and splits across DDP ranks without changing which samples form a step's batch."""
import glob
import json
from pathlib import Path
from typing import Any

import torch


def expand(patterns: list[str]) -> list[Path]:
    """Files named by paths or glob patterns, in a stable order; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") \
            else [Path(pattern)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        files.extend(matches)
    return files


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def read_documents(patterns: list[str]) -> list[str]:
    """A .jsonl file gives one document per line's "text" field; any other file is one UTF-8 text document."""
    docs = []
    for path in expand(patterns):
        if path.suffix == ".jsonl":
            for number, row in read_jsonl(path):
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{number}: a pretraining record needs a string field \"text\"")
                docs.append(row["text"])
        else:
            try:
                docs.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    return docs


def token_stream(docs: list[str], tokenizer, bos_id: int | None) -> torch.Tensor:
    """All documents' tokens in one int64 tensor, each document opened by BOS."""
    ids: list[int] = []
    for doc in docs:
        if bos_id is not None:
            ids.append(bos_id)
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long)


class SampleOrder:
    """Which of n items global sample g is: epoch g // n visits all n in an order seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return int(self._perm[i])


def read_conversations(patterns: list[str]) -> list[tuple[str, list[dict[str, str]]]]:
    """("file:line", messages) for each JSONL record {"messages": [{"role", "content"}, ...]}; a record that is
    not a conversation with at least one assistant turn is an error naming its file and line."""
    out = []
    for path in expand(patterns):
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            messages = row.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{where}: a conversation needs a non-empty list \"messages\"")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                        m.get("content"), str):
                    raise ValueError(f"{where}: each message needs string fields \"role\" and \"content\"")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
            out.append((where, messages))
    return out


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation rendered with the chat template; labels are -100 except on the
    assistant turns' tokens (their text and end-of-turn marker). Each turn is encoded on its own, as the server
    encodes a prompt and the model then writes the answer, so training sees the tokens inference sees."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        cuts = []
        if message["role"] == "assistant":
            cuts.append((tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else
                         tokenizer.apply_chat_template([], add_generation_prompt=True), False))
        cuts.append((tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False),
                     message["role"] == "assistant"))
        for text, learn in cuts:
            if not text.startswith(done):
                raise ValueError("the chat template does not render a conversation as a prefix of its extension; "
                                 "assistant tokens cannot be located")
            piece = tokenizer.encode(text[len(done):], add_special_tokens=False)
            ids += piece
            labels += piece if learn else [-100] * len(piece)
            done = text
    return ids[:max_len], labels[:max_len]


class PackedSamples:
    """Non-overlapping windows of `seq_len + 1` tokens (inputs and their next-token targets); sample g is window
    perm(epoch)[g % n] with epoch = g // n and a permutation seeded by (seed, epoch)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one sequence of {seq_len}: add data or shorten seq_len")
        self._order = SampleOrder(self.num_windows, seed)

    def window(self, g: int) -> torch.Tensor:
        start = self._order(g) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([self.window(first + i) for i in range(size)])
        return rows[:, :-1], rows[:, 1:]

    def in_order(self, size: int, limit: int | None = None):
        """Batches of windows in stream order, unshuffled (validation); with a limit of batches, windows evenly
        spaced over the whole stream, so each held-out document has its share."""
        count = self.num_windows if limit is None else min(self.num_windows, limit * size)
        windows = [i * self.num_windows // count for i in range(count)]
        for start in range(0, count, size):
            rows = torch.stack([self.tokens[w * self.seq_len:(w + 1) * self.seq_len + 1]
                                for w in windows[start:start + size]])
            yield rows[:, :-1], rows[:, 1:]
