"""What a run leaves in MLflow besides its numbers: the candidates of each round as a
table, the prompts, ``result.json``, a plot of the scores per round, the final prompt's
lineage (a picture and a list) and the run's description."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from distillprompt.engine import RoundResult, RunResult
from distillprompt.state import STAGES, Candidate

from ..registry import CANDIDATE as CANDIDATE_ALIAS

NOTE = "mlflow.note.content"  # a run's description in the MLflow UI
NOTE_MARK = "<!-- distillprompt -->"
NOTE_LIMIT = 8000  # MLflow's longest tag value


def round_table(result: RoundResult) -> str:
    return f"candidates/round_{result.round:03d}.json"


def log_round(mlflow: Any, result: RoundResult) -> None:
    """The round's candidates as a table (shown as one in the UI)."""
    rows = [
        {
            "round": c.round,
            "stage": c.stage,
            "candidate": c.id,
            "parents": ",".join(map(str, c.parents)),
            "prompt": c.prompt,
            "train_score": c.score,
            "val_score": c.val_score,
            "duplicate_of": c.duplicate_of,
            "examples_scored": c.examples_scored,
            "eliminated_by": c.eliminated_by,
            "refused": c.refused,
        }
        for c in result.candidates
    ]
    if rows:
        mlflow.log_table(data=columns(rows), artifact_file=round_table(result))


def log_result(mlflow: Any, result: RunResult, method: str) -> None:
    """Both prompts, ``result.json``, the plots and the lineage of the final prompt."""
    mlflow.log_text(result.initial_prompt, "prompts/initial.txt")
    mlflow.log_text(result.final_prompt, "prompts/final.txt")
    mlflow.log_dict(result.to_dict(), "result.json")
    with tempfile.TemporaryDirectory() as folder:
        mlflow.log_artifact(plot_rounds(result, method, Path(folder)), "plots")
        mlflow.log_artifact(plot_lineage(result, Path(folder)), "plots")
    mlflow.log_text(lineage_text(result), "lineage.md")


def log_evaluation(mlflow: Any, prompt: str, score: Any) -> None:
    """A stand-alone evaluation's prompt and its per-example test outputs."""
    mlflow.log_text(prompt, "prompts/evaluated.txt")
    rows = [
        {"output": o, "prediction": p, "target": t, "score": v}
        for o, p, t, v in zip(score.outputs, score.predictions, score.targets, score.per_example)
    ]
    if rows:
        mlflow.log_table(data=columns(rows), artifact_file="evaluation/test_outputs.json")


def lineage(history: list[Candidate], final: Candidate) -> list[Candidate]:
    """The winner and every candidate it was derived from, oldest first."""
    by_id = {candidate.id: candidate for candidate in history}
    seen: dict[int, Candidate] = {}
    stack = [final.duplicate_of if final.duplicate_of is not None else final.id]
    while stack:
        current = by_id[stack.pop()]
        if current.id in seen:
            continue
        seen[current.id] = current
        for parent in current.parents:
            original = by_id[parent]
            stack.append(original.duplicate_of if original.duplicate_of is not None else original.id)
    return sorted(seen.values(), key=lambda c: c.id)


def plot_rounds(result: RunResult, method: str, folder: Path) -> Path:
    """Best train score per round, with each stage's best and the final test score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(7, 4))
    numbers = [0] + [r.round for r in result.rounds]
    best = [result.initial_scores["train"]["score"]] + [r.best_score or 0.0 for r in result.rounds]
    axis.plot(numbers, best, marker="o", linewidth=2, label="best train score")
    stages = [s for s in dict.fromkeys(c.stage for c in result.history) if s != "initial"]
    for stage in stages:
        points = [(r.round, r.stage_stats[stage]["best"]) for r in result.rounds if "best" in r.stage_stats.get(stage, {})]
        if points:
            axis.plot(*zip(*points), marker=".", linestyle="--", alpha=0.7, label=f"{stage} best")
    if "score" in result.final_scores["test"]:
        axis.axhline(result.final_scores["test"]["score"], color="black", linestyle=":", label="final test score")
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("score")
    axis.set_title(f"{method} on {result.task['name']}")
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    path = folder / "score_per_round.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_lineage(result: RunResult, folder: Path) -> Path:
    """The final prompt and every candidate it was derived from, as boxes and arrows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chain = lineage(result.history, result.final)
    order = {"initial": 0, **{stage: i + 1 for i, stage in enumerate(STAGES)}}
    for candidate in chain:
        order.setdefault(candidate.stage, len(order))
    columns: dict[tuple[int, int], list[Candidate]] = {}
    for candidate in chain:
        columns.setdefault((candidate.round, order[candidate.stage]), []).append(candidate)
    keys = sorted(columns)
    position: dict[int, tuple[float, float]] = {}
    for x, key in enumerate(keys):
        for y, candidate in enumerate(columns[key]):
            position[candidate.id] = (x, -y)
    figure, axis = plt.subplots(figsize=(max(6, 1.9 * len(keys)), max(3, 1.2 * max(len(v) for v in columns.values()) + 1.5)))
    for candidate in chain:
        for parent in candidate.parents:
            source = result.history[parent]
            source_id = source.duplicate_of if source.duplicate_of is not None else source.id
            if source_id in position:
                axis.annotate(
                    "", xy=position[candidate.id], xytext=position[source_id],
                    arrowprops={"arrowstyle": "-|>", "color": "grey", "shrinkA": 28, "shrinkB": 28, "mutation_scale": 14},
                )
    for candidate in chain:
        x, y = position[candidate.id]
        winner = candidate.id == result.final.id or candidate.id == result.final.duplicate_of
        axis.text(
            x, y, f"#{candidate.id} {candidate.stage}\nround {candidate.round}\nscore {candidate.score or 0:.3f}",
            ha="center", va="center", fontsize=7,
            bbox={"boxstyle": "round", "facecolor": "gold" if winner else "white", "edgecolor": "black"},
        )
    axis.set_xlim(-0.7, len(keys) - 0.3)
    axis.set_ylim(min(p[1] for p in position.values()) - 0.7, 0.7)
    axis.axis("off")
    axis.set_title("How the final prompt was derived")
    path = folder / "lineage.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def lineage_text(result: RunResult) -> str:
    lines = ["# Lineage of the final prompt", ""]
    for candidate in lineage(result.history, result.final):
        parents = ", ".join(f"#{p}" for p in candidate.parents) or "none"
        lines.append(
            f"- **#{candidate.id}** {candidate.stage}, round {candidate.round}, train score "
            f"{candidate.score or 0:.4f}, from {parents}: {candidate.prompt}"
        )
    return "\n".join(lines) + "\n"


def describe(mlflow: Any, run_id: str, result: RunResult, method: str, metric: str, registered: Any) -> None:
    """The run's description (Markdown on its Overview page): the outcome at a glance.

    A description the user wrote (``mlflow.note.content``) is left alone."""
    current = mlflow.get_run(run_id).data.tags.get(NOTE)
    if current and not current.startswith(NOTE_MARK):
        return
    initial, final = result.initial_scores, result.final_scores

    def scores(split: str) -> str:
        before, after = (initial.get(split) or {}).get("score"), (final.get(split) or {}).get("score")
        return " → ".join("—" if value is None else f"{value:.4f}" for value in (before, after))

    validation = f", validation {scores('val')}" if (final.get("val") or {}).get("score") is not None else ""
    lines = [
        NOTE_MARK,
        f"**{method}**, {metric}: test {scores('test')}, train {scores('train')}"
        f"{validation}; stopped by {result.stop_reason}, {len(result.history)} candidates.",
    ]
    if result.diagnosis:
        lines.append(f"\n**No signal**: {result.diagnosis}")
    if result.verdict is not None:
        lines.append(f"\n{result.verdict.sentence}")
    if result.failure:
        lines.append(f"\n**Failed**: {result.failure[:500]} (nothing registered; `--resume {run_id}` continues).")
    if registered is not None:
        lines.append(f"\nRegistered as `{registered.prompt_uri}` and `models:/{registered.model_name}/"
                     f"{registered.model_version}` (alias `{CANDIDATE_ALIAS}`).")
    lines += ["\nFinal prompt:\n", blockquote(result.final_prompt), "\nInitial prompt:\n", blockquote(result.initial_prompt)]
    note = "\n".join(lines)
    if len(note) > NOTE_LIMIT:  # MLflow refuses longer tag values; the prompts are whole in prompts/
        note = note[: NOTE_LIMIT - 80] + "\n\n… (cut here: the whole prompts are in `prompts/`)"
    mlflow.set_tag(NOTE, note)


def blockquote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines() or [""])


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row[key] for row in rows] for key in rows[0]}
