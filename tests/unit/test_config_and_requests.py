from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosine.config import load_config
from cosine.core.protocol import ClientRequest, RequestError, RequestLimits, parse_stop, sampling_params
from cosine.core.sampling import SamplingParams
from cosine.drafters.base import DraftRequest
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.policy.window import WindowPolicy

ROOT = Path(__file__).resolve().parents[2]


def test_repository_config_loads():
    config = load_config(ROOT / "config.toml", environ={})
    assert config.model.dtype == "float32" and config.defaults.max_tokens == 128
    assert [(d.kind, d.expert) for d in config.drafters] == [
        ("small", "general"), ("small", "code"), ("small", "chat"), ("small", "math"), ("prompt-lookup", "lookup"), ("suffix", "suffix"),
    ]
    assert config.router.default_experts == ("general", "lookup") and config.router.online
    # The shipped drafters resolve inside the package, whatever the working directory; the
    # domain experts carry the routing profile the router's classifier reads.
    for drafter in config.drafters:
        if drafter.kind == "small":
            assert (drafter.resolved_path / "drafter.safetensors").is_file()
            assert (drafter.resolved_path / "profile.safetensors").is_file() or drafter.expert == "general"


def test_environment_overrides_file(tmp_path):
    config = load_config(ROOT / "config.toml", environ={"COSINE_MODEL_THREADS": "1", "COSINE_CACHE_DIR": str(tmp_path)})
    assert config.model.threads == 1 and config.model.cache_path == tmp_path


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\ndtype = 'int4'\n", "model.dtype"),
        ("[speculation]\nwindow = 20\nmax_window = 8\n", "min_window"),
        ("[nonsense]\n", "unknown config sections"),
        ("[model]\ncolour = 'red'\n", "unknown keys"),
        ("[[drafters]]\nname = 'x'\nkind = 'oracle'\n", "kind must be one of"),
    ],
)
def test_invalid_config_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, environ={})


def test_bad_environment_value_is_named():
    with pytest.raises(ValueError, match="COSINE_MODEL_THREADS"):
        load_config(ROOT / "config.toml", environ={"COSINE_MODEL_THREADS": "many"})


def test_request_fields_are_validated():
    limits = RequestLimits(max_tokens_limit=4096)
    for value, message in (("0", "max_tokens"), (str(10**9), "max_tokens"), ("many", "integer")):
        with pytest.raises(RequestError, match=message) as refused:
            ClientRequest.from_fields({"prompt": "hi", "max_tokens": value}, limits)
        assert refused.value.param == "max_tokens"
    for fields, param in (({"prompt": "hi", "temperature": "-1"}, "temperature"), ({"prompt": "hi", "colour": "red"}, "colour"),
                          ({"prompt": "hi", "messages": "[]"}, "prompt"), ({"prompt": "x" * 9}, "prompt"),
                          ({"prompt": "hi", "deadline_s": "0"}, "deadline_s"), ({"prompt": "hi", "max_window": "65"}, "max_window")):
        with pytest.raises(RequestError) as refused:
            ClientRequest.from_fields(fields, RequestLimits(max_prompt_chars=8))
        assert refused.value.param == param, fields
    request = ClientRequest.from_fields({"messages": '[{"role": "user", "content": "hi"}]', "temperature": "0.5", "stop": "END"}, limits)
    assert request.messages == [{"role": "user", "content": "hi"}] and request.stop == ("END",) and request.max_tokens == 256
    assert request.seed is None  # the server draws one per request
    assert ClientRequest.from_fields({"prompt": "hi", "seed": "7"}).sampling.seed == 7
    with pytest.raises(RequestError, match="temperature"):
        sampling_params(-1)
    with pytest.raises(RequestError, match="stop"):
        parse_stop("[1, 2]")
    assert parse_stop('["\\n\\n", "END"]') == ("\n\n", "END")


def test_window_policy_moves_within_bounds():
    policy = WindowPolicy(initial=4, minimum=1, maximum=5)
    assert policy.next_window(4, drafted=4, accepted=4) == 5
    assert policy.next_window(5, drafted=5, accepted=5) == 5
    assert policy.next_window(1, drafted=1, accepted=0) == 1
    assert policy.next_window(4, drafted=4, accepted=2) == 4
    with pytest.raises(ValueError):
        WindowPolicy(initial=9, minimum=1, maximum=8)


def lookup(context, window=4):
    request = DraftRequest("r", context, window, SamplingParams(), 0)
    return PromptLookupDrafter(max_ngram=3).propose([request])[0]


def test_prompt_lookup_copies_what_followed_the_last_ngram():
    chain = lookup([1, 2, 3, 4, 5, 6, 9, 2, 3])
    assert chain.tokens == (4, 5, 6, 9) and chain.draft_probs is None


def test_prompt_lookup_confidence_is_agreement_among_matches():
    chain = lookup([7, 8, 1, 7, 8, 2, 7, 8], window=1)
    assert chain.tokens == (2,) and chain.confidences == (0.5,)


def test_prompt_lookup_without_match_proposes_nothing():
    assert len(lookup([1, 2, 3, 4])) == 0


def test_batch_choice_is_checked():
    from cosine.config import PipelineConfig

    assert PipelineConfig(batch_choice="fifo").batch_choice == "fifo"
    with pytest.raises(ValueError, match="batch_choice"):
        PipelineConfig(batch_choice="random")


def test_every_package_directory_is_installed():
    """A non-editable install takes only the packages pyproject.toml lists."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"cosine." + p.parent.name for p in (root / "cosine").glob("*/__init__.py") if p.parent.name != "workers"}
    assert found | {"cosine", "cosine.workers"} <= listed, sorted(found - listed)


def test_messages_are_bounded_in_count():
    from cosine.core.protocol import MAX_MESSAGES, _parse_messages

    many = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    with pytest.raises(RequestError, match="at most") as refused:
        _parse_messages(json.dumps(many))
    assert refused.value.param == "messages"
    assert len(_parse_messages(json.dumps(many[:MAX_MESSAGES]))) == MAX_MESSAGES


def test_max_window_field_parses_and_refuses_clearly():
    from cosine.core.protocol import RequestError, max_window_cap
    from cosine.policy.window import capped_window

    assert (max_window_cap(None), max_window_cap("0"), max_window_cap(5)) == (-1, 0, 5)
    for bad in ("-1", "x", "65", 1e9):
        with pytest.raises(RequestError) as raised:
            max_window_cap(bad)
        assert raised.value.param == "max_window"
    assert (capped_window(4, -1), capped_window(4, 0), capped_window(4, 2), capped_window(1, 3)) == (4, 0, 2, 1)


def test_a_bad_redis_url_is_named_without_its_password():
    """Regression: a URL of the wrong scheme was echoed whole, password included."""
    from cosine import bus
    from cosine.config import RedisConfig

    for url in ("http://default:s3cret@127.0.0.1:6379", "default:s3cret@127.0.0.1:6379"):
        with pytest.raises(ValueError) as raised:
            bus.connect(url)
        assert "s3cret" not in str(raised.value) and "127.0.0.1:6379" in str(raised.value)
        with pytest.raises(ValueError) as raised:
            RedisConfig(url=url)
        assert "s3cret" not in str(raised.value)


def test_a_secret_typed_on_the_command_line_gets_a_warning_and_one_from_the_environment_none():
    from typer.testing import CliRunner

    from cosine.cli import app

    runner = CliRunner()
    typed = runner.invoke(app, ["status", "--redis-url", "redis://default:s3cret@127.0.0.1:1"], env={"COSINE_REDIS_URL": ""})
    assert "--redis-url on the command line" in typed.stderr and "COSINE_REDIS_URL" in typed.stderr
    assert "s3cret" not in typed.stderr + typed.stdout
    from_env = runner.invoke(app, ["status"], env={"COSINE_REDIS_URL": "redis://default:s3cret@127.0.0.1:1"})
    assert "warning" not in from_env.stderr
    no_password = runner.invoke(app, ["status", "--redis-url", "redis://127.0.0.1:1"])
    assert "warning" not in no_password.stderr
