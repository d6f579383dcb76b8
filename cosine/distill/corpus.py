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
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# COSINE_CORPUS_ROOT: a directory holding copies of these paths (for a machine without the packages).
_ROOT = Path(os.environ.get("COSINE_CORPUS_ROOT", "/"))
PYTHON_DOCS = [_ROOT / f"usr/share/doc/python3.{minor}/html/_sources" for minor in range(20, 8, -1)]
GCIDE = _ROOT / "usr/share/dictd/gcide.dict.dz"
WORDNET = _ROOT / "usr/share/wordnet"
log = logging.getLogger(__name__)
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


def chat_prompts(count: int, seed: int = 0, exclude_words: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """User prompts made offline, for the target to answer in its chat format: everyday
    questions and tasks about frequent WordNet words (half), small coding and arithmetic tasks,
    and prompts made from the sources (define a word, explain a module, write a function
    described by a docstring, summarise a documentation paragraph).

    ``exclude_words``: no prompt built from one of these words (lower case) is made, so the
    words of evaluation prompts can be kept out of training.
    """
    rng = random.Random(seed)
    present = available_sources()
    makers: list[tuple[float, Callable[[], str]]] = [(0.12, lambda: _coding_task(rng)), (0.12, lambda: _arithmetic(rng))]
    if present["wordnet"]:
        words, glosses = _wordnet_pools(exclude_words)
        if words["noun"]:
            makers.append((0.5, lambda: _everyday(rng, words)))
        else:  # a copy of WordNet without its sense counts (cntlist.rev): no frequent words to ask about
            log.warning("%s not found: no everyday prompts", WORDNET / "cntlist.rev")
        makers.append((0.05, lambda: _define(rng, glosses)))
    if present["python-stdlib"]:
        makers += _stdlib_makers(rng, exclude_words, 0.05)
    root = python_docs_dir()
    if root:
        paragraphs = _paragraphs(root)
        if paragraphs:
            makers.append((0.06, lambda: _summarise(rng, paragraphs)))
    weights = [w for w, _ in makers]
    return [rng.choices(makers, weights)[0][1]() for _ in range(count)]


def _wordnet_pools(exclude_words) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Frequent nouns, verbs and adjectives, and (word, gloss) pairs, without ``exclude_words``."""
    words = {pos: [w for w in frequent_lemmas(pos) if w not in exclude_words] for pos in ("noun", "verb", "adj")}
    glosses = [(w, g) for w, g in wordnet_glosses() if len(w) > 3 and " " not in w and w.lower() not in exclude_words]
    return words, glosses


def _stdlib_makers(rng: random.Random, exclude_words, weight: float) -> list[tuple[float, Callable[[], str]]]:
    """Prompt makers from the standard library: explain a module, write a function its docstring describes."""
    modules = sorted(p.stem for p in stdlib_dir().glob("*.py") if not p.stem.startswith("_") and p.stem not in exclude_words)
    functions = _docstring_functions(stdlib_dir(), limit=4000)
    makers = [(weight, lambda: _explain_module(rng, modules))]
    if functions:
        makers.append((weight, lambda: _write_function(rng, functions)))
    return makers


# The experts' data: which prompt makers and which text sources belong to each domain.
DOMAINS = ("code", "chat", "math")
DOMAIN_SOURCES = {"code": ("python-stdlib", "python-docs"), "chat": ("wordnet", "gcide"), "math": ()}


def domain_prompts(domain: str, count: int, seed: int = 0, exclude_words: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Chat prompts of one expert's domain, made offline like ``chat_prompts``: ``code``
    (coding tasks in several languages, programming questions, module explanations, functions
    described by stdlib docstrings), ``chat`` (everyday questions about frequent WordNet words,
    definitions, summaries of documentation paragraphs), ``math`` (arithmetic and word problems
    of kinds the evaluation sets do not use: see ``_math_problem``)."""
    if domain not in DOMAINS:
        raise CorpusError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    rng = random.Random(seed)
    present = available_sources()
    makers: list[tuple[float, Callable[[], str]]] = []
    if domain == "code":
        makers += [(0.4, lambda: _coding_task(rng)), (0.2, lambda: _programming_question(rng))]
        if present["python-stdlib"]:
            makers += _stdlib_makers(rng, exclude_words, 0.2)
    elif domain == "math":
        makers += [(0.3, lambda: _arithmetic(rng)), (0.7, lambda: _math_problem(rng))]
    else:
        require_sources(["wordnet"])
        words, glosses = _wordnet_pools(exclude_words)
        if words["noun"]:
            makers.append((0.75, lambda: _everyday(rng, words)))
        makers.append((0.1, lambda: _define(rng, glosses)))
        root = python_docs_dir()
        paragraphs = _paragraphs(root) if root else []
        if paragraphs:
            makers.append((0.15, lambda: _summarise(rng, paragraphs)))
    weights = [w for w, _ in makers]
    return [rng.choices(makers, weights)[0][1]() for _ in range(count)]


PROGRAMMING_TOPICS = (
    "recursion", "a hash map", "a linked list", "binary search", "a closure", "a generator in Python", "exception handling",
    "unit testing", "a race condition", "a REST API", "garbage collection", "big-O notation", "a queue", "version control with git",
    "a virtual environment in Python", "type hints in Python", "list comprehensions", "a lambda function", "an iterator",
    "a context manager", "inheritance", "an interface", "a deadlock", "a database transaction", "a JSON file", "a regular expression",
)
QUESTION_TEMPLATES = (
    "What is {t} in programming? Give a short code example.",
    "Explain {t} to a beginner programmer.",
    "When should I use {t}, and when should I avoid it?",
    "What are common bugs related to {t}, and how do I avoid them?",
)


def _programming_question(rng: random.Random) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(t=rng.choice(PROGRAMMING_TOPICS))


def _math_problem(rng: random.Random) -> str:
    """Problem kinds apart from the evaluation sets' (no travel times, equations, discounts, dice,
    areas of rectangles, primes, least common multiples, compound interest, percentage changes,
    mixtures or average speeds)."""
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randint(12, 180), rng.randint(12, 180)
        return f"Find the greatest common divisor of {a} and {b}. Show the steps."
    if kind == 1:
        values = sorted(rng.randint(1, 60) for _ in range(rng.randint(5, 8)))
        rng.shuffle(values)
        return f"Find the mean and the median of these numbers: {', '.join(map(str, values))}."
    if kind == 2:
        r = rng.randint(2, 25)
        return f"What is the area and the circumference of a circle with radius {r} cm? Use pi = 3.14."
    if kind == 3:
        total, a, b = rng.randint(3, 40) * 10, rng.randint(1, 6), rng.randint(1, 6)
        return f"Share {total} apples between two people in the ratio {a}:{b}. How many does each get?"
    if kind == 4:
        p, n = rng.randint(5, 60), rng.randint(40, 900)
        return f"What is {p}% of {n}? Explain how you work it out."
    if kind == 5:
        length, width, height = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 20)
        return f"A box is {length} cm long, {width} cm wide and {height} cm high. What is its volume?"
    if kind == 6:
        a, b = rng.randint(20, 90), rng.randint(20, 80)
        return f"Two angles of a triangle are {a} and {b} degrees. What is the third angle? Explain."
    if kind == 7:
        principal, rate, years = rng.randint(2, 40) * 100, rng.randint(2, 9), rng.randint(2, 6)
        return f"What is the simple interest on ${principal} at {rate}% per year for {years} years?"
    if kind == 8:
        n = rng.choice([k * k for k in range(4, 40)])
        return f"What is the square root of {n}? How can you check your answer?"
    count, price, other = rng.randint(2, 12), rng.randint(2, 30), rng.randint(2, 12)
    thing = rng.choice(("pencils", "notebooks", "apples", "tickets", "bottles of water"))
    return f"If {count} {thing} cost ${count * price}, how much do {other} {thing} cost? Explain your reasoning."


def frequent_lemmas(pos: str, min_count: int = 3) -> list[str]:
    """Single-word lemmas of a part of speech (noun, verb, adj) used at least ``min_count``
    times in WordNet's sense-tagged corpus (``cntlist.rev``), most frequent first."""
    code = {"noun": ("1",), "verb": ("2",), "adj": ("3", "5")}[pos]
    counts: dict[str, int] = {}
    path = WORDNET / "cntlist.rev"
    if not path.is_file():
        return []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or "%" not in parts[0]:
            continue
        lemma, rest = parts[0].split("%", 1)
        if rest[:1] in code and lemma.isalpha() and len(lemma) > 2:
            counts[lemma] = counts.get(lemma, 0) + int(parts[2])
    return [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


NOUN_TEMPLATES = (
    "What is {a} {n}? Explain it simply.",
    "Tell me three interesting facts about {n}.",
    "How do people use {n} in everyday life?",
    "Write a short poem about {n}.",
    "Write a short story of about 100 words that involves {a} {n}.",
    "What are the pros and cons of {n}?",
    "Explain the history of {n} in a few sentences.",
    "What is the difference between {n} and {m}?",
    "Give me some practical tips about {n}.",
    "Why is {n} important? Give two reasons.",
    "Describe {n} to someone who has never heard of it.",
    "Write a polite email to my {r} about {n}.",
    "Can you suggest a fun activity that involves {n}?",
    "List five words related to {n} and explain each briefly.",
    "How would you explain {n} to a child?",
    "What questions should I ask before buying {a} {n}?",
)
VERB_TEMPLATES = (
    "How can I learn to {v} better?",
    "What are common mistakes people make when they {v}?",
    "Give me a step-by-step plan to {v} more often.",
    "Why do people {v}? Explain briefly.",
    "Write a motivational message for someone who wants to {v}.",
)
ADJ_TEMPLATES = (
    "What does it mean when something is {j}? Give examples.",
    "Write two sentences describing a {j} day.",
    "What is the opposite of {j}, and how are the two words used?",
)
RELATIONS = ("manager", "neighbour", "teacher", "landlord", "colleague", "friend", "doctor", "coach")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _everyday(rng: random.Random, words: dict[str, list[str]]) -> str:
    kind = rng.choices(("noun", "verb", "adj"), (0.7, 0.2, 0.1))[0]
    pool = words[kind][:4000] or words["noun"]
    word = rng.choice(pool)
    if kind == "verb":
        return rng.choice(VERB_TEMPLATES).format(v=word)
    if kind == "adj":
        return rng.choice(ADJ_TEMPLATES).format(j=word)
    other = rng.choice(words["noun"][:4000])
    return rng.choice(NOUN_TEMPLATES).format(n=word, m=other, a=_article(word), r=rng.choice(RELATIONS))


CODING_TASKS = (
    "counts the vowels in a string", "reverses the order of the words in a sentence", "returns the factorial of n",
    "flattens a nested list", "removes duplicates from a list while keeping the order", "converts Celsius to Fahrenheit",
    "returns the most common element of a list", "capitalizes the first letter of every word", "checks whether a year is a leap year",
    "returns the n-th Fibonacci number", "counts how often each word appears in a text", "returns the second largest number in a list",
    "checks whether two strings are anagrams", "converts a number of seconds to hours, minutes and seconds",
    "splits a list into chunks of size n", "returns the sum of the digits of an integer", "transposes a matrix given as a list of lists",
    "finds the longest word in a sentence", "converts a Roman numeral to an integer", "validates that a string contains only digits",
)
LANGUAGES = ("Python", "Python", "Python", "JavaScript", "Java", "C", "Rust", "Ruby")


def _coding_task(rng: random.Random) -> str:
    task, language = rng.choice(CODING_TASKS), rng.choice(LANGUAGES)
    return rng.choice((
        f"Write a {language} function that {task}.",
        f"Write a {language} function that {task}, and explain how it works.",
        f"How would I write code in {language} that {task}? Keep it short.",
    ))


def _arithmetic(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"What is {rng.randint(12, 99)} times {rng.randint(12, 99)}? Show your work."
    if kind == 1:
        value = rng.randint(2, 500)
        a, b = rng.choice((("kilometres", "miles"), ("pounds", "kilograms"), ("litres", "gallons"), ("inches", "centimetres")))
        return f"Convert {value} {a} to {b}, and explain the conversion."
    if kind == 2:
        p, q, r, s = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
        return f"What is {p}/{q} + {r}/{s}? Give the answer as a simplified fraction."
    if kind == 3:
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = ", ".join(str(start + step * i) for i in range(5))
        return f"What is the next number in the sequence {seq}? Explain the pattern."
    if kind == 4:
        n, k, m = rng.randint(10, 60), rng.randint(1, 9), rng.randint(2, 30)
        thing = rng.choice(("marbles", "stickers", "books", "cookies", "stamps"))
        return f"Sam has {n} {thing}. He gives away {k} and then gets {m} more. How many {thing} does he have now?"
    return f"What is {rng.randint(100, 9999)} divided by {rng.randint(2, 19)}? Give the quotient and the remainder."


def eval_words(paths: list[Path]) -> set[str]:
    """Lower-case words (3+ letters) of the prompts in evaluation JSONL files."""
    words: set[str] = set()
    for text in read_eval_prompts(paths):
        words.update(w.lower() for w in re.findall(r"[A-Za-z]{3,}", text))
    return words


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
