"""The documentation matches the code: the settings reference lists every setting as the
code defines it, every relative link resolves, and no example needs a file outside a clone.

    python -m tests.test_docs     # writes the settings reference (and the MLproject) again from the code
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from distillprompt.settings import setting_specs

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_PAGE = ROOT / "docs" / "settings.md"
BEGIN, END = "<!-- settings table: written by python -m tests.test_docs -->", "<!-- end of settings table -->"
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
GROUP_TITLES = {"llm": "Endpoint and models", "data": "Task and data", "optimizer": "Method", "cache": "Response cache",
                "mlflow": "MLflow tracking and registry", None: "Run"}


def settings_table() -> str:
    """Every setting, by group: its flag (and former flag), variable, default, meaning, and
    whether a --resume takes it given again or keeps the run's."""
    lines: list[str] = []
    group: object = object()
    for spec in setting_specs():
        if spec.group != group:
            group = spec.group
            lines += ["", f"### {GROUP_TITLES[spec.group]}", "", "| flag | variable | default | what it sets | `--resume` |",
                      "|---|---|---|---|---|"]
        default = spec.info.get_default(call_default_factory=True)
        shown = "" if default is None or spec.secret else ",".join(default) if isinstance(default, list) else str(default)
        flags = f"`{spec.flag}`" + (f" (`{spec.former_flag}`)" if spec.former_flag else "")
        text = (spec.info.description or spec.name.replace("_", " ")).replace("|", "\\|")
        on_resume = "given" if spec.operational else "recorded"
        lines.append(f"| {flags} | `{spec.env}` | {f'`{shown}`' if shown else ''} | {text} | {on_resume} |")
    return "\n".join(lines).strip("\n")


def written_table() -> str:
    text = SETTINGS_PAGE.read_text(encoding="utf-8")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def test_the_settings_reference_lists_every_setting_as_the_code_defines_it():
    assert written_table() == settings_table(), "run `python -m tests.test_docs` to write docs/settings.md again"


def anchors(page: Path) -> Iterator[str]:
    """The anchors GitHub gives a Markdown page's headings: lower case, punctuation but hyphens
    and underscores dropped, spaces made hyphens, a repeated heading numbered."""
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)  # code
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_every_relative_link_of_the_docs_resolves_to_a_file_and_a_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in set(anchors(path))):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_user_example_needs_a_file_outside_a_clone():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in page.read_text(encoding="utf-8"), page.name


def test_the_readme_shows_a_newcomer_everything_in_its_first_80_lines():
    first = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:80])
    for needed in ("pip install", "mlflow run . --env-manager local", "bash tests/run.sh", "--base-url",
                   "--text-column", "--label-column", ".csv"):
        assert needed in first, needed


if __name__ == "__main__":
    text = SETTINGS_PAGE.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    SETTINGS_PAGE.write_text(f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}", encoding="utf-8")
    print(f"wrote {SETTINGS_PAGE}")
    from mlflow_project.mlproject import write

    print(f"wrote {write()}")
