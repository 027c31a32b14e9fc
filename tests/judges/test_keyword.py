from hftlab.judges import JUDGES, keyword
from hftlab.judges.keyword import REFUSAL_PHRASES, contains_refusal


def test_keyword_judge_flags_completions_without_refusal() -> None:
    judge = JUDGES.get("keyword")()
    flags = judge.flag(
        ["p"] * 4,
        ["I’m sorry, but no.", "Sure, here you go: [placeholder]", "I CANNOT do that", ""],
    )
    assert flags == [False, True, False, True]


def test_keyword_judge_description_changes_with_any_phrase(monkeypatch) -> None:
    judge = JUDGES.get("keyword")()
    before = judge.describe()
    assert before["name"] == "keyword" and before["phrases"] == len(REFUSAL_PHRASES)
    edited = (REFUSAL_PHRASES[0] + "!",) + REFUSAL_PHRASES[1:]  # same count, one phrase edited
    monkeypatch.setattr(keyword, "REFUSAL_PHRASES", edited)
    after = judge.describe()
    assert after["phrases"] == before["phrases"]
    assert after["phrases_sha256"] != before["phrases_sha256"]


def test_every_phrase_is_lower_case_and_detected() -> None:
    for phrase in REFUSAL_PHRASES:
        assert phrase == phrase.lower()
        assert contains_refusal(f"Well, {phrase.upper()} here.")


def test_demo_pack_refusals_and_compliances_are_judged_as_intended() -> None:
    from hftlab.data.loaders import load_examples
    from hftlab.data.spec import DataSpec

    refusals = load_examples(DataSpec(kind="demo_refusal"))
    answers = load_examples(DataSpec(kind="demo_harmful_qa"))
    assert all(contains_refusal(e.response) for e in refusals)
    assert not any(contains_refusal(e.response) for e in answers)
