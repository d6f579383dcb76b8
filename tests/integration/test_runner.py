"""The model runner on the real target: packed batches, tree masks, KV-cache reuse and its byte budget."""

from __future__ import annotations

import logging

import pytest
import torch

from cosine.models.runner import ForwardItem, ModelRunner

pytestmark = pytest.mark.model


class CallCounter:
    """Counts decoder forward calls and the tokens fed to the embedding layer."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.tokens = 0
        decoder = model.get_decoder()
        self.handles = [
            decoder.register_forward_hook(self._on_decoder),
            decoder.embed_tokens.register_forward_hook(self._on_embed),
        ]

    def _on_decoder(self, module, args, output) -> None:
        self.calls += 1

    def _on_embed(self, module, args, output) -> None:
        self.tokens += args[0].numel()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def plain_next_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture()
def counter(demo_target):
    counter = CallCounter(demo_target.model)
    yield counter
    counter.close()


def test_batch_of_mixed_requests_is_one_forward_call(demo_target, chat_prompts, counter):
    runner = ModelRunner(demo_target.model)
    items = [
        ForwardItem("a", chat_prompts[0]),
        ForwardItem("b", chat_prompts[1], (10, 11, 12), (-1, 0, 0)),
        ForwardItem("c", chat_prompts[2][:20], (5,), (-1,)),
    ]
    logits = runner.forward(items)
    assert counter.calls == 1
    assert [tuple(rows.shape) for rows in logits] == [(1, runner.vocab_size), (4, runner.vocab_size), (2, runner.vocab_size)]


def test_tree_logits_match_plain_forward_of_each_path(demo_target, chat_prompts):
    """Every tree node sees exactly its ancestors: its logits equal a plain forward of its path."""
    runner = ModelRunner(demo_target.model)
    prompt_a, prompt_b = chat_prompts[3], chat_prompts[4][:25]  # different lengths in one batch
    tree_tokens, tree_parents = (504, 314, 6147, 28, 253), (-1, 0, -1, 2, 2)
    logits = runner.forward([ForwardItem("a", prompt_a, tree_tokens, tree_parents), ForwardItem("b", prompt_b, (42,), (-1,))])
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, prompt_a), atol=2e-3, rtol=1e-4)
    for node in range(len(tree_tokens)):
        path, parent = [], node
        while parent != -1:
            path.insert(0, tree_tokens[parent])
            parent = tree_parents[parent]
        expected = plain_next_logits(demo_target.model, list(prompt_a) + path)
        torch.testing.assert_close(logits[0][node + 1], expected, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(logits[1][1], plain_next_logits(demo_target.model, list(prompt_b) + [42]), atol=2e-3, rtol=1e-4)


def test_warm_round_feeds_only_new_tokens(demo_target, chat_prompts, counter):
    runner = ModelRunner(demo_target.model)
    prompt = list(chat_prompts[5])
    tree = (198, 504, 77)  # a chain of three drafted tokens
    runner.forward([ForwardItem("r", prompt, tree, (-1, 0, 1))])
    assert counter.tokens == len(prompt) + 3
    # Two drafted tokens accepted, then the target's bonus token: the next round's context.
    runner.commit("r", (0, 1), tree[:2])
    next_context = prompt + [198, 504, 1000]
    counter.tokens = 0
    logits = runner.forward([ForwardItem("r", next_context, (11, 12), (-1, 0))])
    assert counter.tokens == 1 + 2  # the bonus token and the new tree, nothing else
    assert runner.stats.reused_tokens >= len(prompt) + 2
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, next_context), atol=2e-3, rtol=1e-4)


def test_tree_commit_keeps_the_accepted_branch(demo_target, chat_prompts):
    """Accepting a second branch gathers its K/V rows into place; the next round is exact."""
    runner = ModelRunner(demo_target.model)
    prompt = list(chat_prompts[6])
    tree_tokens, tree_parents = (100, 200, 300, 400), (-1, -1, 1, 2)
    runner.forward([ForwardItem("r", prompt, tree_tokens, tree_parents)])
    runner.commit("r", (1, 2, 3), (200, 300, 400))
    context = prompt + [200, 300, 400, 9]
    logits = runner.forward([ForwardItem("r", context)])
    assert runner.cached_tokens("r") == len(context)
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, context), atol=2e-3, rtol=1e-4)


def test_missing_or_stale_cache_is_rebuilt(demo_target, chat_prompts, counter):
    runner = ModelRunner(demo_target.model)
    prompt = list(chat_prompts[7])
    runner.forward([ForwardItem("r", prompt)])
    runner.release("r")
    counter.tokens = 0
    runner.forward([ForwardItem("r", prompt)])
    assert counter.tokens == len(prompt)  # rebuilt from the tokens
    # A context that differs from what was cached (another worker ran the last round) reuses
    # only the common prefix.
    counter.tokens = 0
    changed = prompt[:-3] + [17, 18, 19, 20]
    logits = runner.forward([ForwardItem("r", changed)])
    assert counter.tokens == 4
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, changed), atol=2e-3, rtol=1e-4)


SMALL = 30  # context tokens of a small request: with the growth headroom, a 64-row cache
SMALL_CAPACITY = 64


def small(chat_prompts, index: int) -> list[int]:
    return list(chat_prompts[index][:SMALL])


def test_cache_bytes_follow_the_model_shape(demo_target, chat_prompts):
    """Bytes per token = layers x (K and V) x kv_heads x head_dim x 4 (fp32); a cache costs its capacity."""
    config = demo_target.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    runner = ModelRunner(demo_target.model)
    assert runner.bytes_per_token == expected == 46_080
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    assert runner.allocated_bytes == SMALL_CAPACITY * expected  # capacity, not the 30 valid rows


def test_lru_eviction_by_allocated_bytes(demo_target, chat_prompts):
    """The budget fits exactly three caches: the fourth evicts the least recently used one."""
    one_cache = SMALL_CAPACITY * ModelRunner(demo_target.model).bytes_per_token
    runner = ModelRunner(demo_target.model, max_cache_bytes=3 * one_cache)
    for index, key in enumerate("abc"):
        runner.forward([ForwardItem(key, small(chat_prompts, index))])
        assert runner.allocated_bytes == (index + 1) * one_cache
    assert runner.stats.evictions == 0
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])  # "a" becomes the most recent
    runner.forward([ForwardItem("d", small(chat_prompts, 3))])
    assert runner.cached_keys() == ["c", "a", "d"]
    assert runner.stats.evictions == 1 and runner.allocated_bytes == 3 * one_cache
    for index, key in enumerate("efg", start=4):
        runner.forward([ForwardItem(key, small(chat_prompts, index))])
        assert runner.allocated_bytes <= runner.max_cache_bytes
    assert runner.cached_keys() == ["e", "f", "g"] and runner.stats.evictions == 4


def test_eviction_spares_the_batch_being_prepared(demo_target, chat_prompts):
    """A new cache in a batch evicts the LRU cache outside the batch, not an older one inside it."""
    one_cache = SMALL_CAPACITY * ModelRunner(demo_target.model).bytes_per_token
    runner = ModelRunner(demo_target.model, max_cache_bytes=2 * one_cache)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    runner.forward([ForwardItem("b", small(chat_prompts, 1))])
    rebuilds = runner.stats.cache_rebuilds
    a_context = small(chat_prompts, 0) + [198]
    logits = runner.forward([ForwardItem("c", small(chat_prompts, 2)), ForwardItem("a", a_context)])
    assert runner.cached_keys() == ["c", "a"]
    assert runner.stats.evictions == 1 and runner.stats.cache_rebuilds == rebuilds + 1  # "a" kept its cache
    assert runner.allocated_bytes == 2 * one_cache
    torch.testing.assert_close(logits[1][0], plain_next_logits(demo_target.model, a_context), atol=2e-3, rtol=1e-4)


def test_growth_past_the_budget_evicts_others(demo_target, chat_prompts):
    """A cache that doubles when the budget is full evicts the LRU cache to make room."""
    bytes_per_token = ModelRunner(demo_target.model).bytes_per_token
    runner = ModelRunner(demo_target.model, max_cache_bytes=4 * SMALL_CAPACITY * bytes_per_token)
    for index, key in enumerate("abcd"):
        runner.forward([ForwardItem(key, small(chat_prompts, index))])
    assert runner.allocated_bytes == runner.max_cache_bytes
    longer = small(chat_prompts, 0) + list(chat_prompts[13][:50])  # 80 rows: "a" grows to 128
    logits = runner.forward([ForwardItem("a", longer)])
    assert runner.cached_keys() == ["c", "d", "a"] and runner.stats.evictions == 1
    assert runner.allocated_bytes == runner.max_cache_bytes
    assert runner.stats.reused_tokens >= SMALL - 1  # grown in place, not rebuilt
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, longer), atol=2e-3, rtol=1e-4)


def test_request_over_the_whole_budget_runs_alone(demo_target, chat_prompts, caplog):
    """Bigger than the budget: every other cache goes, it runs over budget, one warning."""
    bytes_per_token = ModelRunner(demo_target.model).bytes_per_token
    runner = ModelRunner(demo_target.model, max_cache_bytes=SMALL_CAPACITY * bytes_per_token)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    long_prompt = list(chat_prompts[13])  # 79 tokens: a 128-row cache
    longer = long_prompt + long_prompt  # 158 rows: grows to 256
    with caplog.at_level(logging.WARNING, logger="cosine.models.runner"):
        logits = runner.forward([ForwardItem("big", long_prompt)])
        assert runner.cached_keys() == ["big"] and runner.stats.evictions == 1
        assert runner.allocated_bytes == 128 * bytes_per_token
        runner.forward([ForwardItem("big", longer)])
    assert runner.allocated_bytes == 256 * bytes_per_token
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "big" in warnings[0].getMessage()
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, long_prompt), atol=2e-3, rtol=1e-4)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])  # back within budget
    assert runner.cached_keys() == ["a"] and runner.allocated_bytes == runner.max_cache_bytes


def test_release_frees_the_bytes(demo_target, chat_prompts):
    runner = ModelRunner(demo_target.model)
    one_cache = SMALL_CAPACITY * runner.bytes_per_token
    runner.forward([ForwardItem(key, small(chat_prompts, index)) for index, key in enumerate("abc")])
    assert runner.allocated_bytes == 3 * one_cache
    runner.release("a")
    assert runner.cached_keys() == ["b", "c"] and runner.allocated_bytes == 2 * one_cache
    runner.release_many(["b", "c", "never-cached"])
    assert runner.cached_keys() == [] and runner.allocated_bytes == 0
    assert runner.stats.releases == 3 and runner.stats.evictions == 0


def test_outputs_after_eviction_match_plain_forward(demo_target, chat_prompts, counter):
    """An evicted request's next round rebuilds its cache from its tokens; logits are exact."""
    runner = ModelRunner(demo_target.model, max_cache_bytes=SMALL_CAPACITY * ModelRunner(demo_target.model).bytes_per_token)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    runner.forward([ForwardItem("b", small(chat_prompts, 1))])
    assert runner.cached_tokens("a") == 0 and runner.stats.evictions == 1
    context = small(chat_prompts, 0) + [198]
    counter.tokens = 0
    logits = runner.forward([ForwardItem("a", context, (504,), (-1,))])
    assert counter.tokens == len(context) + 1  # every context token fed again, plus the tree
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, context), atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(logits[0][1], plain_next_logits(demo_target.model, context + [504]), atol=2e-3, rtol=1e-4)
