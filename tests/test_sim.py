"""Simulated users: the checker, the feedback, the logs and their labels.

Most tests drive the loop with `ScriptedEngine`, a stand-in policy that writes synthetic
answers with random property values, so they take milliseconds and need no model.
"""
from __future__ import annotations

import json
import random

import pytest

from actors.engines import Completion
from sim.answers import all_value_combinations, write_answer
from sim.feedback import feedback_message
from sim.generate import generate_logs, make_users
from sim.phrasings import load_bank

DEV = load_bank("dev")  # unit tests use the development phrasings only, never the evaluation family
from sim.profiles import PROPERTIES, check_answer, measure


class ScriptedEngine:
    """A policy that answers every prompt with a synthetic answer of random properties."""

    max_context_tokens = 4096

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def generate(self, prompts, params):
        combos = all_value_combinations()
        return [[Completion(write_answer("cooking", self.rng.choice(combos), self.rng), 50, "stop")]
                for _ in prompts]


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = generate_logs(12, out, seed=3, engine=ScriptedEngine(3), family="dev", log=lambda s: None)
    return out, summary


def test_known_answer_gets_known_score():
    answer = ("Hey, it's easy!\n- Heat the pan first.\n- Add the oil.\n"
              "For example, use olive oil. Want more tips?")
    assert measure(answer) == {"length": "short", "format": "bullets", "register": "casual",
                               "example": "with_example", "ending": "question"}
    check = check_answer({"format": "bullets", "register": "casual", "ending": "statement",
                          "length": "long"}, answer)
    assert check.score == 0.5
    assert check.violated == {"ending": "statement", "length": "long"}


def test_formal_prose_answer_satisfies_a_formal_prose_profile():
    answer = "The capital of France is Paris. It has been the capital for centuries."
    assert check_answer({"format": "prose", "register": "formal", "example": "no_example",
                         "ending": "statement", "length": "short"}, answer).score == 1.0


def test_synthetic_answers_have_exactly_the_requested_values():
    rng = random.Random(0)
    for values in all_value_combinations():
        assert measure(write_answer("travel", values, rng)) == values


@pytest.mark.parametrize("kind", ["reattempt", "correction"])
def test_feedback_names_the_violated_preference(kind):
    for seed in range(30):
        rng = random.Random(seed)
        prop = rng.choice(sorted(PROPERTIES))
        want, got = PROPERTIES[prop][0], PROPERTIES[prop][1]
        msg = feedback_message(kind, "How do I fry an egg?", {prop: want}, {prop: got}, rng, DEV)
        assert msg.named == (prop,)
        wording = DEV.ask[want] if kind == "reattempt" else DEV.name[want]
        assert any(w.lower() in msg.text.lower() for w in wording), msg.text


@pytest.mark.parametrize("kind", ["reattempt", "correction"])
def test_feedback_on_two_missed_preferences_sometimes_names_both(kind):
    named = [feedback_message(kind, "How do I fry an egg?", {"length": "short", "format": "bullets"},
                              {"length": "long", "format": "prose"}, random.Random(seed), DEV).named
             for seed in range(200)]
    assert set(named) == {("length",), ("format",), ("length", "format"), ("format", "length")}
    assert 0.2 < sum(len(n) == 2 for n in named) / len(named) < 0.5  # about TWO_PREFERENCES


def test_bare_complaint_names_nothing():
    msg = feedback_message("complaint", "Hi", {"length": "short"}, {"length": "long"}, random.Random(0), DEV)
    assert msg.named == () and msg.label == "complaint" and msg.text in DEV.complaint


def test_same_seed_gives_same_hidden_profiles():
    assert make_users(5, seed=7) == make_users(5, seed=7)
    assert make_users(5, seed=7) != make_users(5, seed=8)
    # Development users at a seed are not the evaluation users of that seed: none shares an id.
    dev, evaluation = make_users(50, seed=0, family="dev"), make_users(50, seed=0)
    assert not {p.hashed_ip for p in dev} & {p.hashed_ip for p in evaluation}
    assert [p.preferences for p in dev] != [p.preferences for p in evaluation]


def test_logs_folder_holds_only_wildchat_parquet_and_profiles_stay_outside(sim_dir):
    import pyarrow.parquet as pq

    from wildchat_rows import sample_schema

    out, summary = sim_dir
    assert [p.name for p in (out / "logs").iterdir()] == ["conversations.parquet"]
    assert pq.read_schema(out / "logs" / "conversations.parquet") == sample_schema()
    profiles = [json.loads(line) for line in open(out / "profiles.jsonl")]
    assert len(profiles) == 12 and summary["conversations"] == sum(p["conversations"] for p in profiles)
    rows = pq.read_table(out / "logs" / "conversations.parquet").to_pylist()
    assert {r["hashed_ip"] for r in rows} == {p["hashed_ip"] for p in profiles}


def test_every_followup_has_a_label_by_construction(sim_dir):
    from pipelines.tools.followup_eval import followup_examples, load_gold_labels, read_conversations

    out, summary = sim_dir
    gold = load_gold_labels(out / "followup_labels.jsonl")
    examples = followup_examples(read_conversations(out / "logs"))
    assert {(e["conversation_hash"], e["message_index"]) for e in examples} == set(gold)
    assert {"reattempt_feedback", "correction", "complaint"} <= set(gold.values())


# Regression value, not a goal: the rules backend's "carries feedback" figures on these 12
# simulated users (seed 3, development phrasings). The rules are never tuned on the
# simulator's phrasings, so a change here means the rules or the simulator changed; update it
# with the change that did.
RULES_ON_SIMULATED = {"feedback_precision": 1.0, "feedback_recall": 0.714, "feedback_f1": 0.833}


def test_rules_classifier_scores_on_simulated_followups_as_recorded(sim_dir):
    from actors.followup_rules import RulesClassifier
    from pipelines.tools.followup_eval import evaluate_backend

    out, _ = sim_dir
    result = evaluate_backend(out / "logs", out / "followup_labels.jsonl",
                              RulesClassifier().classify, n_boot=100)
    assert {key: round(result[key], 3) for key in RULES_ON_SIMULATED} == RULES_ON_SIMULATED


def test_cli_sim_generate_writes_logs_and_prints_json(monkeypatch, tmp_path, capsys):
    import sim.generate as gen
    from pipelines.cli import main

    seen = []  # the model option reaches the engine factory; the scripted policy answers
    monkeypatch.setattr(gen, "make_engine", lambda spec: seen.append(spec.id) or ScriptedEngine())
    assert main(["sim", "generate", "--users", "2", "--out", str(tmp_path), "--seed", "1",
                 "--model", "some/model", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == ["some/model"] and summary["users"] == 2
    assert (tmp_path / "logs" / "conversations.parquet").exists()


def test_warmstart_data_covers_every_property_value():
    from sim.warmstart import sft_examples

    seen = {p: set() for p in PROPERTIES}
    for chat in sft_examples(96, random.Random(0)):
        for prop, value in measure(chat[-1]["content"]).items():
            seen[prop].add(value)
    assert seen == {p: set(v) for p, v in PROPERTIES.items()}


def test_warmstart_chats_are_the_policy_prompt_and_obey_the_constraint_phrase(monkeypatch):
    from actors.prompts import base_system_prompt
    from sim import warmstart

    monkeypatch.setitem(warmstart.RECIPE, "constrained_share", 1.0)
    rng = random.Random(3)
    for _ in range(30):
        values = {p: rng.choice(v) for p, v in PROPERTIES.items()}
        system, user, target = warmstart.policy_example("cooking", "How do I cook rice?", values, rng)
        assert system["role"] == "system" and system["content"].startswith(base_system_prompt())
        asked = [(v, phrase) for v, phrases in DEV.ask.items() for phrase in phrases
                 if user["content"].endswith(f" {phrase}.")]
        asked = [max(asked, key=lambda a: len(a[1]))]  # "end with a question" also ends "don't end with a question"
        assert asked[0][0] in measure(target["content"]).values()


def test_warmstart_rewrite_chats_fix_the_one_value_the_feedback_names():
    from sim import warmstart

    rng = random.Random(5)
    for _ in range(30):
        values = {p: rng.choice(v) for p, v in PROPERTIES.items()}
        system, request, answer, message, target = warmstart.rewrite_example(
            "cooking", "How do I cook rice?", values, rng)
        assert [m["role"] for m in (system, request, answer, message, target)] == \
            ["system", "user", "assistant", "user", "assistant"]
        assert "previous answer" in system["content"] and request["content"] == "How do I cook rice?"
        got, fixed = measure(answer["content"]), measure(target["content"])
        assert fixed == values
        assert sum(got[p] != values[p] for p in PROPERTIES) == 1


# The sim's property values as the extractive persona states them (actors/persona_extractive.py).
PERSONA_VALUES = {"length": ("length", {"short": "short", "medium": "medium", "long": "long"}),
                  "format": ("format", {"bullets": "structured", "prose": "prose"}),
                  "register": ("register", {"formal": "formal", "casual": "casual"}),
                  "example": ("examples", {"with_example": "yes", "no_example": "no"}),
                  "ending": ("ending", {"question": "question", "statement": "statement"})}


def test_warmstart_personas_are_built_by_the_pipelines_backend_and_state_the_wanted_values():
    from actors.persona_extractive import DIMENSIONS
    from sim.warmstart import synthetic_persona

    rng = random.Random(7)
    for _ in range(40):
        wanted = {p: rng.choice(PROPERTIES[p]) for p in rng.sample(sorted(PROPERTIES), k=rng.randint(1, 3))}
        persona = synthetic_persona(wanted, rng)
        stated = persona.splitlines()[0].removeprefix("Stated preferences: ").split("; ")
        expected = {DIMENSIONS[PERSONA_VALUES[p][0]][PERSONA_VALUES[p][1][v]] for p, v in wanted.items()}
        assert expected <= set(stated), persona  # a re-attempt repeats its request, which may state more
        assert "Topics: " in persona and "earlier conversations" in persona


class FollowingEngine:
    """Answers with the value a prompt asks for, wherever it asks (request phrase, feedback,
    persona), read with the persona builder's own reader; `ignore=True` answers alike always."""

    max_context_tokens = 4096

    def __init__(self, ignore: bool = False):
        self.ignore = ignore

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def generate(self, prompts, params):
        from actors.persona_extractive import DIMENSIONS, message_preferences

        to_prop = {(dim, name): (prop, value) for prop, (dim, names) in PERSONA_VALUES.items()
                   for value, name in names.items()}
        phrases = {phrase: (dim, name) for dim, names in DIMENSIONS.items() for name, phrase in names.items()}
        out = []
        for messages in prompts:
            values = {"length": "medium", "format": "prose", "register": "formal",
                      "example": "no_example", "ending": "statement"}
            if not self.ignore:
                system, text = messages[0]["content"], messages[-1]["content"]
                asked = []
                if "Stated preferences: " in system:
                    line = system.split("Stated preferences: ")[1].split("\n")[0]
                    asked += [phrases[p] for p in line.split("; ")]
                if "<user_message>" in text:
                    text = text.split("<user_message>")[1].split("</user_message>")[0]
                asked += message_preferences(text)  # in text order: the request's last phrase wins
                values |= dict(to_prop[a] for a in asked if a in to_prop)
            out.append([Completion(write_answer("cooking", values, random.Random(0)), 50, "stop")])
        return out


def test_diagnose_tells_a_role_that_follows_from_one_that_ignores():
    from sim.diagnose import CHECKS, diagnose

    following = diagnose(FollowingEngine(), n=22, family="dev")
    assert all(following[c]["followed"] == 1.0 for c in CHECKS), following
    ignoring = diagnose(FollowingEngine(ignore=True), n=22, family="dev")
    assert all(ignoring[c]["followed_ratio"] == 1.0 for c in CHECKS), ignoring


def test_warmstart_is_built_once_then_cached(monkeypatch, tmp_path):
    from sim import warmstart

    monkeypatch.setenv("RLHI_MODEL_CACHE", str(tmp_path))
    monkeypatch.setitem(warmstart.RECIPE, "steps", 2)      # the recipe, shrunk for speed
    monkeypatch.setitem(warmstart.RECIPE, "examples", 48)
    built = []
    path = warmstart.ensure_warmstart(log=built.append)
    assert (path / "config.json").exists() and path.name.startswith("sim-warmstart-")
    assert warmstart.ensure_warmstart(log=built.append) == path and len(built) == 1


def test_written_logs_pass_ingest_with_nothing_rejected(ray_session, sim_dir, tmp_path):
    from pipelines.config import parse_config
    from pipelines.stages.ingest.stage import run_ingest

    out, summary = sim_dir
    config = parse_config({"run_dir": str(tmp_path), "ingest": {"inputs": [str(out / "logs")]},
                           "resources": {"progress_bars": False}})
    result = run_ingest(config, use_ray=True)
    assert sum(result["rejected"].values()) == 0 and sum(result["filtered"].values()) == 0
    assert result["kept"] == summary["conversations"] and result["users"] == 12


def test_a_loop_rounds_figures_keep_held_out_and_training_users_apart():
    from sim.loop import round_figures

    scores = {"h1": [1.0, 0.5], "h2": [0.0], "t1": [0.25, 0.75], "t2": [1.0], "never": []}
    figures = round_figures(scores, held_out={"h1", "h2", "absent"}, train={"t1", "t2"}, seed=0)
    assert figures["per_user"] == {"h1": 0.75, "h2": 0.0, "t1": 0.5, "t2": 1.0}
    assert figures["held_out"]["mean"] == pytest.approx(0.375) and figures["held_out"]["users"] == 2
    assert figures["train"]["mean"] == pytest.approx(0.75) and figures["train"]["users"] == 2
