"""SamplingParams, warp_probs and request_generator."""

import math

import pytest
import torch

from cosine.core.sampling import MAX_TEMPERATURE, SamplingParams, request_generator, restrict_top_k, sample, warp_probs


def logits_of(*probs):
    return torch.tensor([probs]).log()


def test_greedy_is_one_hot_of_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    probs = warp_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


def test_greedy_ignores_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    probs = warp_probs(logits, SamplingParams(temperature=0.0, top_p=0.1))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_temperature_scaling():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    for temperature in (0.3, 1.0, 2.5):
        probs = warp_probs(logits, SamplingParams(temperature=temperature))
        assert torch.allclose(probs, torch.softmax(logits / temperature, -1))
    cold = warp_probs(logits, SamplingParams(temperature=0.3))
    hot = warp_probs(logits, SamplingParams(temperature=2.5))
    assert cold.max() > hot.max()  # lower temperature: sharper
    assert warp_probs(logits.double(), SamplingParams(temperature=1.0)).dtype == torch.float32


def test_top_p_keeps_smallest_set_reaching_top_p():
    logits = logits_of(0.15, 0.5, 0.05, 0.3)  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2)
    cases = {
        0.45: [0.0, 1.0, 0.0, 0.0],
        0.75: [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8],
        0.9: [0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95],
        1.0: [0.15, 0.5, 0.05, 0.3],
    }
    for top_p, expected in cases.items():
        probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert torch.allclose(probs, torch.tensor([expected]), atol=1e-6), top_p


def test_top_p_always_keeps_first_token():
    probs = warp_probs(logits_of(0.2, 0.7, 0.1), SamplingParams(temperature=1.0, top_p=1e-6))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_top_p_ties_broken_by_token_id():
    probs = warp_probs(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), SamplingParams(temperature=1.0, top_p=0.5))
    assert (probs[0] > 0).tolist() == [False, True, True, False]


def test_warped_rows_sum_to_one():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(0)) * 3
    for params in [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_p=0.8)]:
        probs = warp_probs(logits, params)
        assert probs.shape == logits.shape
        assert torch.allclose(probs.sum(-1), torch.ones(32))
        assert (probs >= 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": MAX_TEMPERATURE + 1},
        {"temperature": math.nan},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"top_p": math.nan},
        {"seed": -1},
        {"seed": 2**63},
    ],
)
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_valid_edges():
    SamplingParams(temperature=0.0, top_p=1.0, seed=0)
    SamplingParams(temperature=MAX_TEMPERATURE, top_p=1e-9, seed=2**63 - 1)


def draws(generator, n=8):
    return torch.rand(n, generator=generator).tolist()


def test_request_generator_deterministic():
    assert draws(request_generator(42, 3, "verify")) == draws(request_generator(42, 3, "verify"))


def test_request_generator_differs_by_seed_round_and_purpose():
    base = draws(request_generator(42, 3, "verify"))
    assert draws(request_generator(43, 3, "verify")) != base
    assert draws(request_generator(42, 4, "verify")) != base
    assert draws(request_generator(42, 3, "draft")) != base


def test_sample_draws_from_row():
    generator = torch.Generator().manual_seed(0)
    assert {sample(torch.tensor([0.0, 0.0, 1.0]), generator) for _ in range(20)} == {2}
    assert {sample(torch.tensor([0.5, 0.0, 0.5]), generator) for _ in range(200)} == {0, 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_are_drawn_with_the_cpu_request_generator():
    """Regression (bench/cuda_check.py on an H100): a CUDA probability row met the CPU request
    generator in torch.multinomial and sampled requests failed on a GPU."""
    from cosine.core.acceptance import verify_sampling
    from cosine.core.tree import DraftChain, merge_chains

    probs = torch.softmax(torch.randn(3, 50), -1)
    on_cpu = sample(probs[0], request_generator(7, 0, "t"))
    assert sample(probs[0].cuda(), request_generator(7, 0, "t")) == on_cpu
    tree = merge_chains([DraftChain((3, 4), (0.5, 0.5), probs[:2].cuda(), "d")])
    verdict = verify_sampling(tree, probs.cuda(), request_generator(7, 0, "verify"))
    assert verdict == verify_sampling(merge_chains([DraftChain((3, 4), (0.5, 0.5), probs[:2], "d")]), probs, request_generator(7, 0, "verify"))


def test_restrict_top_k_keeps_the_k_most_likely_renormalized():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    cut = restrict_top_k(probs, 2)
    torch.testing.assert_close(cut, torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7, 0.0]))
    assert restrict_top_k(probs, 0) is probs and restrict_top_k(probs, 5) is probs
    generator = torch.Generator().manual_seed(0)
    assert {sample(cut, generator) for _ in range(200)} == {1, 3}
