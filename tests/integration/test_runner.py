"""The model runner on the real target: packed batches, tree masks, KV-cache reuse and its byte budget."""

from __future__ import annotations

import pytest
import torch

from cosine.models.runner import BLOCK_SIZE, ForwardItem, KVBudgetError, ModelRunner

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
    logits = runner.forward([ForwardItem("r", prompt)])
    # Rebuilt from the tokens, but for the full blocks still registered as a known prefix.
    shared = (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert counter.tokens == len(prompt) - shared and runner.stats.prefix_hit_tokens == shared
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, prompt), atol=2e-3, rtol=1e-4)
    # A context that differs from what was cached (another worker ran the last round) reuses
    # only the common prefix.
    counter.tokens = 0
    changed = prompt[:-3] + [17, 18, 19, 20]
    logits = runner.forward([ForwardItem("r", changed)])
    assert counter.tokens == 4
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, changed), atol=2e-3, rtol=1e-4)


SMALL = 30  # context tokens of a small request: two blocks


def small(chat_prompts, index: int) -> list[int]:
    """The last SMALL tokens of a prompt: no two share a first block (no prefix sharing)."""
    return list(chat_prompts[index][-SMALL:])


def blocks(count: int, runner: ModelRunner) -> int:
    return count * runner.bytes_per_block


def test_cache_bytes_follow_the_model_shape(demo_target, chat_prompts):
    """Bytes per token = layers x (K and V) x kv_heads x head_dim x 4 (fp32); a request holds whole blocks."""
    config = demo_target.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    runner = ModelRunner(demo_target.model, max_cache_bytes=64 * 2**20)
    assert runner.bytes_per_token == expected == 46_080 and runner.bytes_per_block == BLOCK_SIZE * expected
    assert runner.num_blocks == 64 * 2**20 // runner.bytes_per_block and runner.pool_bytes <= runner.max_cache_bytes
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    assert runner.allocated_bytes == blocks(2, runner)  # 30 rows: two blocks


def test_lru_eviction_when_the_pool_is_full(demo_target, chat_prompts):
    """The pool holds exactly three small requests: the fourth evicts the least recently used one."""
    bytes_per_block = ModelRunner(demo_target.model, max_cache_bytes=2**20).bytes_per_block
    runner = ModelRunner(demo_target.model, max_cache_bytes=6 * bytes_per_block)
    for index, key in enumerate("abc"):
        runner.forward([ForwardItem(key, small(chat_prompts, index))])
        assert runner.allocated_bytes == blocks(2 * (index + 1), runner)
    assert runner.stats.evictions == 0
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])  # "a" becomes the most recent
    runner.forward([ForwardItem("d", small(chat_prompts, 3))])
    assert runner.cached_keys() == ["c", "a", "d"]
    assert runner.stats.evictions == 1 and runner.allocated_bytes == blocks(6, runner)
    for index, key in enumerate("efg", start=4):
        runner.forward([ForwardItem(key, small(chat_prompts, index))])
        assert runner.allocated_bytes <= runner.pool_bytes
    assert runner.cached_keys() == ["e", "f", "g"] and runner.stats.evictions == 4


def test_eviction_spares_the_batch_being_prepared(demo_target, chat_prompts):
    """A new request in a batch evicts the LRU request outside the batch, not an older one inside it."""
    bytes_per_block = ModelRunner(demo_target.model, max_cache_bytes=2**20).bytes_per_block
    runner = ModelRunner(demo_target.model, max_cache_bytes=4 * bytes_per_block)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    runner.forward([ForwardItem("b", small(chat_prompts, 1))])
    rebuilds = runner.stats.cache_rebuilds
    a_context = small(chat_prompts, 0) + [198]
    logits = runner.forward([ForwardItem("c", small(chat_prompts, 2)), ForwardItem("a", a_context)])
    assert runner.cached_keys() == ["c", "a"]
    assert runner.stats.evictions == 1 and runner.stats.cache_rebuilds == rebuilds + 1  # "a" kept its cache
    torch.testing.assert_close(logits[1][0], plain_next_logits(demo_target.model, a_context), atol=2e-3, rtol=1e-4)


def test_batch_over_the_pool_raises_and_each_request_alone_runs(demo_target, chat_prompts):
    """Requests that do not fit together raise KVBudgetError (nothing half-done); each alone runs;
    one request bigger than the whole pool raises alone."""
    bytes_per_block = ModelRunner(demo_target.model, max_cache_bytes=2**20).bytes_per_block
    runner = ModelRunner(demo_target.model, max_cache_bytes=3 * bytes_per_block)
    items = [ForwardItem("a", small(chat_prompts, 0)), ForwardItem("b", small(chat_prompts, 1))]
    with pytest.raises(KVBudgetError, match="kv_cache_mb"):
        runner.forward(items)
    for item in items:
        logits = runner.forward([item])
        torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, item.context), atol=2e-3, rtol=1e-4)
    with pytest.raises(KVBudgetError):
        runner.forward([ForwardItem("big", list(chat_prompts[13]))])  # 79 tokens: five blocks
    logits = runner.forward([ForwardItem("a", small(chat_prompts, 0) + [198])])  # the runner still works
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, small(chat_prompts, 0) + [198]), atol=2e-3, rtol=1e-4)


def test_release_frees_the_blocks(demo_target, chat_prompts):
    runner = ModelRunner(demo_target.model)
    runner.forward([ForwardItem(key, small(chat_prompts, index)) for index, key in enumerate("abc")])
    assert runner.allocated_bytes == blocks(6, runner)
    runner.release("a")
    assert runner.cached_keys() == ["b", "c"] and runner.allocated_bytes == blocks(4, runner)
    runner.release_many(["b", "c", "never-cached"])
    assert runner.cached_keys() == [] and runner.allocated_bytes == 0
    assert runner.stats.releases == 3 and runner.stats.evictions == 0


def test_outputs_after_eviction_match_plain_forward(demo_target, chat_prompts, counter):
    """An evicted request's next round rebuilds its cache from its tokens; logits are exact."""
    bytes_per_block = ModelRunner(demo_target.model, max_cache_bytes=2**20).bytes_per_block
    runner = ModelRunner(demo_target.model, max_cache_bytes=2 * bytes_per_block)
    runner.forward([ForwardItem("a", small(chat_prompts, 0))])
    runner.forward([ForwardItem("b", small(chat_prompts, 1))])  # takes a's blocks, registered one included
    assert runner.cached_tokens("a") == 0 and runner.stats.evictions == 1
    context = small(chat_prompts, 0) + [198]
    counter.tokens = 0
    logits = runner.forward([ForwardItem("a", context, (504,), (-1,))])
    assert counter.tokens == len(context) + 1  # every context token fed again, plus the tree
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, context), atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(logits[0][1], plain_next_logits(demo_target.model, context + [504]), atol=2e-3, rtol=1e-4)


def test_shared_prompt_prefix_is_computed_once(demo_target, chat_prompts, counter):
    """Requests with the same system prompt: the second feeds only what follows the shared full
    blocks, holds them without a copy, and both get exact logits, also after the first one's
    cache diverges inside a block the second one shares."""
    system = list(chat_prompts[0][:40])  # the chat template's system prompt and more: two full blocks
    first, second = system + [504, 314, 6147], system + [28, 253]
    runner = ModelRunner(demo_target.model)
    runner.forward([ForwardItem("a", first)])
    # What a forward would reuse: a's own rows (all but the last token, always fed), b's shared blocks.
    assert runner.reusable_tokens("a", first) == len(first) - 1 and runner.reusable_tokens("a", first[:30]) == 29
    assert runner.reusable_tokens("b", second) == 2 * BLOCK_SIZE and runner.reusable_tokens("c", [7] + second) == 0
    held = runner.allocated_bytes
    counter.tokens = 0
    logits = runner.forward([ForwardItem("b", second)])
    assert counter.tokens == len(second) - 2 * BLOCK_SIZE and runner.stats.prefix_hit_tokens == 2 * BLOCK_SIZE
    assert runner.allocated_bytes == held + blocks(1, runner)  # only b's own third block
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, second), atol=2e-3, rtol=1e-4)
    # "a" goes back into its second (shared, registered) block: it may not write there.
    diverged = system[:20] + [9, 10, 11]
    logits = runner.forward([ForwardItem("a", diverged), ForwardItem("b", second + [42])])
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, diverged), atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(logits[1][0], plain_next_logits(demo_target.model, second + [42]), atol=2e-3, rtol=1e-4)


def test_trees_of_several_requests_in_one_attention_group(demo_target, chat_prompts):
    """Cached requests verifying trees of different shapes together (one padded attention call
    per layer): every node's logits equal a plain forward of its path."""
    runner = ModelRunner(demo_target.model)
    prompts = [list(chat_prompts[i]) for i in (8, 9, 10)]
    runner.forward([ForwardItem(f"r{i}", p) for i, p in enumerate(prompts)])
    trees = [((504, 314, 6147, 28), (-1, 0, -1, 2)), ((42,), (-1,)), ((11, 12, 13, 14, 15), (-1, 0, 1, 0, 3))]
    contexts = [p + [198] for p in prompts]
    logits = runner.forward([ForwardItem(f"r{i}", c, t, par) for i, (c, (t, par)) in enumerate(zip(contexts, trees))])
    for rows, context, (tokens, parents) in zip(logits, contexts, trees):
        torch.testing.assert_close(rows[0], plain_next_logits(demo_target.model, context), atol=2e-3, rtol=1e-4)
        for node in range(len(tokens)):
            path, parent = [], node
            while parent != -1:
                path.insert(0, tokens[parent])
                parent = parents[parent]
            torch.testing.assert_close(rows[node + 1], plain_next_logits(demo_target.model, context + path), atol=2e-3, rtol=1e-4)


def test_prefill_chunks_then_the_rest(demo_target, chat_prompts, counter):
    """A long context sent in chunks (prefixes first) feeds each token once; the last chunk's
    logits are exact, next to a small request in the same forwards."""
    runner = ModelRunner(demo_target.model)
    long_prompt = list(chat_prompts[13]) + list(chat_prompts[14])
    runner.forward([ForwardItem("s", small(chat_prompts, 0))])
    counter.tokens = 0
    assert len(long_prompt) > 100
    for step, end in enumerate((50, 100, len(long_prompt)), start=1):
        assert runner.reusable_tokens("long", long_prompt) == (0 if step == 1 else (50, 100)[step - 2])
        logits = runner.forward([ForwardItem("long", long_prompt[:end]), ForwardItem("s", small(chat_prompts, 0) + [198] * step)])
    assert counter.tokens == len(long_prompt) + 3
    torch.testing.assert_close(logits[0][0], plain_next_logits(demo_target.model, long_prompt), atol=2e-3, rtol=1e-4)
