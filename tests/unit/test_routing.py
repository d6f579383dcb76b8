"""choose_experts: pinned expert, keyword matches, defaults, availability, cap and fallback."""

from cosine.policy.routing import choose_experts

KEYWORDS = {
    "code": ["python", "function", "bug"],
    "math": ["integral", "prove"],
    "poetry": ["haiku", "poem"],
}
ALL = ["general", "code", "math", "poetry"]


def route(text, pinned=None, defaults=("general",), keywords=KEYWORDS, available=ALL, max_experts=3):
    return choose_experts(text, pinned, list(defaults), keywords, list(available), max_experts)


def test_pinned_expert_wins():
    assert route("write a python function", pinned="math") == ["math"]


def test_pinned_expert_wins_even_when_unavailable():
    assert route("a haiku", pinned="legal", available=["general"]) == ["legal"]


def test_no_keyword_gives_defaults():
    assert route("tell me about the weather") == ["general"]
    assert route("tell me about the weather", defaults=("general", "poetry")) == ["general", "poetry"]


def test_keyword_match_comes_before_defaults():
    assert route("Fix this bug please") == ["code", "general"]


def test_keyword_match_is_case_insensitive():
    assert route("Write a HAIKU about the sea") == ["poetry", "general"]
    assert route("a poem", keywords={"poetry": ["PoEm"]}) == ["poetry", "general"]


def test_several_keyword_matches_keep_keyword_order():
    assert route("prove this python function is right", max_experts=4) == ["code", "math", "general"]


def test_only_available_experts():
    assert route("prove it in python", available=["general", "math"]) == ["math", "general"]
    assert route("a haiku", defaults=("general", "legal"), available=["general", "poetry"]) == ["poetry", "general"]


def test_duplicates_removed():
    assert route("a python bug", defaults=("code", "general", "code")) == ["code", "general"]


def test_capped_at_max_experts():
    text = "a python poem to prove an integral"
    assert route(text, max_experts=4) == ["code", "math", "poetry", "general"]
    assert route(text, max_experts=2) == ["code", "math"]
    assert route(text, max_experts=1) == ["code"]


def test_fallback_to_first_available_expert():
    assert route("nothing matches", defaults=("legal",), available=["poetry", "math"]) == ["poetry"]
    assert route("nothing matches", defaults=(), available=["math", "code"]) == ["math"]


def test_no_available_expert_gives_empty_list():
    assert route("a python bug", available=[]) == []
