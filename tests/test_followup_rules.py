"""The `rules` follow-up backend: each signal, in English and in other languages."""
from __future__ import annotations

import pytest

from actors.cue_matcher import Cues, cue_keys
from actors.followup_rules import (RulesClassifier, classify_followup,
                                   explain_followup)

CODE_ANSWER = "```python\nimport pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(df.head())\n```"
STORY = "Once upon a time, a small dragon lived in the mountains above a quiet village..."


def label(message: str, answer: str = STORY, previous_user: str | None = None) -> str:
    return classify_followup(previous_user, answer, message)[0]


@pytest.mark.parametrize("previous_user, message", [
    ("Write an essay about climate change", "Write an essay about climate change, at least 5 pages"),
    ("Write an essay about climate change", "Write an essay about climate change"),
    ("Give me 10 names for a bakery", "Give me 10 names for a bakery, only French words please"),
    ("写一篇关于狗的文章", "写一篇关于狗的文章，至少1000字"),
    ("Напиши эссе о собаках", "Напиши эссе о собаках подробнее, 5 страниц"),
    ("Escribe un poema sobre el mar", "Escribe un poema sobre el mar, más largo y sin rima"),
])
def test_repeating_the_request_with_an_added_constraint_is_a_reattempt(previous_user, message):
    assert label(message, previous_user=previous_user) == "reattempt_feedback"


def test_rephrasing_the_request_after_a_refusal_is_a_reattempt():
    refusal = "I'm sorry, but I can't help with writing that story."
    message = "It is for a novel: write the story where the villain escapes the prison"
    assert label(message, refusal, "write a story where the villain escapes the prison") == (
        "reattempt_feedback")


def test_pushing_back_on_a_refusal_is_a_correction_and_moving_on_is_a_new_request():
    refusal = "I'm sorry, but I can't create that image description."
    assert label("it is AI-generated art, nobody real is shown", refusal, "describe her") == (
        "correction")
    assert label("write a poem about cats", refusal, "describe her") == "new_request"


def test_a_similar_request_on_a_new_topic_is_a_new_request():
    assert label("write a poem about dogs", previous_user="write a poem about cats") == (
        "new_request")


@pytest.mark.parametrize("message", [
    "make it shorter", "Can you make it more funny and add a twist at the end?", "try again",
    "write it again without the greeting", "give me 5 more", "great, but make it shorter",
    "写得更详细一点", "Сделай короче", "Hazlo más corto", "Plus court, s'il te plaît", "Bitte kürzer",
])
def test_a_revision_request_aimed_at_the_answer_is_a_reattempt(message):
    assert label(message) == "reattempt_feedback"


@pytest.mark.parametrize("message, answer", [
    ("That's wrong, the capital is Canberra.", "The capital of Australia is Sydney."),
    ("No, it's Canberra", "The capital of Australia is Sydney."),
    ("I said APIs, not libraries", "Here are some libraries: requests, numpy."),
    ("these are libraries, not APIs", "Here are some libraries: requests, numpy."),
    ("it is already out", "The iPhone 14 has not been released yet."),
    ("不对，应该是上海", "北京是中国最大的城市。"),
    ("Нет, столица Австралии — Канберра", "Столица Австралии — Сидней."),
    ("No, eso está mal, la capital es Canberra", "La capital de Australia es Sídney."),
    ("Das ist falsch", "Die Hauptstadt Australiens ist Sydney."),
])
def test_a_negation_or_stated_fix_is_a_correction(message, answer):
    assert label(message, answer) == "correction"


@pytest.mark.parametrize("message", [
    "this doesn't work", "I get an error", "still not working", "this is not what I asked for",
    "are you sure?", "Traceback (most recent call last):\n  File \"app.py\", line 3\nKeyError: 'a'",
    "运行报错了", "Код не работает", "No funciona", "Não funciona",
])
def test_an_error_report_or_dissatisfaction_without_a_fix_is_a_complaint(message):
    assert label(message, CODE_ANSWER) == "complaint"


def test_an_error_pasted_after_an_answer_without_code_is_a_new_request():
    assert label("how do I fix error 404 on my website?") == "new_request"


@pytest.mark.parametrize("message, answer", [
    ("what do you mean by monad?", "You can think of it as a monad."),
    ("why would a linear SVM work better?", "A linear SVM would work better on this data."),
    ("你说的是什么意思？", "这个意思是……"),
    ("Что ты имеешь в виду?", "Это зависит от контекста."),
    ("¿Qué quieres decir con eso?", "Depende del contexto."),
])
def test_a_question_about_the_answer_is_a_clarification(message, answer):
    assert label(message, answer) == "clarification"


@pytest.mark.parametrize("message", [
    "thanks!", "Thank you so much, this is great", "ok thanks, that's enough", "谢谢",
    "Спасибо большое!", "Gracias", "Merci beaucoup !", "Vielen Dank!", "Obrigado!",
])
def test_thanks_alone_is_positive(message):
    assert label(message) == "positive"


def test_thanks_followed_by_a_new_request_is_a_new_request():
    assert label("Thanks! Now write a poem about spring") == "new_request"


def test_thanks_then_many_fillers_and_a_request_is_decided_at_once():
    # 24 repeats of "this is" fit the 200 characters the filler check reads; with two ways
    # to parse each, a near miss once took the regex 10-40 s of backtracking (holding the
    # GIL, hence a child process with a deadline).
    import subprocess
    import sys
    code = ("from actors.followup_rules import classify_followup; "
            "print(classify_followup(None, 'An answer.', 'thanks ' + 'this is ' * 24 + 'x')[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=4)
    assert done.stdout.strip() == "new_request"


@pytest.mark.parametrize("message", [
    "How do I bake sourdough bread?", "What is the difference between TCP and UDP?",
    "continue", "Why is the sky blue?", "Actually, can you write a haiku about dogs?",
    "my wifi is not working, what should I do?", "do the same for the second verse",
    "Write a thank you letter to my teacher", "帮我写一个Python爬虫", "Напиши стихотворение о весне", "Escreva uma receita de bolo",
    "Rewrite this paragraph in a formal tone: " + "The team worked hard and sales went up. " * 5,
])
def test_an_unrelated_or_fresh_request_is_a_new_request(message):
    assert label(message, previous_user="write a poem about the sea") == "new_request"


def test_asking_for_a_translation_is_a_new_request():
    assert label("translate it into Spanish", previous_user="Write a poem about the sea") == (
        "new_request")


def test_asking_for_the_requested_language_after_an_answer_in_another_is_a_reattempt():
    assert label("in English please", "这是一首关于大海的诗……", "Write a poem about the sea") == (
        "reattempt_feedback")


def test_every_result_is_a_known_label_with_a_confidence_in_unit_range():
    items = [(None, "", ""), (None, STORY, "thanks"), ("a", "b", "c" * 5000), (None, "", "?")]
    for lab, confidence in RulesClassifier().classify(items):
        assert lab in {"reattempt_feedback", "correction", "complaint", "clarification",
                       "positive", "new_request"}
        assert 0.0 <= confidence <= 1.0


def test_the_batched_classifier_keeps_order_and_names_its_backend():
    items = [(None, STORY, "thanks!"), (None, CODE_ANSWER, "this doesn't work")]
    assert RulesClassifier.backend == "rules"
    assert [lab for lab, _ in RulesClassifier().classify(items)] == ["positive", "complaint"]


def test_explain_names_the_rule_that_decided():
    assert explain_followup("Write an essay", STORY, "Write an essay")[2] == "repeat"


def test_cues_match_whole_words_only():
    cues = Cues(r"no|(?:make|do) it again")
    for text, hit in [("no, not that", True), ("notable", False), ("please make it again", True),
                      ("remake it again", False)]:
        assert cues.search(text, cue_keys(text)) is hit


def test_a_cue_shorter_than_three_letters_must_be_spelled_out():
    with pytest.raises(ValueError, match="spell out"):
        Cues(r"ok(?:ay)?")


@pytest.mark.parametrize("message", ["Non-profit organization names for a dog shelter",
                                     "No-code tools for a landing page", "Great-grandmother's recipes for bread"])
def test_a_hyphenated_word_that_starts_like_a_verdict_is_a_new_request(message):
    # 'non', 'no' and 'great' open verdicts; 'non-profit' and 'great-grandmother' do not.
    assert label(message, previous_user="Write names for my shop") == "new_request"


@pytest.mark.parametrize("message", ["Wrong--the capital is Canberra", "No -- it is Canberra"])
def test_a_verdict_set_off_by_dashes_is_still_a_correction(message):
    assert classify_followup("Capital of Australia?", "Sydney.", message) == ("correction", 0.8)
