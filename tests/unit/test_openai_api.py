"""The OpenAI shapes: request bodies to CoSine fields (or a 400 naming the parameter), finals
to responses and errors, stream chunks."""

from __future__ import annotations

import json

import pytest

from cosine import openai_api as api
from cosine.core.protocol import Final, parse_entry

SERVED = ("SmolLM2-135M-Instruct",)


def chat(**body):
    return api.chat_fields({"model": SERVED[0], "messages": [{"role": "user", "content": "Hi"}], **body}, SERVED)


def refused(parse, body) -> api.ApiError:
    with pytest.raises(api.ApiError) as caught:
        parse(body, SERVED)
    return caught.value


def test_a_chat_body_becomes_the_request_fields():
    parsed = chat(max_completion_tokens=12, temperature=0.7, top_p=0.9, seed=-1, stop="\n", user="u1", stream=True,
                  stream_options={"include_usage": True}, presence_penalty=0, frequency_penalty=0.0, n=1, logprobs=False)
    assert parsed.fields == {"max_tokens": "12", "temperature": "0.7", "top_p": "0.9", "seed": str(2**63 - 1), "stop": '["\\n"]',
                             "messages": '[{"role": "user", "content": "Hi"}]'}
    assert parsed.stream and parsed.include_usage and parsed.model == SERVED[0]


def test_message_content_parts_and_roles():
    body = {"model": SERVED[0], "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}], "name": "ann"},
        {"role": "assistant", "content": None},
    ]}
    messages = json.loads(api.chat_fields(body, SERVED).fields["messages"])
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world"},
                        {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"seed": "7"}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"n": 2}, "n"),
    ({"n": True}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes"}, "stream"),
    ({"mirostat": 2}, "mirostat"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"model": None}, "model"),
])
def test_bad_chat_parameters_get_400_naming_them(body, param):
    base = {"model": SERVED[0], "messages": [{"role": "user", "content": "Hi"}]}
    error = refused(api.chat_fields, {**base, **body})
    assert (error.status, error.param) == (400, param), error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_404_and_a_body_that_is_not_an_object_400():
    error = refused(api.chat_fields, {"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]})
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert refused(api.chat_fields, [1, 2]).status == 400


def test_a_prompt_that_is_not_unicode_text_is_400_not_500():
    """Regression (review): a lone surrogate (valid JSON) made the Redis client's encoder raise
    inside the submission: a 500 and a traceback."""
    body = {"model": SERVED[0], "prompt": json.loads('"a\\ud800b"')}
    error = refused(api.completion_fields, body)
    assert (error.status, error.param) == (400, "prompt")


def test_a_completion_body_takes_one_prompt():
    parsed = api.completion_fields({"model": SERVED[0], "prompt": ["Once upon"], "max_tokens": 5, "echo": False, "best_of": 1}, SERVED)
    assert parsed.fields == {"prompt": "Once upon", "max_tokens": "5"}
    assert refused(api.completion_fields, {"model": SERVED[0], "prompt": ["a", "b"]}).param == "prompt"
    assert refused(api.completion_fields, {"model": SERVED[0], "prompt": "a", "echo": True}).param == "echo"
    assert refused(api.completion_fields, {"model": SERVED[0], "prompt": "a", "messages": []}).param == "messages"


def test_logprobs_become_the_request_field():
    assert chat(logprobs=True, top_logprobs=3).fields["logprobs"] == "3" and chat(logprobs=True).logprobs == 0
    assert "logprobs" not in chat(logprobs=False, top_logprobs=0).fields and chat().logprobs == -1
    completion = api.completion_fields({"model": SERVED[0], "prompt": "a", "logprobs": 2}, SERVED)
    assert (completion.fields["logprobs"], completion.logprobs) == ("2", 2)
    assert refused(api.completion_fields, {"model": SERVED[0], "prompt": "a", "logprobs": True}).param == "logprobs"
    assert refused(api.completion_fields, {"model": SERVED[0], "prompt": "a", "logprobs": 21}).param == "logprobs"


TOKENS = [{"id": 5, "token": " Hi", "bytes": [32, 72, 105], "logprob": -0.5,
           "top_logprobs": [{"id": 5, "token": " Hi", "bytes": [32, 72, 105], "logprob": -0.5},
                            {"id": 6, "token": " Yo", "bytes": [32, 89, 111], "logprob": -1.5}]},
          {"id": 7, "token": "!", "bytes": [33], "logprob": -2.0,
           "top_logprobs": [{"id": 8, "token": ".", "bytes": [46], "logprob": -0.25}, {"id": 7, "token": "!", "bytes": [33], "logprob": -2.0}]}]


def test_logprobs_take_the_shape_of_each_endpoint():
    final = Final.from_fields({**FINAL, "text": " Hi!", "generated_tokens": "2"})
    chat_body = api.completion_object("chat", "c", 1, SERVED[0], "fp", final, TOKENS)
    content = chat_body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": " Hi", "logprob": -0.5, "bytes": [32, 72, 105],
                          "top_logprobs": [{"token": " Hi", "logprob": -0.5, "bytes": [32, 72, 105]},
                                           {"token": " Yo", "logprob": -1.5, "bytes": [32, 89, 111]}]}
    assert [t["token"] for t in content] == [" Hi", "!"]
    legacy = api.completion_object("completion", "c", 1, SERVED[0], "fp", final, TOKENS)["choices"][0]["logprobs"]
    assert legacy == {"tokens": [" Hi", "!"], "token_logprobs": [-0.5, -2.0], "top_logprobs": [{" Hi": -0.5, " Yo": -1.5}, {".": -0.25, "!": -2.0}],
                      "text_offset": [0, 3]}
    piece = api.chunk("completion", "c", 1, "m", "fp", text="!", logprobs=TOKENS[1:], offset=3)
    assert piece["choices"][0]["logprobs"]["text_offset"] == [3]
    delta = api.chunk("chat", "c", 1, "m", "fp", text="", logprobs=TOKENS[:1])
    assert delta["choices"][0]["logprobs"]["content"][0]["token"] == " Hi"
    assert parse_entry({"type": "tokens", "logprobs": json.dumps(TOKENS)}).logprobs == TOKENS
    assert parse_entry({"type": "tokens", "text": "x"}).logprobs is None


FINAL = {"type": "final", "finish_reason": "length", "text": "Hello there", "token_ids": "[1, 2, 3, 4]", "prompt_tokens": "10",
         "generated_tokens": "4", "rounds": "2", "draft_tokens": "6", "accepted_tokens": "2",
         "drafters": '{"chat-small": {"drafted": 6, "accepted": 2}}'}


def test_a_final_becomes_a_completion_with_usage_and_speculation_statistics():
    body = api.completion_object("chat", "chatcmpl-1", 100, SERVED[0], "fp_x", Final.from_fields(FINAL))
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "fp_x"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    assert body["cosine"] == {"num_draft_tokens": 6, "num_accepted_tokens": 2, "num_verification_rounds": 2, "mean_acceptance_length": 2.0,
                              "drafters": {"chat-small": {"num_draft_tokens": 6, "num_accepted_tokens": 2}}}
    text = api.completion_object("completion", "cmpl-1", 100, SERVED[0], "fp_x", Final.from_fields(FINAL))
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Hello there"


@pytest.mark.parametrize(("code", "status"), [("invalid", 400), ("busy", 503), ("deadline", 504), ("internal", 500)])
def test_error_finals_map_to_http_statuses(code, status):
    final = Final.from_fields({"type": "final", "finish_reason": "error", "error": "why", "error_code": code, "error_param": "max_tokens"})
    error = api.error_from_final(final, "chat")
    assert (error.status, error.code, error.message) == (status, code, "why")
    assert error.param == "max_tokens"


def test_a_refused_prompt_is_named_as_the_endpoint_names_it():
    final = Final.from_fields({"type": "final", "finish_reason": "error", "error": "too long", "error_code": "invalid", "error_param": "messages"})
    assert api.error_from_final(final, "chat").param == "messages"
    assert api.error_from_final(final, "completion").param == "prompt"


def test_stream_chunks_and_events():
    first = api.chunk("chat", "c", 1, "m", "fp", role=True, text="", include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    last = api.chunk("chat", "c", 1, "m", "fp", finish="stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"} and "usage" not in last
    usage = api.usage_chunk("chat", "c", 1, "m", "fp", Final.from_fields(FINAL))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 14
    assert api.sse("[DONE]") == b"data: [DONE]\n\n"
    assert json.loads(api.sse({"a": 1})[6:]) == {"a": 1}


# ---- metrics -----------------------------------------------------------------------------------


def test_tallied_metrics_render_as_prometheus_counters_and_histograms():
    from prometheus_client.parser import text_string_to_metric_families

    from cosine.metrics import Tally, render

    tally = Tally()
    tally.round_applied(new_tokens=3, first=True, created_ms=1_000, since_ms=None, now_ms=1_250, draft_tokens=4, accepted=2,
                        drafters={"chat-small": (4, 2), "prompt-lookup": (1, 0)})
    tally.round_applied(new_tokens=2, first=False, created_ms=1_000, since_ms=1_250, now_ms=1_290, draft_tokens=0, accepted=0, drafters={})
    tally.request_ended("length", "", created_ms=1_000, now_ms=1_290)
    tally.request_ended("error", "busy")
    tally.observe("verification_batch_size", 3)
    stored = tally.fields()
    text = render(stored, {"dead_lettered": 2, "verify_forward_us": 1_500_000}, {"verifier": 1},
                  {"requests": [{"group": "router", "pending": 1, "lag": 5}]}, {"router": 1, "verifier": 2}, 3, 1).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("cosine:spec_decode_num_draft_tokens_total", (("drafter", "all"),))] == 4
    assert samples[("cosine:spec_decode_num_accepted_tokens_total", (("drafter", "chat-small"),))] == 2
    assert samples[("cosine:spec_decode_num_drafts_total", (("drafter", "prompt-lookup"),))] == 1
    assert samples[("cosine:spec_decode_num_accepted_tokens_per_pos_total", (("drafter", "all"), ("position", "1")))] == 1
    assert samples[("cosine:generation_tokens_total", (("tenant", "default"),))] == 5
    assert samples[("cosine:requests_total", (("error_code", "busy"), ("finish_reason", "error"), ("tenant", "default")))] == 1
    assert samples[("cosine:requests_total", (("error_code", ""), ("finish_reason", "length"), ("tenant", "default")))] == 1
    # Histograms: cumulative buckets, sum and count (inter-token latency weighted by tokens).
    assert samples[("cosine:time_to_first_token_seconds_bucket", (("le", "0.2"),))] == 0
    assert samples[("cosine:time_to_first_token_seconds_bucket", (("le", "0.3"),))] == 1
    assert samples[("cosine:time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("cosine:inter_token_latency_seconds_count", ())] == 2
    assert samples[("cosine:inter_token_latency_seconds_sum", ())] == pytest.approx(0.04)
    assert samples[("cosine:verification_batch_size_bucket", (("le", "4.0"),))] == 1
    assert samples[("cosine:verifier_busy_seconds_total", ())] == 1.5
    assert samples[("cosine:dead_letters_total", ())] == 2
    assert samples[("cosine:worker_restarts_total", (("role", "verifier"),))] == 1
    assert samples[("cosine:queue_depth", (("group", "router"), ("stream", "requests")))] == 5
    assert samples[("cosine:live_workers", (("role", "verifier"),))] == 2
    assert (samples[("cosine:requests_running", ())], samples[("cosine:requests_waiting", ())]) == (3, 1)


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_content_chunks_made_from_parts_equal_the_chunk(kind, include_usage):
    chunks = api.ContentChunks(kind, "id-1", 7, "m", "fp_1", include_usage)
    for text in ("Hello", 'quote " and \\ and \n', "é 😀", ""):
        event = chunks.event(text)
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert json.loads(event[6:]) == api.chunk(kind, "id-1", 7, "m", "fp_1", text=text, include_usage=include_usage)


def test_the_grafana_dashboard_queries_only_metrics_that_exist():
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    from cosine.metrics import Tally, render

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "cosine" / "dashboards" / "grafana.json").read_text())
    tally = Tally()
    tally.round_applied(new_tokens=2, first=True, created_ms=1, since_ms=None, now_ms=2, draft_tokens=2, accepted=1, drafters={"d": (2, 1)})
    tally.round_applied(new_tokens=1, first=False, created_ms=1, since_ms=2, now_ms=3, draft_tokens=0, accepted=0, drafters={})
    tally.request_ended("length", "", 1, 3)
    tally.observe("verification_batch_size", 1)
    tally.count("prompt_tokens", 5)
    text = render(tally.fields(), {}, {"router": 0}, {"requests": [{"group": "router", "pending": 0, "lag": 0}]}, {"verifier": 1}, 0, 0).decode()
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"cosine:[a-z0-9_]+", target["expr"])}
    assert queried and queried <= exposed, queried - exposed


def test_the_gateway_does_not_load_torch():
    """Regression (bench/gateway.py's p99 tail): the gateway imported torch through the wire
    format's SamplingParams, a 185,000-object heap whose full garbage collections (45 ms here)
    stalled every open stream at once."""
    import subprocess
    import sys

    code = "import sys, cosine.gateway, cosine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_max_window_extension_caps_speculation_per_request():
    from cosine.openai_api import ApiError, chat_fields, completion_fields

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_window": 0}
    assert chat_fields(body).fields["max_window"] == "0"
    assert completion_fields({"model": "m", "prompt": "x", "max_window": 3}).fields["max_window"] == "3"
    assert "max_window" not in chat_fields({**body, "max_window": None}).fields
    for bad in (-1, 65, "2", True, 1.5):
        with pytest.raises(ApiError) as raised:
            chat_fields({**body, "max_window": bad})
        assert raised.value.param == "max_window"
