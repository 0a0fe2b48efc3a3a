"""Score against cost, per candidate: ``candidates.csv`` and ``pareto.png``.

Every scored candidate gets its prompt's length in tokens (estimated at 4 characters a
token, as in ``llm.text_tokens``: no tokenizer for an arbitrary endpoint's model is
available offline) and what scoring it costs per example (its scoring request's input
tokens, the prompt and an average train example, and the answer's output tokens, at
``--price-input`` / ``--price-output``), next to its train and validation scores. The Pareto
front is the candidates that no other beats on both score and length.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from . import templates
from .data import Task
from .engine import RunResult
from .llm import text_tokens


def candidate_rows(result: RunResult, task: Task, price_input: float, price_output: float) -> list[dict[str, Any]]:
    """One row per distinct scored candidate, in creation order."""
    examples = task.train or task.test
    # a scoring request's tokens besides the prompt: the task's frame and an average example
    frame = [sum(text_tokens(str(m.get("content") or "")) for m in templates.task_messages(task, "", e)) for e in examples]
    rest = sum(frame) / len(frame) if frame else 0.0
    answer = sum(text_tokens(t) for t in task.labels) / len(task.labels) if task.labels else (
        sum(text_tokens(e.target) for e in examples) / len(examples) if examples else 1.0)
    full = len(task.train)
    rows = []
    for candidate in result.history:
        if candidate.duplicate_of is not None or candidate.score is None:
            continue
        tokens = text_tokens(candidate.prompt)
        rows.append({
            "id": candidate.id,
            "round": candidate.round,
            "stage": candidate.stage,
            "prompt_tokens": tokens,
            "cost_per_example_usd": round(((tokens + rest) * price_input + answer * price_output) / 1_000_000, 9),
            "train_score": round(candidate.score, 6),
            "val_score": None if candidate.val_score is None else round(candidate.val_score, 6),
            "examples_scored": candidate.examples_scored if candidate.examples_scored is not None else full,
            "stopped_by_race": candidate.eliminated_by is not None,
            "final": candidate.id == result.final.id,
            "prompt": candidate.prompt,
        })
    front = pareto_front(rows)
    for row in rows:
        row["on_front"] = row["id"] in front
    return rows


def pareto_front(rows: list[dict[str, Any]]) -> set[int]:
    """Ids of the fully scored candidates that no other beats on train score and length
    (higher or equal score with fewer tokens, or higher score with as few)."""
    scored = [r for r in rows if not r["stopped_by_race"]]
    front = set()
    for row in scored:
        beaten = any(
            other["train_score"] >= row["train_score"] and other["prompt_tokens"] <= row["prompt_tokens"]
            and (other["train_score"] > row["train_score"] or other["prompt_tokens"] < row["prompt_tokens"])
            for other in scored
        )
        if not beaten:
            front.add(row["id"])
    return front


def shortest_near_best(rows: list[dict[str, Any]], examples: int) -> dict[str, Any] | None:
    """The shortest prompt on the front whose train score is within one example's worth
    (1/examples) of the best."""
    front = [r for r in rows if r["on_front"]]
    if not front:
        return None
    best = max(r["train_score"] for r in front)
    near = [r for r in front if r["train_score"] >= best - 1.0 / max(1, examples) - 1e-9]
    return min(near, key=lambda r: (r["prompt_tokens"], r["id"]))


def summary(rows: list[dict[str, Any]], examples: int) -> str | None:
    """One sentence for the run's end: the shortest near-best prompt, against the final one."""
    short = shortest_near_best(rows, examples)
    final = next((r for r in rows if r["final"]), None)
    if short is None or final is None:
        return None
    if short["id"] == final["id"]:
        return (f"the final prompt (candidate {final['id']}, {final['prompt_tokens']} tokens) is also the shortest "
                f"on the score/length front within one train example of the best")
    return (f"candidate {short['id']} ({short['prompt_tokens']} tokens, train {short['train_score']:.4f}) is the "
            f"shortest on the score/length front within one train example of the best; the final prompt has "
            f"{final['prompt_tokens']} tokens (train {final['train_score']:.4f}); --prefer-shorter picks such prompts")


def write(rows: list[dict[str, Any]], folder: Path, title: str = "") -> list[Path]:
    """``candidates.csv`` and ``pareto.png`` in ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "candidates.csv"
    columns = ["id", "round", "stage", "prompt_tokens", "cost_per_example_usd", "train_score", "val_score",
               "examples_scored", "stopped_by_race", "on_front", "final", "prompt"]
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [table, plot(rows, folder / "pareto.png", title)]


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train score against prompt tokens: every candidate, the front joined and marked, the
    final prompt ringed. Matplotlib's object API, not pyplot: safe off the main thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    full = [r for r in rows if not r["stopped_by_race"]]
    raced = [r for r in rows if r["stopped_by_race"]]
    if raced:
        axis.scatter([r["prompt_tokens"] for r in raced], [r["train_score"] for r in raced], s=14, marker="x",
                     color="#bbbbbb", label="stopped by the race (partial score)")
    axis.scatter([r["prompt_tokens"] for r in full], [r["train_score"] for r in full], s=22, color="#7f9fbf",
                 label="scored in full")
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["prompt_tokens"])
    if front:
        axis.step([r["prompt_tokens"] for r in front], [r["train_score"] for r in front], where="post",
                  color="#d95f02", linewidth=1.2)
        axis.scatter([r["prompt_tokens"] for r in front], [r["train_score"] for r in front], s=40,
                     color="#d95f02", label="Pareto front", zorder=3)
    for row in rows:
        if row["final"]:
            axis.scatter([row["prompt_tokens"]], [row["train_score"]], s=180, facecolors="none",
                         edgecolors="black", linewidths=1.8, label=f"final prompt (candidate {row['id']})", zorder=4)
        if row["stage"] == "initial":
            axis.annotate("initial prompt" + (" = final" if row["final"] else ""),
                          (row["prompt_tokens"], row["train_score"]), textcoords="offset points", xytext=(25, -25),
                          fontsize=8, arrowprops={"arrowstyle": "-", "color": "#555555", "linewidth": 0.8})
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("prompt length (tokens, about 4 characters each)")
    axis.set_ylabel("train score")
    axis.set_title(title or "score against prompt length, every candidate")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best", framealpha=0.9)
    figure.tight_layout()
    figure.savefig(path)
    return path
