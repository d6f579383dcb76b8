"""A lone request's forward: its rows read as a view of the pool when they are one run of
blocks (no gather, no mask for a decoding step), gathered otherwise; the logits are the model's
either way."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.models.runner import BLOCK_SIZE, ForwardItem, ModelRunner


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]


def test_a_lone_request_reads_its_rows_in_place_and_matches_the_model():
    model = tiny()
    runner = ModelRunner(model, max_cache_bytes=2**20)
    tokens = [(7 * i + 3) % 120 + 1 for i in range(60)]
    runner.forward([ForwardItem("r", tokens[:40])])
    _, batch, *_ = runner._prepare([ForwardItem("r", tokens[:41])])
    assert batch.groups[0].contiguous_from >= 0 and batch.groups[0].mask is None  # a decoding step: a view, no mask
    reference = full_logits(model, tokens)
    for end in range(41, 46):  # decoding steps
        row = runner.forward([ForwardItem("r", tokens[:end])])[0][0]
        torch.testing.assert_close(row, reference[end - 1], atol=1e-4, rtol=1e-4)
    chain = runner.forward([ForwardItem("r", tokens[:46], tuple(tokens[46:50]), (-1, 0, 1, 2))])[0]
    torch.testing.assert_close(chain, reference[45:50], atol=1e-4, rtol=1e-4)


def test_a_lone_request_with_scattered_blocks_is_gathered_and_matches_the_model():
    model = tiny()
    runner = ModelRunner(model, max_cache_bytes=2**20)
    mine = [(5 * i + 1) % 120 + 1 for i in range(3 * BLOCK_SIZE)]
    other = [(11 * i + 2) % 120 + 1 for i in range(3 * BLOCK_SIZE)]
    for end in (BLOCK_SIZE, 2 * BLOCK_SIZE):  # the two requests' blocks interleave in the pool
        runner.forward([ForwardItem("mine", mine[:end])])
        runner.forward([ForwardItem("other", other[:end])])
    blocks = runner._sequences["mine"].blocks
    assert any(b != blocks[0] + i for i, b in enumerate(blocks))
    item = ForwardItem("mine", mine[: 2 * BLOCK_SIZE + 1])
    _, batch, *_ = runner._prepare([item])
    assert batch.groups[0].contiguous_from < 0
    row = runner.forward([item])[0][0]
    torch.testing.assert_close(row, full_logits(model, mine)[2 * BLOCK_SIZE], atol=1e-4, rtol=1e-4)


def test_forgotten_prefixes_give_their_blocks_back_lowest_first():
    """Regression (memory): the verifier's start-up forwards (warm-up, cost profile) left their
    blocks registered as prefixes nobody shares, so real requests touched fresh pool pages beside
    them (~125 MB more resident). Forgotten, their blocks are the next ones taken; a live
    request's blocks and output are untouched."""
    model = tiny()
    runner = ModelRunner(model, max_cache_bytes=2**20)
    live = [(3 * i + 1) % 120 + 1 for i in range(BLOCK_SIZE + 3)]
    runner.forward([ForwardItem("live", live)])
    for i in range(3):
        runner.forward([ForwardItem(f"profile-{i}", [(i + 2 + j) % 120 + 1 for j in range(2 * BLOCK_SIZE + 1)])])
    profile_blocks = {b for i in range(3) for b in runner._sequences[f"profile-{i}"].blocks}
    runner.release_many([f"profile-{i}" for i in range(3)])
    assert runner._blocks.cached  # full blocks stay registered as prefixes
    runner.forget_prefixes()
    assert not runner._blocks.cached and not profile_blocks & set(runner._blocks.digest_of)
    assert set(runner._blocks.digest_of) == set(runner._sequences["live"].blocks[:1])  # the live request's full block
    taken = [runner._blocks.take() for _ in range(len(profile_blocks))]
    assert set(taken) == profile_blocks and taken == sorted(taken)
    for block in taken:
        runner._blocks.drop(block)
    row = runner.forward([ForwardItem("live", live + [5])])[0][0]
    torch.testing.assert_close(row, full_logits(model, live + [5])[-1], atol=1e-4, rtol=1e-4)


def test_a_feature_requests_prefill_comes_in_chunks_with_the_states_of_one_forward():
    """A feature request's first round is verified in prefill chunks, each result carrying the
    states of its chunk's positions only (a prompt's states in one result could pass the wire's
    size cap); the chunks' rows put together are the rows one forward of the prompt gives, and
    the round's own result carries the rest."""
    from cosine.config import Config
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyItem
    from cosine.wire.convert import states_from_bytes
    from cosine.workers.verifier import VerifierWorker

    model = tiny()
    prompt = [(7 * i + 3) % 120 + 1 for i in range(50)]

    def verifier() -> VerifierWorker:
        worker = VerifierWorker(Config(), "redis://unused")
        worker.runner = ModelRunner(model, max_cache_bytes=2**22)
        return worker

    def item(features_from: int, chunk: int) -> VerifyItem:
        return VerifyItem("r", 0, prompt, Candidate("r", 0, [], [], [], [], []), SamplingParams(), "", features_from, chunk)

    whole = verifier()._verify([item(0, 0)])[0]
    chunked, rows, at = verifier(), [], 0
    while True:
        result = chunked._verify([item(at, 16)])[0]
        assert result.features_start == at
        rows.append(torch.from_numpy(states_from_bytes(result.features, 64)))
        if not result.prefilled:
            break
        assert result.prefilled == at + 16 and len(rows[-1]) == 16
        at = result.prefilled
    assert len(rows) == 4 and (result.accepted_tokens, result.next_token) == (whole.accepted_tokens, whole.next_token)
    assert torch.allclose(torch.cat(rows), torch.from_numpy(states_from_bytes(whole.features, 64)), atol=2e-3)
