"""The local engine with cooperating drafters on a tiny random-weight target: step and tree
fusion stay lossless, routing pins and chooses, and per-drafter counts match what was verified."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.core.tree import DraftChain
from cosine.drafters.base import Drafter
from cosine.engine import GenerationRequest, LocalEngine
from cosine.models.runner import ModelRunner
from cosine.policy.routing import RoutingPolicy
from cosine.policy.window import WindowPolicy

EOS = 127


class Tokens:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + t % 26) for t in ids if not (skip_special_tokens and t == EOS))


class Oracle(Drafter):
    """Proposes the target's greedy continuation (a fixed proposal), wrong from draft position
    ``wrong_at`` on, or at exactly the positions in ``wrong`` (step mode: the step is the position)."""

    def __init__(self, name, model, wrong_at=99, confidence=0.9, wrong=()):
        self.name, self.model, self.wrong_at, self.confidence, self.wrong = name, model, wrong_at, confidence, set(wrong)

    def propose(self, requests):
        chains = []
        for request in requests:
            context, tokens = list(request.context), []
            for depth in range(request.window):
                with torch.inference_mode():
                    token = int(self.model(torch.tensor([context])).logits[0, -1].argmax())
                position = request.step + depth
                token = (token + 1) % 100 if position >= self.wrong_at or position in self.wrong else token
                tokens.append(token)
                context.append(token)
            chains.append(DraftChain(tuple(tokens), (self.confidence,) * len(tokens), None, self.name))
        return chains


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def greedy(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n, do_sample=False,
                             pad_token_id=EOS, eos_token_id=EOS)
    return out[0, len(prompt) :].tolist()


def run(model, drafters, mode, routing=None, expert=None, max_tree_nodes=32, window=4):
    engine = LocalEngine(ModelRunner(model), Tokens(), drafters, mode=mode, window=WindowPolicy(window, window, window, False),
                         max_batch=2, max_tree_nodes=max_tree_nodes, routing=routing)
    prompts = [[3, 14, 15, 92, 65], [27, 18, 28, 18, 28, 45]]
    requests = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(), StopRules(12, frozenset({EOS})), expert) for i, p in enumerate(prompts)]
    return prompts, engine.generate(requests)


@pytest.mark.parametrize("mode", ["tree", "step"])
def test_cooperating_drafters_stay_lossless(model, mode):
    drafters = [Oracle("early-wrong", model, wrong_at=1, confidence=0.95), Oracle("later-wrong", model, wrong_at=2, confidence=0.5)]
    prompts, results = run(model, drafters, mode, routing=RoutingPolicy(max_experts=2, cooperate_ratio=0.0))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy(model, prompt, 12)[: len(result.token_ids)]
        assert result.accepted_tokens > 0
        assert set(result.drafters) == {"early-wrong", "later-wrong"}
        assert all(0 <= c["accepted"] <= c["drafted"] for c in result.drafters.values())


def test_step_mode_continues_from_the_more_confident_token(model):
    # Step 1: the confident drafter is right, the other wrong; step 2 the other way round. Fused
    # step by step, b continues from a's token and its step-2 token is accepted; in tree mode b's
    # chain starts with its wrong token and none of it is accepted.
    drafters = [Oracle("a", model, confidence=0.9, wrong={1}), Oracle("b", model, confidence=0.1, wrong={0})]
    routing = RoutingPolicy(max_experts=2, cooperate_ratio=0.0, explore_below=0.0)
    _, stepped = run(model, drafters, "step", routing=routing, window=2)
    _, chained = run(model, drafters, "tree", routing=routing, window=2)
    assert stepped[0].drafters["b"]["accepted"] > 0
    assert chained[0].drafters["b"]["accepted"] == 0
    assert stepped[0].accepted_tokens > chained[0].accepted_tokens


def test_pinned_expert_drafts_alone(model):
    drafters = [Oracle("a", model), Oracle("b", model)]
    _, results = run(model, drafters, "tree", routing=RoutingPolicy(max_experts=2), expert="b")
    assert set(results[0].drafters) == {"b"} and all(chosen == ("b",) for chosen in results[0].chosen)


def test_drafter_counts_cover_only_what_the_capped_tree_holds(model):
    # Regression: counts came from the chains before the tree's node cap cut them.
    drafters = [Oracle("a", model, wrong_at=2), Oracle("b", model, wrong_at=0)]
    _, results = run(model, drafters, "tree", max_tree_nodes=5)
    for result in results:
        assert sum(c["drafted"] for c in result.drafters.values()) <= 5 * result.rounds  # 4 + 4 cut to 5 each round
        assert sum(c["drafted"] for c in result.drafters.values()) >= result.draft_tokens


def test_the_engine_verifies_and_applies_each_round_with_the_pipelines_own_functions(model, monkeypatch):
    """One request lifecycle: the verifier verifies a round with ``verify_and_credit`` and the
    coordinator applies it with ``advance``; the engine calls those very functions, once per round
    of every request, and its results are their final entries."""
    import cosine.engine as engine_module
    from cosine.core import acceptance, rounds
    from cosine.core.protocol import Final
    from cosine.workers import verifier
    from cosine.workers.coordinator import applying as coordinator

    assert verifier.verify_and_credit is acceptance.verify_and_credit and coordinator.advance is rounds.advance
    calls = {"verify_and_credit": 0, "advance": 0}
    finals = []

    def spy(function):
        def counted(*args, **kwargs):
            calls[function.__name__] += 1
            out = function(*args, **kwargs)
            finals.extend(Final.from_fields(e) for e in getattr(out, "out_entries", ()) if e["type"] == "final")
            return out
        return counted

    monkeypatch.setattr(engine_module, "verify_and_credit", spy(acceptance.verify_and_credit))
    monkeypatch.setattr(engine_module, "advance", spy(rounds.advance))
    drafters = [Oracle("a", model, wrong_at=2), Oracle("b", model, wrong_at=1)]
    _, results = run(model, drafters, "tree")
    assert calls["verify_and_credit"] == calls["advance"] == sum(r.rounds for r in results) > len(results)
    assert [Final(**{n: getattr(r, n) for n in Final.__dataclass_fields__}) for r in results] == finals
