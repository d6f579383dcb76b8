"""Training text that exists offline: the built-in general mix, or a user's JSONL file.

The general mix reads text that a Debian machine has or can install from its own archive:

| source | where | apt package |
|---|---|---|
| `python-docs` | the Python documentation's reStructuredText sources (`html/_sources/**/*.rst.txt`) | `python3-doc` |
| `python-stdlib` | the standard library's own source (tests left out) | (Python itself) |
| `gcide` | the GNU Collaborative International Dictionary of English (definitions) | `dict-gcide` |
| `wordnet` | WordNet 3.0 glosses and example sentences | `wordnet-base` |

Besides the raw text, chat prompts are made from the same sources (define a word, explain a
module, summarise a passage, write a function described by a docstring) for the target to
answer: that is how the drafter sees the chat format. Documents come in a fixed, seeded order.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PYTHON_DOCS = [Path(f"/usr/share/doc/python3.{minor}/html/_sources") for minor in range(20, 8, -1)]
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET = Path("/usr/share/wordnet")
SOURCES = ("python-docs", "python-stdlib", "gcide", "wordnet")
APT_PACKAGES = {"python-docs": "python3-doc", "gcide": "dict-gcide", "wordnet": "wordnet-base"}


class CorpusError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    name: str
    text: str


def python_docs_dir() -> Path | None:
    return next((p for p in PYTHON_DOCS if p.is_dir()), None)


def stdlib_dir() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def available_sources() -> dict[str, bool]:
    return {
        "python-docs": python_docs_dir() is not None,
        "python-stdlib": (stdlib_dir() / "os.py").is_file(),
        "gcide": GCIDE.is_file(),
        "wordnet": (WORDNET / "data.noun").is_file(),
    }


def require_sources(names: tuple[str, ...] | list[str]) -> None:
    present = available_sources()
    missing = [n for n in names if n not in present or not present[n]]
    if missing:
        packages = sorted({APT_PACKAGES[n] for n in missing if n in APT_PACKAGES})
        unknown = [n for n in missing if n not in present]
        hint = f"; install with: apt-get install {' '.join(packages)}" if packages else ""
        raise CorpusError(f"corpus sources not found: {', '.join(missing)}{hint}" + (f" (known: {', '.join(SOURCES)})" if unknown else ""))


def iter_documents(source: str) -> Iterator[Document]:
    if source == "python-docs":
        root = python_docs_dir()
        for path in sorted(root.rglob("*.rst.txt")) if root else []:
            yield Document(source, str(path.relative_to(root)), _clean_rst(path.read_text(errors="replace")))
    elif source == "python-stdlib":
        root = stdlib_dir()
        for path in _stdlib_files(root):
            yield Document(source, str(path.relative_to(root)), path.read_text(errors="replace"))
    elif source == "gcide":
        yield from _gcide()
    elif source == "wordnet":
        yield from _wordnet()
    else:
        raise CorpusError(f"unknown corpus source {source!r} (known: {', '.join(SOURCES)})")


SKIPPED_STDLIB = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_STDLIB and not d.startswith("config-"))
        files.extend(Path(directory) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _clean_rst(text: str) -> str:
    text = re.sub(r"^\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor)::.*$", "", text, flags=re.M)
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`<]+?)(?: <[^>]+>)?`", r"\1", text)  # :func:`os.path` -> os.path
    return re.sub(r"\n{3,}", "\n\n", text)


def _gcide() -> Iterator[Document]:
    """Dictionary entries, 200 to a document, markup removed."""
    with gzip.open(GCIDE, "rt", errors="replace") as f:
        raw = f.read()
    entries = [e.strip() for e in re.split(r"\n(?=\S)", raw) if len(e.strip()) > 40]
    for start in range(0, len(entries), 200):
        text = "\n\n".join(re.sub(r"[ \t]+", " ", e) for e in entries[start : start + 200])
        yield Document("gcide", f"entries-{start}", text)


def wordnet_glosses() -> list[tuple[str, str]]:
    """(lemma, gloss) pairs from WordNet's data files."""
    pairs = []
    for part in ("noun", "verb", "adj", "adv"):
        path = WORDNET / f"data.{part}"
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            words = fields.split()
            if len(words) > 4:
                pairs.append((words[4].replace("_", " ").split("(")[0], gloss.strip()))
    return pairs


def _wordnet() -> Iterator[Document]:
    pairs = wordnet_glosses()
    for start in range(0, len(pairs), 300):
        text = "\n".join(f"{lemma}: {gloss}" for lemma, gloss in pairs[start : start + 300])
        yield Document("wordnet", f"glosses-{start}", text)


def general_mix(sources: tuple[str, ...] | list[str] = SOURCES, seed: int = 0) -> list[Document]:
    """Every document of the named sources, shuffled with ``seed``."""
    require_sources(sources)
    documents = [d for s in sources for d in iter_documents(s) if d.text.strip()]
    random.Random(seed).shuffle(documents)
    return documents


def chat_prompts(count: int, seed: int = 0) -> list[str]:
    """User prompts made from the offline sources, in four kinds (define, explain, summarise,
    write code), for the target to answer in its chat format."""
    rng = random.Random(seed)
    present = available_sources()
    makers = []
    if present["wordnet"]:
        glosses = [(w, g) for w, g in wordnet_glosses() if len(w) > 3 and " " not in w]
        makers.append(lambda: _define(rng, glosses))
    if present["python-stdlib"]:
        modules = sorted(p.stem for p in stdlib_dir().glob("*.py") if not p.stem.startswith("_"))
        functions = _docstring_functions(stdlib_dir(), limit=4000)
        makers.append(lambda: _explain_module(rng, modules))
        if functions:
            makers.append(lambda: _write_function(rng, functions))
    root = python_docs_dir()
    if root:
        paragraphs = _paragraphs(root)
        if paragraphs:
            makers.append(lambda: _summarise(rng, paragraphs))
    if not makers:
        raise CorpusError("no corpus source available to make chat prompts from; " + ", ".join(f"{k}: {v}" for k, v in APT_PACKAGES.items()))
    prompts = [rng.choice(makers)() for _ in range(count)]
    return prompts


def _define(rng: random.Random, glosses: list[tuple[str, str]]) -> str:
    word, _ = rng.choice(glosses)
    return rng.choice((
        f"What does the word \"{word}\" mean? Give an example sentence.",
        f"Define \"{word}\" in simple terms.",
        f"Explain the meaning of \"{word}\" and use it in a sentence.",
    ))


def _explain_module(rng: random.Random, modules: list[str]) -> str:
    module = rng.choice(modules)
    return rng.choice((
        f"What is the Python module `{module}` used for? Show a short example.",
        f"Explain what Python's `{module}` module does.",
        f"Give me a quick introduction to the `{module}` module in Python.",
    ))


def _write_function(rng: random.Random, functions: list[tuple[str, str]]) -> str:
    name, doc = rng.choice(functions)
    return f"Write a Python function `{name}` that does the following: {doc}"


def _summarise(rng: random.Random, paragraphs: list[str]) -> str:
    text = rng.choice(paragraphs)
    return rng.choice(("Summarise this text in two sentences:", "Give a one-sentence summary of the following:", "Explain this passage in plain words:")) + "\n\n" + text


def _docstring_functions(root: Path, limit: int) -> list[tuple[str, str]]:
    found = []
    pattern = re.compile(r'^def ([a-z][a-z0-9_]{3,})\([^)]*\):\n\s+"""([A-Z][^"\n]{20,120}\.)', re.M)
    for path in sorted(root.glob("*.py")):
        for match in pattern.finditer(path.read_text(errors="replace")):
            found.append((match.group(1), match.group(2)))
            if len(found) >= limit:
                return found
    return found


def _paragraphs(root: Path, limit: int = 5000) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.rst.txt")):
        for block in _clean_rst(path.read_text(errors="replace")).split("\n\n"):
            block = " ".join(block.split())
            if 300 <= len(block) <= 900 and block[0].isupper() and not block.startswith(("..", "::")) and block.count("`") < 6:
                found.append(block)
                if len(found) >= limit:
                    return found
    return found


def read_jsonl(path: Path) -> tuple[list[Document], list[list[dict]]]:
    """A user's data: each line {"text": ...} (forced as is), {"prompt": ...} or
    {"messages": [...]} (answered by the target in its chat format)."""
    documents, conversations = [], []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{number}: each line must be a JSON object")
            if isinstance(row.get("text"), str):
                documents.append(Document("data", f"{path.name}:{number}", row["text"]))
            elif isinstance(row.get("prompt"), str):
                conversations.append([{"role": "user", "content": row["prompt"]}])
            elif isinstance(row.get("messages"), list) and all(isinstance(m, dict) and "content" in m for m in row["messages"]):
                messages = [m for m in row["messages"] if m.get("role") != "assistant" or m is not row["messages"][-1]]
                conversations.append(messages)
            else:
                raise CorpusError(f"{path}:{number}: needs a \"text\", \"prompt\" or \"messages\" field")
    if not documents and not conversations:
        raise CorpusError(f"{path}: no rows")
    return documents, conversations


def read_eval_prompts(paths: list[Path]) -> list[str]:
    texts = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                texts.extend(m["content"] for m in row.get("messages", []))
                if "prompt" in row:
                    texts.append(row["prompt"])
    return texts
