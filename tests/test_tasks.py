import math

from hftlab.data.records import Example
from hftlab.tasks import TASKS, exact_label_match, extract_final_number, final_number_match


def test_exact_label_match_is_the_reference_rule() -> None:
    assert exact_label_match(" positive\n", "positive")
    assert exact_label_match("Positive", "positive")
    assert not exact_label_match("positive.", "positive")  # Booster issue #1: exact only
    assert not exact_label_match("The sentiment is positive", "positive")
    assert exact_label_match("Sci/Tech", "Sci/Tech") and exact_label_match("sci/tech", "Sci/Tech")


def test_final_number_extraction() -> None:
    assert extract_final_number("so 3 + 4 = 7. The final answer is: 1,234 apples") == 1234
    assert extract_final_number("first 3 then 5 then 12") == 12
    assert math.isinf(extract_final_number("no numbers"))
    assert final_number_match("The final answer is: 18", "Janet ... The final answer is: 18")


def test_task_prompts() -> None:
    sst2 = TASKS["sst2"].format(Example(prompt="fun film", response="positive", label="positive"))
    assert sst2.prompt.startswith("Analyze the sentiment") and sst2.prompt.endswith("fun film")
    gsm = TASKS["gsm8k"].format(Example(prompt="2+2?", response="4", label="4"))
    assert gsm.prompt.startswith("2+2?") and "step by step" in gsm.prompt


def test_a_bare_label_is_a_label_answer() -> None:
    sst2, ag_news, gsm8k = TASKS["sst2"], TASKS["ag_news"], TASKS["gsm8k"]
    assert sst2.labels == ("negative", "positive")
    assert sst2.is_label_answer(" Positive\n") and sst2.is_label_answer("negative")
    assert not sst2.is_label_answer("positive, here is how")
    assert not sst2.is_label_answer("I cannot help with that.")
    assert ag_news.is_label_answer("sci/tech") and not ag_news.is_label_answer("Weather")
    assert gsm8k.labels == () and not gsm8k.is_label_answer("4")  # open-ended answers


def test_a_task_prompt_is_the_shape_format_gives() -> None:
    for name, raw in (("sst2", "fun film"), ("ag_news", "Stocks fell."), ("gsm8k", "2+2?")):
        task = TASKS[name]
        assert task.is_task_prompt(task.format(Example(prompt=raw, response="x")).prompt)
        assert not task.is_task_prompt(raw)
    assert not TASKS["sst2"].is_task_prompt("How do I pick a lock? Analyze the sentiment")
