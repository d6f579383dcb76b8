"""Greedy output of the local engine equals transformers `generate` on the real target.

20 chat prompts x 128 new tokens (6 for the often-wrong drafter at batch 1), for a drafter that is often wrong (the target's first two
layers: early exit) and one that is often right (the target without layer 15: layer skip), with
single (batch 1) and batched verification of mixed-length requests, in chain and tree mode.
"""

from __future__ import annotations

import pytest

from cosine.core.protocol import eos_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.drafters.model import ModelDrafter, early_exit_model, layer_skip_model
from cosine.engine import GenerationRequest, LocalEngine
from cosine.models.runner import ModelRunner
from cosine.policy.window import WindowPolicy
from tests.conftest import REFERENCE_TOKENS
from tests.integration.lossless import assert_lossless, assert_speculated

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def often_wrong(demo_target):
    return ModelDrafter("early-exit-2", ModelRunner(early_exit_model(demo_target.model, 2)))


@pytest.fixture(scope="module")
def often_right(demo_target):
    return ModelDrafter("skip-15", ModelRunner(layer_skip_model(demo_target.model, [15])))


def run(demo_target, prompts, drafters, *, mode="chain", max_batch=8, window=WindowPolicy(4, 1, 8)):
    engine = LocalEngine(ModelRunner(demo_target.model), demo_target.tokenizer, drafters, mode=mode, max_batch=max_batch, window=window)
    eos = eos_token_ids(demo_target.tokenizer, demo_target.model.config)
    requests = [
        GenerationRequest(f"r{i}", tuple(ids), SamplingParams(), StopRules(REFERENCE_TOKENS, eos)) for i, ids in enumerate(prompts)
    ]
    return engine.generate(requests)


def check(demo_target, prompts, references, results):
    assert_lossless(demo_target.model, prompts, [r.token_ids for r in results], references)
    assert_speculated(results)


def test_often_wrong_drafter_single_verification(demo_target, chat_prompts, greedy_references, often_wrong):
    # Six of the prompts: batch 1 costs a target forward per ~1.3 tokens with this drafter (the
    # batched cases and the slow single-verification cases cover all twenty).
    prompts, references = chat_prompts[:6], greedy_references[:6]
    results = run(demo_target, prompts, [often_wrong], max_batch=1)
    check(demo_target, prompts, references, results)
    assert sum(r.accepted_tokens for r in results) / sum(r.draft_tokens for r in results) < 0.3


def test_often_wrong_drafter_batched_verification(demo_target, chat_prompts, greedy_references, often_wrong):
    results = run(demo_target, chat_prompts, [often_wrong], max_batch=8)
    check(demo_target, chat_prompts, greedy_references, results)


def test_often_right_drafter_batched_verification(demo_target, chat_prompts, greedy_references, often_right):
    results = run(demo_target, chat_prompts, [often_right], max_batch=8)
    check(demo_target, chat_prompts, greedy_references, results)
    assert sum(r.accepted_tokens for r in results) / sum(r.draft_tokens for r in results) > 0.4


@pytest.mark.slow
def test_often_right_drafter_single_verification(demo_target, chat_prompts, greedy_references, often_right):
    results = run(demo_target, chat_prompts, [often_right], max_batch=1)
    check(demo_target, chat_prompts, greedy_references, results)


def test_tree_of_cooperating_drafters_batched(demo_target, chat_prompts, greedy_references, often_right, often_wrong):
    drafters = [often_right, often_wrong, PromptLookupDrafter()]
    results = run(demo_target, chat_prompts, drafters, mode="tree", max_batch=8)
    check(demo_target, chat_prompts, greedy_references, results)


@pytest.mark.slow
def test_tree_single_verification(demo_target, chat_prompts, greedy_references, often_right, often_wrong):
    results = run(demo_target, chat_prompts, [often_wrong, often_right], mode="tree", max_batch=1)
    check(demo_target, chat_prompts, greedy_references, results)
