"""The index: search finds the chunk that holds the answer, it survives a reopen (a restart), re-indexing embeds
only changed files and drops removed ones, and a corrupt or mismatched index is a clear error."""
import json
import shutil

import pytest
import torch

from models.bert import SentenceEncoder
from rag.chunker import ChunkSettings
from rag.index import Index

DOCS = {
    "rivers.md": "# Rivers\n\nThe Zorblat river is 412 kilometres long and floods every May.\n\n"
                 "Its delta holds three fishing towns.\n",
    "mountains.rst": "Mountains\n=========\n\nMount Qel, the highest peak of Zorbland, is 5120 metres high.\n",
    "food.html": "<h1>Food</h1><p>The national dish of Zorbland is smoked eel with barley.</p>",
    "notes.bin": "ignored: not a document type",
}


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def _top_source(index: Index, query: str) -> str:
    return index.search([query], k=1)[0][0].chunk.source


def test_search_survives_a_restart_and_updates_only_what_changed(encoder, docs, tmp_path, monkeypatch):
    index = Index(tmp_path / "idx", encoder, ChunkSettings(max_tokens=64, overlap_tokens=8))
    assert index.update([str(docs)]) == dict(added=3, changed=0, dropped=0, unchanged=0)
    index.save()
    hits = index.search(["How long is the Zorblat river?"], k=2)[0]
    assert hits[0].chunk.text.startswith("The Zorblat river is 412") and hits[0].score > hits[1].score
    assert _top_source(index, "What do people eat in Zorbland?").endswith("food.html")

    reopened = Index.open(tmp_path / "idx", encoder)
    assert len(reopened) == len(index) == 3 and reopened.chunking == index.chunking  # a chunk per file
    for q in ("How high is Mount Qel?", "fishing towns"):
        a, b = index.search([q], 3)[0], reopened.search([q], 3)[0]
        assert [h.chunk for h in a] == [h.chunk for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b])

    embedded = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts, progress=False: embedded.extend(texts) or real(texts))
    (docs / "mountains.rst").write_text("Mountains\n=========\n\nMount Qel is 6000 metres high since the survey.\n")
    (docs / "rivers.md").unlink()
    assert reopened.update([str(docs)]) == dict(added=0, changed=1, dropped=1, unchanged=1)
    assert embedded == ["Mountains\nMount Qel is 6000 metres high since the survey."]  # only the changed file
    reopened.save()
    again = Index.open(tmp_path / "idx", encoder)
    assert len(again) == 2 and not any("Zorblat" in c.text for c in again.chunks.values())
    assert "6000" in again.search(["How high is Mount Qel?"], 1)[0][0].chunk.text


def test_corrupt_or_mismatched_indexes_are_refused(encoder, docs, tmp_path):
    with pytest.raises(ValueError, match="not a tokenmill index"):
        Index.open(tmp_path / "nothing", encoder)
    index = Index(tmp_path / "idx", encoder)
    index.update([str(docs / "rivers.md")])
    index.save()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())

    def broken(name: str, **changes) -> Index:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "idx", folder)
        if changes:
            (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        return folder

    with pytest.raises(ValueError, match="has 384"):
        Index.open(broken("dim", dimension=768, embedding_model="all-mpnet-base-v2"), encoder)
    with pytest.raises(ValueError, match="another embedding model"):
        Index.open(broken("fp", fingerprint="0123456789abcdef"), encoder)
    folder = broken("vectors")
    (folder / "vectors.faiss").write_bytes(b"not faiss")
    with pytest.raises(ValueError, match="corrupt"):
        Index.open(folder, encoder)
    folder = broken("chunks")
    (folder / "chunks.jsonl").write_text("")
    with pytest.raises(ValueError, match="1 vectors of 384 dimensions for 0 chunks"):
        Index.open(folder, encoder)
    folder = broken("manifest")
    (folder / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="manifest.json is corrupt"):
        Index.open(folder, encoder)
    with pytest.raises(FileNotFoundError, match="no such file"):
        index.update([str(docs / "missing.md")])


def test_the_index_search_equals_brute_force_cosine(encoder, docs, tmp_path):
    index = Index(tmp_path / "idx", encoder, ChunkSettings(max_tokens=64, overlap_tokens=0))
    index.update([str(docs)])
    query = "Which peak is the highest?"
    chunks = list(index.chunks.values())
    vectors = encoder.encode([c.embedding_text() for c in chunks])
    expected = (vectors @ encoder.encode([query])[0]).tolist()
    hits = index.search([query], k=len(chunks))[0]
    assert [h.score for h in hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert hits[0].chunk == chunks[max(range(len(chunks)), key=expected.__getitem__)]
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(chunks)))


def test_chunks_longer_than_the_encoder_reads_are_refused(encoder, tmp_path):
    with pytest.raises(ValueError, match="max_tokens=512 do not fit"):
        Index(tmp_path / "index", encoder, ChunkSettings(max_tokens=512, overlap_tokens=64))
