"""A retrieval index on disk: chunk vectors in faiss (inner product over unit vectors = cosine similarity, ids
kept so a changed file's chunks can be replaced), the chunks themselves as JSONL, and a manifest naming the
embedding model, its dimension and fingerprint, the chunk settings and each file's content hash.

    INDEX/manifest.json   {"version", "embedding_model", "fingerprint", "dimension", "chunking", "files"}
    INDEX/vectors.faiss   faiss.IndexIDMap2(IndexFlatIP)
    INDEX/chunks.jsonl    {"id", "source", "start", "end", "title", "text"} per chunk

Updating an index re-embeds only files whose content changed, adds new ones and drops those no longer given."""
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from models.bert import SentenceEncoder
from rag.chunker import TEXT_SUFFIXES, Chunk, ChunkSettings, chunk_text, read_document

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass
class Hit:
    chunk: Chunk
    score: float


def fingerprint(encoder: SentenceEncoder) -> str:
    """Identifies the embedding model's weights: its config and the first MiB of its weights file."""
    h = hashlib.sha256((encoder.path / "config.json").read_bytes())
    with open(encoder.path / "model.safetensors", "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def find_documents(paths: list[str]) -> list[Path]:
    """Files given directly, and the text, Markdown, reStructuredText and HTML files under given folders."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {name}")
    if not found:
        raise ValueError(f"no documents ({', '.join(TEXT_SUFFIXES)}) under {', '.join(paths)}")
    return list(dict.fromkeys(p.resolve() for p in found))


class Index:
    def __init__(self, path: str | Path, encoder: SentenceEncoder, chunking: ChunkSettings | None = None):
        """An empty index bound to `path`; use Index.open for an existing one."""
        self.path, self.encoder = Path(path), encoder
        self.chunking = chunking or ChunkSettings()
        if self.chunking.max_tokens > encoder.max_tokens:
            raise ValueError(f"chunks of max_tokens={self.chunking.max_tokens} do not fit {encoder.name}, which "
                             f"reads at most {encoder.max_tokens} tokens")
        self.vectors = faiss.IndexIDMap2(faiss.IndexFlatIP(encoder.dimension))
        self.chunks: dict[int, Chunk] = {}
        self.files: dict[str, dict] = {}  # source -> {"sha256", "ids"}
        self.next_id = 0

    @classmethod
    def open(cls, path: str | Path, encoder: SentenceEncoder) -> "Index":
        """Load an index; a missing, corrupt or mismatched one (another embedding model or dimension) is a
        ValueError that says which."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: not a tokenmill index (no manifest.json); build one with "
                             "`tokenmill rag index DOCS --out INDEX`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}/manifest.json is corrupt: {e}") from None
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {manifest.get('version')!r}, this tokenmill reads {FORMAT_VERSION}")
        if manifest.get("dimension") != encoder.dimension:
            raise ValueError(f"{path}: built with {manifest.get('embedding_model')!r} ({manifest.get('dimension')} "
                             f"dimensions), but the embedding model {encoder.name!r} has {encoder.dimension}")
        ours = fingerprint(encoder)
        if manifest.get("fingerprint") != ours:
            raise ValueError(f"{path}: built with another embedding model ({manifest.get('embedding_model')!r}, "
                             f"fingerprint {manifest.get('fingerprint')}) than {encoder.name!r} ({ours}); "
                             "rebuild it or serve with that model")
        index = cls(path, encoder, ChunkSettings(**manifest["chunking"]))
        try:
            index.vectors = faiss.read_index(str(path / "vectors.faiss"))
            for line in (path / "chunks.jsonl").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                chunk_id = row.pop("id")
                index.chunks[chunk_id] = Chunk(**row)
        except (RuntimeError, OSError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: the index files are corrupt ({e}); rebuild it") from None
        index.files = manifest["files"]
        index.next_id = max(index.chunks, default=-1) + 1
        if index.vectors.d != encoder.dimension or index.vectors.ntotal != len(index.chunks):
            raise ValueError(f"{path}: vectors.faiss holds {index.vectors.ntotal} vectors of {index.vectors.d} "
                             f"dimensions for {len(index.chunks)} chunks; rebuild it")
        return index

    def update(self, paths: list[str], progress: bool = False) -> dict[str, int]:
        """Make the index mirror these documents; returns counts of files added, changed, dropped, unchanged."""
        docs = find_documents(paths)
        counts = dict(added=0, changed=0, dropped=0, unchanged=0)
        wanted = {str(p) for p in docs}
        for source in [s for s in self.files if s not in wanted]:
            self._drop(source)
            counts["dropped"] += 1
        flat: list[Chunk] = []
        for doc in docs:
            raw = doc.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            source = str(doc)
            if self.files.get(source, {}).get("sha256") == digest:
                counts["unchanged"] += 1
                continue
            counts["changed" if source in self.files else "added"] += 1
            self._drop(source)
            chunks = chunk_text(read_document(doc), source, self.encoder.count_tokens, self.chunking)
            first = self.next_id + len(flat)  # each file's chunks take consecutive ids
            self.files[source] = {"sha256": digest, "ids": [first, first + len(chunks)]}
            flat += chunks
        if flat:
            vectors = self.encoder.encode([c.embedding_text(self.chunking.with_title) for c in flat], progress)
            ids = np.arange(self.next_id, self.next_id + len(flat), dtype=np.int64)
            self.vectors.add_with_ids(vectors.numpy(), ids)
            self.chunks.update(zip(ids.tolist(), flat))
            self.next_id += len(flat)
        return counts

    def _drop(self, source: str) -> None:
        entry = self.files.pop(source, None)
        if entry:
            ids = np.arange(*entry["ids"], dtype=np.int64)
            self.vectors.remove_ids(ids)
            for i in ids.tolist():
                self.chunks.pop(i, None)

    def save(self) -> None:
        """Written to temporary names, then renamed, so a crash mid-save leaves the old index whole."""
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {"version": FORMAT_VERSION, "embedding_model": self.encoder.name,
                    "fingerprint": fingerprint(self.encoder), "dimension": self.encoder.dimension,
                    "chunking": asdict(self.chunking), "files": self.files}
        faiss.write_index(self.vectors, str(self.path / "vectors.faiss.tmp"))
        with open(self.path / "chunks.jsonl.tmp", "w", encoding="utf-8") as f:
            for i, c in sorted(self.chunks.items()):
                f.write(json.dumps({"id": i, **asdict(c)}, ensure_ascii=False) + "\n")
        (self.path / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1))
        for name in ("vectors.faiss", "chunks.jsonl", "manifest.json"):
            os.replace(self.path / f"{name}.tmp", self.path / name)

    def search(self, queries: list[str], k: int = 4) -> list[list[Hit]]:
        if not self.chunks:
            return [[] for _ in queries]
        scores, ids = self.vectors.search(self.encoder.encode(queries).numpy(), min(k, len(self.chunks)))
        return [[Hit(self.chunks[int(i)], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def __len__(self) -> int:
        return len(self.chunks)
