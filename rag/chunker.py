"""Documents -> chunks for retrieval. A document is read as text (HTML is reduced to its visible text, headings
marked); it is split into blocks at blank lines, a heading block starts a new section, and blocks are packed into
chunks of at most `max_tokens` embedding tokens, never across a heading; a chunk repeats the previous chunk's
last blocks up to `overlap_tokens`, and a block too long for one chunk is split at sentence ends. Each chunk keeps
its source, character offsets into the document text and the heading it falls under (which is embedded with it)."""
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm")
RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def is_rst_title(line: str, below: str) -> bool:
    """A reStructuredText title: a non-blank line over an underline at least as long."""
    return bool(line.strip()) and bool(RST_UNDERLINE.match(below)) and len(below.strip()) >= len(line.strip())


_MD_HEADING = re.compile(r"^#{1,6}\s+\S")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class ChunkSettings:
    max_tokens: int = 256
    overlap_tokens: int = 32
    with_title: bool = True  # embed "heading\ntext" rather than the text alone


@dataclass
class Chunk:
    source: str
    start: int  # character offsets into the document text (read_document)
    end: int
    title: str
    text: str

    def embedding_text(self, with_title: bool = True) -> str:
        return f"{self.title}\n{self.text}" if with_title and self.title else self.text


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "head", "nav", "footer"}
    BLOCK = {"p", "div", "li", "pre", "table", "tr", "section", "article", "br", "dd", "dt", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def read_document(path: Path) -> str:
    """The text chunk offsets refer to: the file itself, or for HTML its visible text with `#` headings."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() not in (".html", ".htm"):
        return raw
    parser = _HTMLText()
    parser.feed(raw)
    text = "".join(parser.parts)
    return re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n\n", "\n".join(line.strip() for line in text.splitlines())).strip()


def _blocks(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_heading) of each block: runs of non-blank lines; an RST title (the line above an underline)
    or a Markdown `#` line is a heading block of its own; underlines and transitions are dropped."""
    lines, pos = [], 0
    for line in text.split("\n"):
        lines.append((pos, line))
        pos += len(line) + 1
    out, start, end, i = [], None, 0, 0
    while i < len(lines):
        pos, line = lines[i]
        below = lines[i + 1][1] if i + 1 < len(lines) else ""
        rst_title = is_rst_title(line, below)
        md_title = bool(_MD_HEADING.match(line))
        if not line.strip() or rst_title or md_title or RST_UNDERLINE.match(line):
            if start is not None:
                out.append((start, end, False))
                start = None
            if rst_title or md_title:
                out.append((pos, pos + len(line), True))
            i += 2 if rst_title else 1
            continue
        if start is None:
            start = pos
        end = pos + len(line)
        i += 1
    if start is not None:
        out.append((start, end, False))
    return out


def _heading_text(text: str) -> str:
    line = text.split("\n")[0]
    return line.lstrip("#").strip()


def _split_long(text: str, start: int, end: int, count: Callable[[str], int], limit: int) -> list[tuple[int, int]]:
    """A block over the limit cut at sentence ends (or, for one endless sentence, at whitespace)."""
    pieces, piece_start = [], start
    cuts = [start + m.end() for m in _SENTENCE_END.finditer(text[start:end])] + [end]
    if len(cuts) == 1:
        cuts = [start + m.end() for m in re.finditer(r"\s+", text[start:end])] + [end]
    last_fit = None
    for cut in cuts:
        if count(text[piece_start:cut]) <= limit:
            last_fit = cut
            continue
        if last_fit is None:  # one unbreakable run: keep it whole, the encoder truncates it
            pieces.append((piece_start, cut))
            piece_start = cut
        else:
            pieces.append((piece_start, last_fit))
            piece_start = last_fit
            last_fit = cut if count(text[piece_start:cut]) <= limit else None
            if last_fit is None:
                pieces.append((piece_start, cut))
                piece_start = cut
    if piece_start < end:
        pieces.append((piece_start, end))
    trimmed = []
    for a, b in pieces:
        piece = text[a:b]
        if piece.strip():
            trimmed.append((a + len(piece) - len(piece.lstrip()), b - len(piece) + len(piece.rstrip())))
    return trimmed


def chunk_text(text: str, source: str, count: Callable[[str], int], s: ChunkSettings) -> list[Chunk]:
    """`count(text)` is the number of embedding tokens the text takes."""
    if s.overlap_tokens >= s.max_tokens:
        raise ValueError(f"overlap_tokens ({s.overlap_tokens}) must be below max_tokens ({s.max_tokens})")
    chunks: list[Chunk] = []
    title = ""
    current: list[tuple[int, int, int]] = []  # (start, end, tokens) of the blocks in the chunk being built

    def flush(keep_overlap: bool) -> None:
        nonlocal current
        if not current:
            return
        a, b = current[0][0], current[-1][1]
        chunks.append(Chunk(source, a, b, title, text[a:b]))
        kept, total = [], 0
        for block in reversed(current if keep_overlap else []):
            if total + block[2] > s.overlap_tokens:
                break
            kept.insert(0, block)
            total += block[2]
        current = kept if len(kept) < len(current) else []

    for start, end, heading in _blocks(text):
        if heading:
            flush(keep_overlap=False)
            title = _heading_text(text[start:end])
            continue
        pieces = [(start, end)]
        if count(text[start:end]) > s.max_tokens:
            pieces = _split_long(text, start, end, count, s.max_tokens)
        for a, b in pieces:
            tokens = count(text[a:b])
            if current and sum(t for *_, t in current) + tokens > s.max_tokens:
                flush(keep_overlap=True)
                while current and sum(t for *_, t in current) + tokens > s.max_tokens:
                    current.pop(0)
            current.append((a, b, tokens))
    flush(keep_overlap=False)
    return chunks
