"""Labels as the model will see them: checked, merged where they differ only in spelling,
renamed with ``--label-names``, and the rows dropped for empty ones counted."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace

from ..errors import UserError
from ..settings import DataSettings

from .task import Example

log = logging.getLogger(__name__)

MAX_CLASSES = 50


def count_text(dropped: dict[str, int]) -> str:
    """``{'empty_label': 4, 'empty_input': 1}`` as "4 empty label, 1 empty input"."""
    parts = [f"{count} {reason.replace('_', ' ')}" for reason, count in dropped.items() if count]
    return ", ".join(parts) or "none"


NUMERIC_LABEL = re.compile(r"-?\d+")
OPAQUE_LABEL = re.compile(r"(?i)label[_ ]?\d+")  # what hub models and exports call unnamed classes


def checked_labels(
    settings: DataSettings, label_names: list[str] | None, pools: dict[str, list[Example]], train_split: str, name: str
) -> tuple[list[str], dict[str, list[Example]], list[str]]:
    """The task's labels and the pools with their targets rewritten, plus one report line per
    kind of change. Spellings that differ only in case or surrounding spaces are one label,
    written the way most rows write it (refused when two spellings are equally common);
    ``--label-names`` then renames labels; numeric or opaque labels left without names are
    refused, since the model would be asked to answer "0" or "1" with no idea what they mean."""
    if settings.task != "classification":
        return [], pools, []
    changes: list[str] = []
    mapping: dict[str, str] = {}
    if label_names is None:
        mapping, merged = _merge_spellings(pools, settings.label_column, name, _renamed_by_pairs(settings.label_names))
        if merged:
            changes.append(f"labels merged (they differ only in case or surrounding spaces): {merged}")
        labels = sorted({mapping.get(example.target, example.target) for example in pools[train_split]}, key=_label_order)
    else:
        labels = list(label_names)
    renames: dict[str, str] = {}
    if settings.label_names:
        renames = _renames(settings.label_names, labels, settings.label_column, name)
        shown = ", ".join(f"{old} → {new}" for old, new in renames.items() if old != new)
        if shown:
            changes.append(f"labels renamed by --label-names: {shown}")
        labels = list(dict.fromkeys(renames.get(label, label) for label in labels))  # pairs may join spellings
        if label_names is None:  # labels read from text stay sorted; a ClassLabel's keep its order
            labels.sort(key=_label_order)
        _check_case_twins(labels, settings.label_column, name)

    def final(target: str) -> str:
        merged = mapping.get(target, target)
        return renames.get(merged, merged)

    if mapping or renames:
        pools = {
            split: [e if final(e.target) == e.target else replace(e, target=final(e.target)) for e in pool]
            for split, pool in pools.items()
        }
    _check_label_set(settings, labels, bool(label_names) or bool(settings.label_names), name)
    return labels, pools, changes


def _label_order(label: str) -> tuple[int, int | str]:
    """Numbers by value (2 before 10), then text."""
    return (0, int(label)) if NUMERIC_LABEL.fullmatch(label) else (1, label)


def _renamed_by_pairs(given: list[str]) -> set[str]:
    """The labels that ``--label-names old=new`` pairs name (none for a plain list of names)."""
    return {item.split("=", 1)[0].strip() for item in given} if given and all("=" in i for i in given) else set()


def _merge_spellings(
    pools: dict[str, list[Example]], column: str, name: str, renamed: set[str] = frozenset()
) -> tuple[dict[str, str], str]:
    """Maps every spelling of a label to its most common form; returns the map and a report.
    Two spellings equally common are left to ``--label-names`` pairs when one names them, and
    refused otherwise."""
    spellings: Counter[str] = Counter(example.target for pool in pools.values() for example in pool)
    groups: dict[str, Counter[str]] = {}
    for spelling, count in spellings.items():
        groups.setdefault(spelling.strip().casefold(), Counter())[spelling.strip()] += count
    mapping: dict[str, str] = {}
    report = []
    for forms in groups.values():
        ranked = forms.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            if renamed & set(forms):
                for spelling in spellings:  # the pairs decide; only surrounding spaces go here
                    if spelling.strip() in forms and spelling != spelling.strip():
                        mapping[spelling] = spelling.strip()
                continue
            first, second = sorted(form for form, count in ranked if count == ranked[0][1])[:2]
            raise UserError(
                f"column {column!r} of {name} writes one label as {first!r} and {second!r} equally often "
                f"({ranked[0][1]} rows each), so neither spelling can be chosen: write the label one way in the data, "
                f"or say which to use, e.g. --label-names {first}={second}"
            )
        canonical = ranked[0][0]
        variants = sorted(s for s in spellings if s.strip().casefold() == canonical.casefold() and s != canonical)
        if variants:
            rows = sum(spellings[v] for v in variants)
            report.append(f"{', '.join(repr(v) for v in variants)} → {canonical!r} ({rows} rows)")
        for spelling in spellings:
            if spelling.strip().casefold() == canonical.casefold():
                mapping[spelling] = canonical
    return {k: v for k, v in mapping.items() if k != v}, "; ".join(report)


def _renames(given: list[str], labels: list[str], column: str, name: str) -> dict[str, str]:
    """``--label-names``: either one name per label, in the labels' order, or ``old=new`` pairs."""
    if all("=" in item for item in given):
        renames = dict(item.split("=", 1) for item in given)
        renames = {old.strip(): new.strip() for old, new in renames.items()}
        unknown = [old for old in renames if old not in labels]
        if unknown:
            raise UserError(
                f"--label-names renames {', '.join(map(repr, unknown))}, which column {column!r} of {name} does not hold: "
                f"its labels are {', '.join(labels)}"
            )
    elif any("=" in item for item in given):
        raise UserError("--label-names mixes old=new pairs and plain names: write all pairs, or one name per label in order")
    else:
        if len(given) != len(labels):
            raise UserError(
                f"--label-names gives {len(given)} names for the {len(labels)} labels of column {column!r} of {name} "
                f"({', '.join(labels)}): give one name per label, in that order"
            )
        renames = dict(zip(labels, given))
    names = [renames.get(label, label) for label in labels]
    pairs = all("=" in item for item in given)  # pairs may deliberately join two labels into one
    if any(not n for n in names) or (not pairs and len(set(names)) != len(names)):
        raise UserError(f"--label-names gives empty or repeated names ({', '.join(names)}): give each label its own name")
    return renames


def _check_case_twins(labels: list[str], column: str, name: str) -> None:
    """After renames, two labels that differ only in case would be two classes the model cannot tell apart."""
    seen: dict[str, str] = {}
    for label in labels:
        other = seen.setdefault(label.casefold(), label)
        if other != label:
            raise UserError(
                f"column {column!r} of {name} still has {other!r} and {label!r} as two labels after --label-names: "
                f"add the pair {other}={label} or {label}={other}"
            )


def _check_label_set(settings: DataSettings, labels: list[str], named: bool, name: str) -> None:
    column = settings.label_column
    if any(re.fullmatch(r"-?\d*\.\d+", label) for label in labels):
        raise UserError(
            f"column {column!r} of {name} holds fractional numbers ({', '.join(labels[:3])} …), not "
            "classes: use --task generation for numeric answers, or another --label-column"
        )
    if len(labels) < 2:
        raise UserError(
            f"column {column!r} of {name} has one label only ({labels[0] if labels else 'none'}): "
            "classification needs at least two; check --label-column or use --task generation"
        )
    if len(labels) > MAX_CLASSES:
        raise UserError(
            f"column {column!r} of {name} has {len(labels)} distinct values, too many for classification: "
            "use --task generation or another --label-column"
        )
    if not named and all(NUMERIC_LABEL.fullmatch(label) or OPAQUE_LABEL.fullmatch(label) for label in labels):
        example = "negative,positive" if len(labels) == 2 else ",".join(f"name{i + 1}" for i in range(len(labels)))
        raise UserError(
            f"column {column!r} of {name} holds labels without meaning ({', '.join(labels[:6])}), so a model cannot "
            f"tell which to answer: pass --label-names {example} (one name per label, in the order "
            f"{', '.join(labels[:6])}) or give the column a ClassLabel feature with names"
        )
