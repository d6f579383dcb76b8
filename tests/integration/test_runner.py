"""The model runner on the real target: packed batches, tree masks, KV-cache reuse."""

from __future__ import annotations

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
    assert [tuple(l.shape) for l in logits] == [(1, runner.vocab_size), (4, runner.vocab_size), (2, runner.vocab_size)]


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


def test_lru_eviction_respects_the_token_budget(demo_target, chat_prompts):
    runner = ModelRunner(demo_target.model, max_cached_tokens=120)
    runner.forward([ForwardItem("a", chat_prompts[0][:50])])
    runner.forward([ForwardItem("b", chat_prompts[1][:50])])
    runner.forward([ForwardItem("c", chat_prompts[2][:50])])
    assert runner.cached_tokens("a") == 0 and runner.cached_tokens("c") == len(chat_prompts[2][:50])
