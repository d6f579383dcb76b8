"""Distilled drafters on tiny random-weight targets: the network matches transformers' layer,
its KV cache matches a full forward, data steps resume, and a drafter trained for a random
target loads and drafts (greedy and sampled)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.core.sampling import SamplingParams
from cosine.distill import corpus
from cosine.distill.data import DataPlan, pack_conversations, reduced_vocabulary
from cosine.distill.train import TrainPlan, agreement, distill, step_losses
from cosine.drafters.artifact import load_drafter_net, pack_tensors, unpack_tensors
from cosine.drafters.base import DRAFT_SUPPORT, DraftRequest
from cosine.drafters.net import DraftNet, spec_for_target
from cosine.models.loading import prepack_cpu_linears

VOCAB = 96


class CharTokenizer:
    """Enough of a tokenizer for the data steps: bytes mod the vocabulary, a chat template."""

    eos_token_id = 2
    pad_token_id = 2
    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return VOCAB

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(VOCAB)}

    def encode(self, text: str) -> list[int]:
        return [3 + (b % (VOCAB - 3)) for b in text.encode()]

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [self.encode(t) for t in text]}
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(chr(32 + t % 90) for t in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [1] + [t for m in messages for t in self.encode(m["content"])] + [1]


def tiny_target(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=2, pad_token_id=2, bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def test_a_block_initialised_from_a_target_layer_computes_that_layer():
    target = tiny_target()
    spec = spec_for_target(target.config, "small", 1, 16)
    net = DraftNet(spec, target.get_input_embeddings().weight, torch.arange(16))
    net.blocks[0].load_state_dict(target.model.layers[0].state_dict())
    x = torch.randn(2, 7, 32)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = net.rotary(positions, x.dtype)
    ours, _ = net.blocks[0](x, cos, sin)
    theirs_cos, theirs_sin = target.model.rotary_emb(x, positions)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    theirs = target.model.layers[0](x, attention_mask=mask, position_ids=positions, position_embeddings=(theirs_cos, theirs_sin))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["small", "feature"])
def test_the_kv_cache_gives_what_a_full_forward_gives(kind):
    target = tiny_target()
    spec = spec_for_target(target.config, kind, 2, 24)
    net = DraftNet(spec, target.get_input_embeddings().weight, torch.arange(24)).eval()
    tokens = torch.randint(3, VOCAB, (1, 9))
    positions = torch.arange(9)[None]
    features = torch.randn(1, 9, 32) if kind == "feature" else None
    with torch.no_grad():
        full, _ = net(tokens, positions, features)
        part, past = net(tokens[:, :5], positions[:, :5], None if features is None else features[:, :5])
        steps = [part]
        for i in range(5, 9):
            out, past = net(tokens[:, i : i + 1], positions[:, i : i + 1], None if features is None else features[:, i : i + 1], past=past)
            steps.append(out)
        two, _ = net(tokens[:, 5:9], positions[:, 5:9], None if features is None else features[:, 5:9], past=[(k[:, :, :5], v[:, :, :5]) for k, v in past])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(two, full[:, 5:], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines and "onednn" not in torch.backends.quantized.supported_engines, reason="no int8 kernels")
def test_an_int8_drafter_drops_its_float_head_and_drafts_as_before():
    """Regression (memory): the float head rows stayed beside the int8 head that replaced them,
    18 MB per demo drafter. They are freed; logits come from the int8 head as before."""
    target = tiny_target()
    spec = spec_for_target(target.config, "small", 1, 24)
    net = DraftNet(spec, target.get_input_embeddings().weight, torch.arange(24)).eval()
    tokens, positions = torch.randint(3, VOCAB, (1, 7)), torch.arange(7)[None]
    with torch.no_grad():
        hidden, _ = net(tokens, positions)
        exact = net.logits(hidden)
        net.quantize_int8()
        hidden, _ = net(tokens, positions)
        quantized = net.logits(hidden)
    assert net.head.numel() == 0 and net.head.dtype == torch.float32
    assert quantized.shape == exact.shape
    torch.testing.assert_close(quantized, exact, atol=0.05 * float(exact.abs().max()), rtol=0)


def test_the_reduced_vocabulary_ranks_by_frequency_and_keeps_special_tokens():
    counts = Counter({10: 50, 11: 40, 12: 40, 13: 1, 200: 99})
    vocab = reduced_vocabulary(counts, 4, 100, always=[2])
    assert vocab.tolist() == [2, 10, 11, 12]  # 200 is outside the vocabulary; ties by id
    assert reduced_vocabulary(Counter({5: 1}), 3, 10, always=[]).tolist() == [0, 1, 5]  # filled from the lowest ids


def test_conversations_are_packed_end_to_end():
    rows = pack_conversations([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_unrolled_feature_steps_feed_their_own_predictions():
    target = tiny_target()
    spec = spec_for_target(target.config, "feature", 1, 32)
    net = DraftNet(spec, target.get_input_embeddings().weight, torch.arange(32))
    tokens = torch.randint(3, VOCAB, (2, 12))
    hidden = torch.randn(2, 12, 32)
    losses = step_losses(net, tokens, hidden, unroll=3)
    assert len(losses) == 3 and all(torch.isfinite(x) for x in losses)
    assert len({round(x.item(), 6) for x in losses}) == 3  # later steps see other inputs


def test_bad_user_data_gets_a_clear_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"nothing": 1}\n')
    with pytest.raises(corpus.CorpusError, match=r"data.jsonl:2: needs a \"text\", \"prompt\" or \"messages\" field"):
        corpus.read_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(corpus.CorpusError, match="data.jsonl:1: not JSON"):
        corpus.read_jsonl(path)
    path.write_text('{"prompt": "Say hi"}\n{"messages": [{"role": "user", "content": "Hello"}]}\n{"text": "Plain text."}\n')
    documents, conversations = corpus.read_jsonl(path)
    assert [d.text for d in documents] == ["Plain text."] and len(conversations) == 2


def test_a_missing_source_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(corpus, "GCIDE", Path("/nonexistent/gcide.dict.dz"))
    with pytest.raises(corpus.CorpusError, match="apt-get install dict-gcide"):
        corpus.require_sources(["gcide"])
    with pytest.raises(corpus.CorpusError, match="known:"):
        corpus.require_sources(["nonsense"])


def test_wordnet_without_its_sense_counts_still_gives_prompts(monkeypatch, tmp_path):
    # Regression: a corpus copy without cntlist.rev made chat_prompts fail with "Cannot choose
    # from an empty sequence" (no frequent words for the everyday prompts).
    if not corpus.available_sources()["wordnet"]:
        pytest.skip("needs wordnet-base")
    copy = tmp_path / "wordnet"
    copy.mkdir()
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (copy / name).symlink_to(corpus.WORDNET / name)
    monkeypatch.setattr(corpus, "WORDNET", copy)
    prompts = corpus.chat_prompts(40, seed=1)
    assert len(prompts) == 40 and all(isinstance(p, str) and p for p in prompts)


@pytest.mark.parametrize("kind", ["small", "feature"])
def test_a_drafter_distilled_for_a_random_target_loads_and_drafts(tmp_path, kind):
    target, tokenizer = tiny_target(), CharTokenizer()
    prepack_cpu_linears(target)  # as the CLI loads it (regression: its reordered weights could not start a drafter)
    documents = [corpus.Document("data", f"d{i}", "the quick brown fox jumps over the lazy dog. " * 8) for i in range(6)]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    plan = DataPlan(text_tokens=1500, chat_prompts=8, answer_tokens=6, seq_len=32, reduced_vocab=40, vocab_corpus_tokens=2000, batch_size=4, generation_batch=3)
    train_plan = TrainPlan(kind=kind, layers=1, epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=5)
    meta = distill(target, tokenizer, kind=kind, work=tmp_path / "work", out=tmp_path / "out", data_plan=plan, train_plan=train_plan, documents=documents, prompts=prompts)
    assert meta["data"]["answers"] == 8 and meta["data"]["text_tokens"] > 0 and meta["data"]["reduced_vocab"] == 40
    assert meta["training"]["steps"] > 0 and len(meta["measured"]["holdout_agreement_per_step"]) == (3 if kind == "feature" else 1)
    on_disk = json.loads((tmp_path / "out" / "drafter.json").read_text())
    assert on_disk["spec"]["kind"] == kind and on_disk["target"]["tokenizer"]
    net, _ = load_drafter_net(tmp_path / "out", target)
    assert net.vocab.tolist() == sorted(net.vocab.tolist()) and len(net.vocab) == 40
    stored = {k: v for k, v in net.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in stored.values())  # loaded into the target's dtype
    # A second run resumes: no answer is generated again, training starts at its last step.
    answers = (tmp_path / "work" / "data" / "answers.jsonl").read_text()
    again = distill(target, tokenizer, kind=kind, work=tmp_path / "work", out=tmp_path / "out2", data_plan=plan, train_plan=train_plan, documents=documents, prompts=prompts)
    assert (tmp_path / "work" / "data" / "answers.jsonl").read_text() == answers
    assert again["training"]["seconds"] <= meta["training"]["seconds"] + 1.0
    # Other settings on the same work directory are refused, not mixed in.
    with pytest.raises(ValueError, match="other settings"):
        distill(target, tokenizer, kind=kind, work=tmp_path / "work", out=tmp_path / "out3", data_plan=replace(plan, text_tokens=900), train_plan=train_plan, documents=documents, prompts=prompts)
    with pytest.raises(ValueError, match="other training settings"):
        distill(target, tokenizer, kind=kind, work=tmp_path / "work", out=tmp_path / "out3", data_plan=plan, train_plan=replace(train_plan, epochs=3), documents=documents, prompts=prompts)
    assert agreement(net, torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4, 32), torch.zeros(0, 4), 1, 4) == []
    if kind == "small":
        from cosine.drafters.distilled import SmallDrafter, cpu_bf16, cpu_int8

        # int8 (the default on a CPU) drafts from the reduced vocabulary, greedy and sampled.
        quantized = SmallDrafter("tiny", tmp_path / "out", target)
        assert quantized.int8 == cpu_int8(torch.device("cpu"))
        context = tokenizer.encode("the quick brown")
        chain = quantized.propose([DraftRequest("q", context, 4, SamplingParams(), 0)])[0]
        assert len(chain.tokens) == 4 and all(t in set(net.vocab.tolist()) for t in chain.tokens)
        sampled = quantized.propose([DraftRequest("s", context, 3, SamplingParams(temperature=0.8, seed=3), 0)])[0]
        torch.testing.assert_close(sampled.draft_probs.sum(-1), torch.ones(3))
        # Without int8: the exact paths below (cache continuation equals a fresh start).
        drafter = SmallDrafter("tiny", tmp_path / "out", target, int8=False)
        if cpu_bf16(torch.device("cpu")):  # bf16 weights where the CPU has native bf16; the shared embedding untouched
            assert drafter.net.head.dtype == torch.bfloat16 and drafter.net.embedding.dtype == torch.float32
        greedy = drafter.propose([DraftRequest("a", context, 4, SamplingParams(), 0)])[0]
        assert len(greedy.tokens) == 4 and all(t in set(net.vocab.tolist()) for t in greedy.tokens)
        # The cache continues the context: the same draft after an accepted token as from scratch.
        longer = context + [greedy.tokens[0]]
        continued = drafter.propose([DraftRequest("a", longer, 3, SamplingParams(), 1)])[0]
        fresh = SmallDrafter("tiny", tmp_path / "out", target, int8=False).propose([DraftRequest("b", longer, 3, SamplingParams(), 1)])[0]
        assert continued.tokens == fresh.tokens
        torch.testing.assert_close(torch.tensor(continued.confidences), torch.tensor(fresh.confidences), atol=1e-5, rtol=1e-4)
        sampled = drafter.propose([DraftRequest("c", context, 3, SamplingParams(temperature=0.8, seed=3), 0)])[0]
        assert sampled.draft_probs is not None and sampled.draft_probs.shape == (3, VOCAB)
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[net.vocab] = False
        assert float(sampled.draft_probs[:, outside].abs().sum()) == 0.0
        # Cut to the DRAFT_SUPPORT most likely of the 40 reduced-vocabulary tokens: the draws
        # come from the distribution that travels.
        support = (sampled.draft_probs > 0).sum(-1)
        assert support.tolist() == [DRAFT_SUPPORT] * 3 and DRAFT_SUPPORT < 40
        assert all(float(row[t]) > 0 for row, t in zip(sampled.draft_probs, sampled.tokens))
        torch.testing.assert_close(sampled.draft_probs.sum(-1), torch.ones(3))
        with pytest.raises(ValueError, match="made for another tokenizer"):

            class Other(CharTokenizer):
                def get_vocab(self):
                    return {"x": 0}

            SmallDrafter("tiny", tmp_path / "out", target, Other())
    else:
        from cosine.drafters.distilled import SmallDrafter

        with pytest.raises(ValueError, match="holds a 'feature' drafter"):
            SmallDrafter("tiny", tmp_path / "out", target)


def test_int8_packing_halves_fp16_and_round_trips_within_half_a_step():
    torch.manual_seed(0)
    state = {"blocks.0.mlp.up_proj.weight": torch.randn(64, 32) * torch.rand(64, 1), "norm.weight": torch.rand(32)}
    packed = pack_tensors(state, "int8")
    matrix = packed["blocks.0.mlp.up_proj.weight"]
    assert matrix.dtype == torch.int8 and packed["blocks.0.mlp.up_proj.weight.scale"].shape == (64,)
    assert packed["norm.weight"].dtype == torch.float16
    back = unpack_tensors(packed)
    assert set(back) == set(state)
    scale = packed["blocks.0.mlp.up_proj.weight.scale"].float()[:, None]
    error = (back["blocks.0.mlp.up_proj.weight"] - state["blocks.0.mlp.up_proj.weight"]).abs()
    assert bool((error <= scale * 0.501).all())  # rounding to the nearest step of the stored scale
    fp16_bytes = sum(v.numel() * 2 for v in state.values())
    int8_bytes = sum(v.numel() * v.element_size() for v in packed.values())
    assert int8_bytes < 0.6 * fp16_bytes
    with pytest.raises(ValueError, match="drafter dtype"):
        pack_tensors(state, "int4")


def test_a_data_curve_point_trains_on_a_subset_for_fixed_steps_without_redoing_the_data(tmp_path, monkeypatch):
    target, tokenizer = tiny_target(), CharTokenizer()
    documents = [corpus.Document("data", f"d{i}", "the quick brown fox jumps over the lazy dog. " * 8) for i in range(6)]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    plan = DataPlan(text_tokens=1500, chat_prompts=8, answer_tokens=6, seq_len=32, reduced_vocab=40, vocab_corpus_tokens=2000, batch_size=4, generation_batch=3)
    full = TrainPlan(kind="feature", layers=1, epochs=1, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=5)
    meta = distill(target, tokenizer, kind="feature", work=tmp_path / "work", out=tmp_path / "out", data_plan=plan, train_plan=full, documents=documents, prompts=prompts)
    assert (tmp_path / "work" / "data" / "ready.json").exists()

    def no_tokenizing(*_, **__):
        raise AssertionError("the data was made again")

    monkeypatch.setattr("cosine.distill.train.tokenize_documents", no_tokenizing)
    point = TrainPlan(kind="feature", layers=1, epochs=1, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=5, train_tokens=100, steps=7)
    (tmp_path / "point-work").mkdir()
    (tmp_path / "point-work" / "data").symlink_to(tmp_path / "work" / "data")  # as bench/distill_general.sh shares it
    curve = distill(target, tokenizer, kind="feature", work=tmp_path / "point-work", out=tmp_path / "point", data_plan=plan, train_plan=point, documents=documents, prompts=prompts)
    assert curve["training"]["train_tokens"] == 4 * 32 < meta["training"]["train_tokens"]  # ceil(100 / 32) sequences
    assert curve["training"]["steps"] == 7 and curve["training"]["epochs"] == 7.0  # one step per epoch of 4 rows
    assert curve["data"] == meta["data"]


class _Recording:
    """Wraps a drafter and keeps the features each request was given."""

    def __init__(self, inner):
        self.inner, self.name, self.needs_features, self.seen = inner, inner.name, inner.needs_features, []

    def propose(self, requests):
        self.seen.extend((list(r.context), r.features) for r in requests)
        return self.inner.propose(requests)

    def observe(self, *args):
        pass

    def release(self, key):
        self.inner.release(key)


def test_a_feature_drafter_drafts_from_the_target_states_the_engine_gives_it_and_stays_lossless(tmp_path):
    from cosine.core.stopping import StopRules
    from cosine.drafters.distilled import FeatureDrafter
    from cosine.engine import GenerationRequest, LocalEngine
    from cosine.models.runner import ModelRunner
    from cosine.policy.window import WindowPolicy

    target, tokenizer = tiny_target(), CharTokenizer()
    documents = [corpus.Document("data", f"d{i}", "the quick brown fox jumps over the lazy dog. " * 8) for i in range(6)]
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    plan = DataPlan(text_tokens=1500, chat_prompts=8, answer_tokens=6, seq_len=32, reduced_vocab=40, vocab_corpus_tokens=2000, batch_size=4, generation_batch=3)
    train_plan = TrainPlan(kind="feature", layers=1, epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=5)
    distill(target, tokenizer, kind="feature", work=tmp_path / "work", out=tmp_path / "out", data_plan=plan, train_plan=train_plan, documents=documents, prompts=prompts)
    drafter = _Recording(FeatureDrafter("feat", tmp_path / "out", target))
    engine = LocalEngine(ModelRunner(target), tokenizer, [drafter], mode="chain", window=WindowPolicy(3, 1, 4, True), max_batch=2)
    contexts = [tokenizer.encode(t) for t in ("the quick brown", "lazy dog jumps over", "fox")]
    requests = [GenerationRequest(f"r{i}", tuple(c), SamplingParams(), StopRules(12, frozenset(), ())) for i, c in enumerate(contexts)]
    results = engine.generate(requests)
    for context, result in zip(contexts, results):
        with torch.inference_mode():
            expected = target.generate(torch.tensor([context]), attention_mask=torch.ones(1, len(context), dtype=torch.long), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=2)[0, len(context):].tolist()
        assert result.token_ids == expected
    assert engine.stats.rounds > 0 and sum(r.accepted_tokens for r in results) > 0
    # Every round's features are the target's own final states at positions 0 .. L-2 (at least).
    assert len(drafter.seen) >= 6
    for context, features in drafter.seen:
        if features is None:  # the first round: the prompt's states come with its verification
            assert context in contexts
            continue
        assert len(features) >= len(context) - 1
        with torch.inference_mode():
            full = target.get_decoder()(input_ids=torch.tensor([context])).last_hidden_state[0]
        torch.testing.assert_close(features[: len(context) - 1], full[: len(context) - 1], atol=1e-4, rtol=1e-4)
    # Its first draft token is the network's choice along the teacher-forced pairs; a cached
    # state continues exactly as a fresh one; too few features draft nothing.
    inner = drafter.inner
    context, features = drafter.seen[-1]
    with torch.inference_mode():
        seq = torch.tensor([context])
        full = target.get_decoder()(input_ids=seq).last_hidden_state
        h, _ = inner.net(seq[:, 1:], torch.arange(1, len(context))[None], full[:, :-1])
        first = int(inner.net.vocab[inner.net.logits(h[0, -1]).argmax()])
    fresh = FeatureDrafter("feat", tmp_path / "out", target)
    chain = fresh.propose([DraftRequest("x", context, 3, SamplingParams(), 0, full[0])])[0]
    assert chain.tokens[0] == first and len(chain.tokens) == 3
    shorter = context[:-2]
    fresh.propose([DraftRequest("x", shorter, 2, SamplingParams(), 0, full[0])])
    again = fresh.propose([DraftRequest("x", context, 3, SamplingParams(), 1, full[0])])[0]
    assert again.tokens == chain.tokens
    torch.testing.assert_close(torch.tensor(again.confidences), torch.tensor(chain.confidences), atol=1e-4, rtol=1e-4)
    assert fresh.propose([DraftRequest("y", context, 3, SamplingParams(), 0, full[0, :2])])[0].tokens == ()
