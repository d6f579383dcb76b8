"""`cosine generate --engine local` end to end, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[2]


def cosine(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COSINE_CONFIG=str(ROOT / "config.toml"))
    return subprocess.run([sys.executable, "-m", "cosine.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_generate_json_final_entry_matches_reference(demo_target, greedy_references):
    content = json.loads((DATA / "chat_prompts.json").read_text())[0]
    messages = json.dumps([{"role": "user", "content": content}])
    completed = cosine("generate", "--engine", "local", "--messages", messages, "--max-tokens", "24", "--json")
    assert completed.returncode == 0, completed.stderr
    final = json.loads(completed.stdout.strip().splitlines()[-1])
    assert final["type"] == "final" and final["finish_reason"] == "length"
    assert final["token_ids"] == greedy_references[0][:24]
    assert final["generated_tokens"] == 24
    assert final["text"] == demo_target.tokenizer.decode(final["token_ids"], skip_special_tokens=True)
    for field in ("prompt_tokens", "rounds", "draft_tokens", "accepted_tokens"):
        assert isinstance(final[field], int)


def test_generate_streams_text_and_honours_stop(demo_target):
    completed = cosine("generate", "--engine", "local", "--prompt", "Count: one, two, three,", "--max-tokens", "30", "--stop", '[" five"]')
    assert completed.returncode == 0, completed.stderr
    assert " five" not in completed.stdout
    assert "[stop]" in completed.stderr or "[length]" in completed.stderr


def test_bad_arguments_get_a_clear_error(demo_target):
    both = cosine("generate", "--engine", "local", "--prompt", "x", "--messages", "[]")
    assert both.returncode != 0 and "exactly one" in both.stderr
    too_long = cosine("generate", "--engine", "local", "--prompt", "hello " * 9000, "--json")
    assert too_long.returncode == 1
    assert "context limit" in json.loads(too_long.stdout.strip().splitlines()[-1])["error"]
