"""The simulated-user experiment's results: the summary with paired differences, the table,
the decomposition lines and the plot (`results.json`, `results.md`, `results.png`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.bootstrap import mean_interval, paired_difference

# Result key -> (arm, the arm it is compared with), paired over held-out users.
DIFFERENCES = {"rlhi_minus_base": ("rlhi", "base"), "persona_minus_agnostic": ("rlhi", "user_agnostic"),
               "rlhi_minus_base_persona": ("rlhi", "base_persona"), "rlhi_minus_sft": ("rlhi", "sft"),
               "rewards_only_minus_base_persona": ("rewards_only", "base_persona"),
               "oracle_persona_minus_base_persona": ("oracle_persona", "base_persona"),
               "oracle_pairs_minus_base_persona": ("oracle_pairs", "base_persona")}


def summarize(scores: dict[str, dict[str, float]], seed: int) -> dict[str, Any]:
    """Per-arm intervals over held-out users and every paired difference whose two arms ran."""
    arms = {name: mean_interval([s[u] for u in sorted(s)], seed=seed).to_json() for name, s in scores.items()}
    return {"arms": arms} | {key: paired_difference(scores[a], scores[b], seed=seed).to_json()
                             for key, (a, b) in DIFFERENCES.items() if a in scores and b in scores}


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| arm | mean satisfaction | 95% CI |", "|---|---|---|"]
    rows = list(result["arms"].items()) + [(f"{a} − {b} (paired)", result[key])
                                           for key, (a, b) in DIFFERENCES.items() if key in result]
    for name, iv in rows:
        lines.append(f"| {name} | {iv['mean']:.3f} | [{iv['ci_low']:.3f}, {iv['ci_high']:.3f}] |")
    return "\n".join(lines)


def roles_line(roles: dict[str, Any], checks: tuple[str, ...]) -> str:
    return (f"Roles of the warm-start on {roles.get('family', 'eval')} phrasings, followed / chance "
            "(`rlhi sim diagnose`): " + ", ".join(
                f"{c} {roles[c]['followed']:.2f} / {roles[c]['chance']:.2f}" for c in checks))


def pairs_line(pairs: dict[str, dict[str, float]]) -> str:
    return "Train pairs of the rlhi run, checker chosen - rejected: " + ", ".join(
        f"{source} {q['chosen_minus_rejected']:+.3f} ({q['better']} better, {q['worse']} worse of {q['pairs']})"
        for source, q in pairs.items())


def extractor_line(extractor: dict[str, dict[str, float]]) -> str:
    return "Persona extractor, exact match on simulated feedback / free-form messages: " + ", ".join(
        f"{family} {r['simulated_feedback_exact']:.3f} / {r['messages_exact']:.3f}" for family, r in extractor.items())


def decomposition_table(decomposition: dict[str, Any]) -> str:
    """Per link, what the pipeline got right against the hidden profiles."""
    persona, rewriter, rm = decomposition["personas"], decomposition["rewriter"], decomposition["reward_model"]
    rows = [("personas (held-out users)", f"precision {persona['precision']:.3f}, coverage {persona['coverage']:.3f}, "
                                          f"{persona['stated_per_user']:.2f} stated per user"),
            ("rewriter", f"fix rate {rewriter['fix_rate']:.3f}, keep rate {rewriter['keep_rate']:.3f} "
                         f"over {rewriter['rewrites']} rewrites"),
            ("pairs (train)", "; ".join(f"{s} {q['chosen_minus_rejected']:+.3f} over {q['pairs']}"
                                        for s, q in decomposition["pairs"].items())),
            ("reward model vs checker (held-out users' candidates)",
             f"agreement {rm['agreement']:.3f} over {rm['candidate_pairs']} candidate pairs"),
            ("oracle pairs", f"trained on {decomposition['oracle_pairs']} pairs (rlhi on "
                             f"{decomposition['rlhi_train_pairs']})")]
    return "\n".join(["| link | measured |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    means = [result["arms"][n]["mean"] for n in names]
    errors = [[m - result["arms"][n]["ci_low"] for n, m in zip(names, means)],
              [result["arms"][n]["ci_high"] - m for n, m in zip(names, means)]]
    colors = {"rlhi": "#c53", "sft": "#6a9", "rewards_only": "#d84"}
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 1.5, 3.5))
    ax.bar(names, means, yerr=errors, capsize=4, color=[colors.get(n, "#79c" if n.startswith("oracle") else "#999")
                                                         for n in names])
    ax.set_ylabel("preference satisfaction (checker)")
    ax.set_ylim(0, 1)
    ax.set_title("Held-out simulated users, 95% bootstrap CI over users")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
