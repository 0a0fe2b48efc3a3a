"""The MLproject file, written from the settings tree.

    python -m mlflow_project.mlproject     # writes MLproject again (python -m tests.test_docs does too)

Every setting is a parameter of the entry points that take settings, named like its flag
with underscores, with an empty default: MLflow passes it on as an empty flag, which
``python -m mlflow_project`` leaves out, so a parameter nobody gave leaves the setting to
the config file, the environment and the package default (``distillprompt/settings.py``).
A test fails while the file differs from what this module writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillprompt.settings import setting_specs

MLPROJECT = Path(__file__).resolve().parent.parent / "MLproject"

HEADER = """\
name: distillprompt

# Written by `python -m mlflow_project.mlproject` from the settings tree
# (distillprompt/settings.py); change the settings, not this file (a test compares them).
#
# `mlflow run .` builds a virtualenv from python_env.yaml; `--env-manager local` uses the
# current environment instead (pip install -e . first). Every setting is a parameter named
# like its flag with underscores (docs/settings.md). A parameter left empty (the default)
# is not passed on, as a flag not typed: the setting comes from the environment, a config
# file (-P config=FILE) or the package default. The API key is read from OPENAI_API_KEY,
# never a parameter; a URL with credentials belongs in OPENAI_BASE_URL or the config file,
# since MLflow records parameters as given.
python_env: python_env.yaml

entry_points:"""

OPTIONAL = '{type: string, default: ""}'
CONFIG = {"config": (OPTIONAL, "TOML, YAML or JSON file with settings")}


@dataclass(frozen=True)
class ProjectEntry:
    """One entry point of the MLproject: the CLI command it runs, its own parameters (name ->
    YAML spec and a comment), whether every setting is a parameter of it too, and the entry
    point whose block it repeats by reference, if any."""

    name: str
    command: str
    own: dict[str, tuple[str, str]]
    settings: bool
    comment: str = ""
    same_as: str | None = None

    def parameters(self) -> dict[str, tuple[str, str]]:
        found = dict(self.own)
        if self.settings:
            found.update(setting_parameters())
        return found

    def lines(self) -> list[str]:
        lines = ["", *(f"  # {line}" for line in self.comment.splitlines())]
        if self.same_as:
            return [*lines, f"  {self.name}: *{self.same_as}"]
        parameters = self.parameters()
        lines.append(f"  {self.name}:" + (f" &{self.name}" if self.name == ANCHOR else ""))
        lines.append("    parameters:")
        for name, (spec, note) in parameters.items():
            lines.append(f"      {name}: {spec}" + (f"  # {note}" if note else ""))
        lines.append("    command: >-")
        lines.append(f"      python -m mlflow_project {self.command}")
        lines += [f"      --{name} {{{name}}}" for name in parameters]
        return lines


def setting_parameters() -> dict[str, tuple[str, str]]:
    """Every setting but the secrets, by its flag's name, and by its former name too."""
    found: dict[str, tuple[str, str]] = {}
    for spec in setting_specs():
        if spec.secret:
            continue
        name = spec.flag.removeprefix("--").replace("-", "_")
        found[name] = (OPTIONAL, "")
        if spec.former_flag:
            found[spec.former_flag.removeprefix("--").replace("-", "_")] = (OPTIONAL, f"the former name of {name}")
    return found


ANCHOR = "main"  # the block `optimize` repeats by reference
ENTRY_POINTS = [
    ProjectEntry(
        "main", "optimize",
        {**CONFIG, "resume_run_id": (OPTIONAL, "the MLflow run to continue: the same as resume")},
        settings=True,
        comment="The demo: with no dataset and no base_url it runs the bundled review task on the\n"
        "embedded SmolLM2-135M model, sized (for every size no parameter, file or variable sets)\n"
        "to finish within minutes on 2 cores. Otherwise the same as optimize.",
    ),
    ProjectEntry("optimize", "optimize", {}, settings=True, same_as=ANCHOR),
    ProjectEntry(
        "evaluate", "evaluate", {"prompt": ("{type: string}", "the prompt text, or prompts:/NAME@alias"), **CONFIG},
        settings=True, comment="Scores one prompt on the test sample.",
    ),
    ProjectEntry(
        "promote", "promote",
        {"prompt_name": ("{type: string}", ""), "version": ("{type: float}", ""),
         "force": (OPTIONAL, "true: promote even if it scores below the current holder")},
        settings=False, comment="Moves the production alias to a prompt version that scores at least as well.",
    ),
    ProjectEntry(
        "compare", "compare",
        {"methods": (OPTIONAL, "comma list (default: distillprompt,grips,fewshot,initial)"),
         "seeds": (OPTIONAL, "seeds per method (default: 3)"),
         "budget_match": (OPTIONAL, "true: every method gets DistillPrompt's scoring requests"),
         **CONFIG},
        settings=True,
        comment="Every method with every seed under one parent run; with no dataset and no base_url it\n"
        "compares on the demo task with the embedded model.",
    ),
]


def mlproject_text() -> str:
    lines = [HEADER]
    for entry in ENTRY_POINTS:
        lines += entry.lines()
    return "\n".join(lines) + "\n"


def write() -> Path:
    MLPROJECT.write_text(mlproject_text(), encoding="utf-8")
    return MLPROJECT


if __name__ == "__main__":
    print(f"wrote {write()}")
