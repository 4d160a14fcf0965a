"""Chunking: offsets point at the chunk's text in the document, chunks stay under the token budget, never span a
heading, repeat the tail of the previous chunk, and HTML is read as its visible text."""
import pytest

from rag.chunker import ChunkSettings, chunk_text, read_document

DOC = """Rivers of Zorbland
==================

The Zorblat river is 412 kilometres long. It floods in May.

Its delta holds three towns. Fishing is the main trade there.

Mountains
---------

Mount Qel is the highest peak. It is 5120 metres high.

# A Markdown heading

One two three four five six seven eight nine ten eleven twelve. Thirteen fourteen fifteen sixteen seventeen.
Eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four.
"""


def words(text: str) -> int:
    return len(text.split())


def test_offsets_titles_and_headings():
    chunks = chunk_text(DOC, "zorb.rst", words, ChunkSettings(max_tokens=30, overlap_tokens=0))
    for c in chunks:
        assert DOC[c.start:c.end] == c.text and c.source == "zorb.rst"
        assert words(c.text) <= 30
    assert [(c.title, c.text.split()[0]) for c in chunks] == [
        ("Rivers of Zorbland", "The"), ("Mountains", "Mount"), ("A Markdown heading", "One")]
    assert "Mountains" not in chunks[0].text and "=====" not in chunks[0].text  # headings are titles, not text
    assert chunks[0].embedding_text() == f"Rivers of Zorbland\n{chunks[0].text}"
    assert chunks[0].embedding_text(with_title=False) == chunks[0].text


def test_budget_splits_at_paragraphs_then_sentences_with_overlap():
    chunks = chunk_text(DOC, "zorb.rst", words, ChunkSettings(max_tokens=12, overlap_tokens=11))
    rivers = [c.text for c in chunks if c.title == "Rivers of Zorbland"]
    # one paragraph a chunk: repeating the first (11 words) would leave no room for the second, so it is not
    assert rivers == ["The Zorblat river is 412 kilometres long. It floods in May.",
                      "Its delta holds three towns. Fishing is the main trade there."]
    long_one = [c for c in chunks if c.title == "A Markdown heading"]
    assert all(words(c.text) <= 12 for c in long_one) and len(long_one) >= 2
    assert long_one[0].text.endswith("twelve.")  # cut at a sentence end
    for c in long_one:
        assert DOC[c.start:c.end] == c.text


def test_overlap_repeats_the_previous_chunks_last_blocks():
    text = "\n\n".join(f"Paragraph {i} has five words." for i in range(6))
    chunks = chunk_text(text, "p.txt", words, ChunkSettings(max_tokens=15, overlap_tokens=5))
    assert [c.text.count("Paragraph") for c in chunks] == [3, 3, 2]
    assert chunks[1].text.startswith("Paragraph 2") and chunks[2].text.startswith("Paragraph 4")
    with pytest.raises(ValueError, match="overlap_tokens"):
        chunk_text(text, "p.txt", words, ChunkSettings(max_tokens=10, overlap_tokens=10))


def test_html_is_read_as_visible_text(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>x</title><style>p {color: red}</style></head><body><nav>Home</nav>"
                    "<h1>Zorbland</h1><p>The Zorblat river is <b>412</b>&nbsp;km long.</p>"
                    "<script>var x = 1;</script><h2>Mountains</h2><p>Mount Qel is high.</p></body></html>")
    text = read_document(page)
    assert text == "# Zorbland\n\nThe Zorblat river is 412\xa0km long.\n\n## Mountains\n\nMount Qel is high."
    chunks = chunk_text(text, str(page), words, ChunkSettings(max_tokens=50, overlap_tokens=0))
    assert [(c.title, c.text) for c in chunks] == [("Zorbland", "The Zorblat river is 412\xa0km long."),
                                                  ("Mountains", "Mount Qel is high.")]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        read_document(tmp_path / "bad.txt")
