"""oneDNN linears on a CPU target: same results as the plain layers, within float rounding; the
start-up choice between them keeps the faster and leaves the other untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.config import ModelConfig
from cosine.models.loading import choose_cpu_linears, cpu_key, prepack_cpu_linears, remembered_cpu_linears, time_short_forwards
from cosine.models.runner import ForwardItem, ModelRunner

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_prepacked_linears_give_the_plain_results():
    plain = tiny()
    packed = copy.deepcopy(plain)
    assert prepack_cpu_linears(packed) == 2 * 7 + 1  # seven per layer and the head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    context = list(range(5, 25))
    tree = (30, 31, 32)
    a = ModelRunner(plain).forward([ForwardItem("r", context, tree, (-1, 0, 0))])[0]
    b = ModelRunner(packed).forward([ForwardItem("r", context, tree, (-1, 0, 0))])[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([context])
    with torch.inference_mode():
        greedy_plain = plain.generate(ids, max_new_tokens=12, do_sample=False)
        greedy_packed = packed.generate(ids, max_new_tokens=12, do_sample=False)
    assert greedy_plain.tolist() == greedy_packed.tolist()
    # Tied weights: the input embedding stays a plain dense tensor.
    embedding = packed.get_input_embeddings().weight
    assert not embedding.is_mkldnn and torch.equal(embedding, plain.get_input_embeddings().weight)


def test_models_that_cannot_take_them_are_left_alone():
    half = tiny().to(torch.float16)
    assert prepack_cpu_linears(half) == 0
    assert prepack_cpu_linears(torch.nn.Module()) == 0


def _costs(plain: float, onednn: float):
    """A measure that reports ``plain`` for a model with plain linears, ``onednn`` otherwise."""
    seen = []

    def measure(model):
        packed = not any(type(m) is torch.nn.Linear for m in model.modules())
        seen.append("onednn" if packed else "plain")
        return onednn if packed else plain

    return measure, seen


@pytest.mark.parametrize(("plain_s", "onednn_s", "kept"), [(0.040, 0.030, "onednn"), (0.035, 0.060, "plain"), (0.040, 0.0395, "plain")])
def test_the_faster_linears_are_kept(plain_s, onednn_s, kept):
    model = tiny()
    originals = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    measure, seen = _costs(plain_s, onednn_s)
    assert choose_cpu_linears(model, measure, rounds=2) == kept
    assert seen == ["plain", "onednn"] * 2  # in turn, each on what it claims to be
    now = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    if kept == "plain":  # the very same layers back in place (a 1% gain is not worth a swap)
        assert now.keys() == originals.keys() and all(now[n] is originals[n] for n in now)
    else:
        assert not now


def test_a_model_that_cannot_take_onednn_stays_plain():
    half = tiny().to(torch.float16)
    measure, seen = _costs(1.0, 0.001)
    assert choose_cpu_linears(half, measure) == "plain"
    assert seen == []


def test_the_best_of_each_decides_so_a_busy_start_does_not():
    """Regression: measured once each, the verifier of a starting pipeline timed plain while its
    drafters loaded (2.2 s against 0.12 s for oneDNN measured after) and kept the slower
    oneDNN linears. Measured in turn, a slow first measurement does not decide."""
    model = tiny()
    times = iter([2.2, 0.12, 0.07, 0.12, 0.07, 0.12])  # plain, onednn, plain, ...
    assert choose_cpu_linears(model, lambda m: next(times), rounds=3) == "plain"
    assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_the_choice_is_measured_once_per_machine_and_model(tmp_path):
    """A pipeline starts several processes loading the target: the first measures, the others
    read its choice (another key measures again)."""
    record = tmp_path / "cpu_linear.json"
    measure, seen = _costs(0.050, 0.030)
    assert remembered_cpu_linears(tiny(), record, "key-a", measure) == "onednn"
    assert len(seen) == 6
    later = tiny()
    assert remembered_cpu_linears(later, record, "key-a", measure) == "onednn"
    assert len(seen) == 6  # not measured again
    assert not any(type(m) is torch.nn.Linear for m in later.modules())  # but given the choice
    slow_onednn, seen_b = _costs(0.030, 0.050)
    assert remembered_cpu_linears(tiny(), record, "key-b", slow_onednn) == "plain" and len(seen_b) == 6
    assert json.loads(record.read_text()) == {"key-a": "onednn", "key-b": "plain"}
    assert "threads" in cpu_key(tiny(), "weights-x") and cpu_key(tiny(), "a") != cpu_key(tiny(), "b")


def test_a_cache_it_cannot_write_only_costs_a_measurement(tmp_path):
    """Regression: a read-only cache directory made the verifier's start-up raise (and the
    supervisor restart it over and over); now it measures and remembers nothing."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    measure, seen = _costs(0.050, 0.030)
    assert remembered_cpu_linears(tiny(), blocked / "cpu_linear.json", "k", measure) == "onednn"
    assert len(seen) == 6


def test_short_forwards_are_timed():
    assert time_short_forwards(tiny(), lengths=(1, 2), repeats=3) > 0


def test_the_setting_is_checked():
    assert ModelConfig().cpu_linear == "auto"
    assert ModelConfig(cpu_linear="plain").cpu_linear == "plain"
    assert ModelConfig(cpu_linear="onednn").cpu_linear == "onednn"
    with pytest.raises(ValueError, match="model.cpu_linear must be 'auto', 'onednn' or 'plain'"):
        ModelConfig(cpu_linear="fast")


@pytest.mark.parametrize("how", ["prepack", "choose"])
def test_swapped_layers_do_not_keep_their_plain_weights(how):
    """Regression: MkldnnLinear keeps a reference to the weight it reordered, so the verifier held
    every swapped layer twice (~140 MB more for the demo target). The plain weights are freed;
    the embedding the output layer is tied to stays, and results do not change."""
    plain, model = tiny(), tiny()
    weights = {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    if how == "prepack":
        prepack_cpu_linears(model)
    else:
        measure, _ = _costs(0.040, 0.030)
        assert choose_cpu_linears(model, measure, rounds=1) == "onednn"
    embedding = model.get_input_embeddings().weight
    assert weights["lm_head"] is embedding and torch.equal(embedding, plain.get_input_embeddings().weight)
    assert all(w.numel() == 0 for name, w in weights.items() if name != "lm_head")
    context = list(range(5, 25))
    a = ModelRunner(plain).forward([ForwardItem("r", context, (30,), (-1,))])[0]
    b = ModelRunner(model).forward([ForwardItem("r", context, (30,), (-1,))])[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_loaded_checkpoint_owns_its_weights(tmp_path):
    """Regression: transformers leaves CPU weights mapped from the safetensors file, and every page
    read stays resident for as long as any tensor of the file lives: a layer replaced by a fused
    or reordered copy kept its original resident beside it. load_model copies them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from cosine.models.loading import load_model

    tiny().save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))).save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model", cache_dir=tmp_path / "cache")
    maps = [line.split()[0] for line in open("/proc/self/maps") if "model.safetensors" in line]
    assert maps == [], f"still mapped from the checkpoint: {maps}"
    assert torch.equal(loaded.model.get_input_embeddings().weight, tiny().get_input_embeddings().weight)
