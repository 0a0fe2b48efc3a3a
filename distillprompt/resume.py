"""The settings a resumed run (``--resume RUN_ID``) goes on with.

The run's recorded settings hold, so that it goes on as it started. A setting marked
``OPERATIONAL`` in the settings tree (the key, the endpoints' addresses, budgets, tracking,
output, concurrency, executor, cache…) changes how the run is carried out, not what it finds:
given again (a flag, a variable or the config file), it takes the place of the recorded value,
and the key, which is never recorded, comes from what was given. Any other setting given with
another value than the run's would change the run: the resume is refused, in one line that
names them all.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import UserError
from .runner import anchor_paths, with_demo_defaults
from .settings import Settings, SettingSpec, load_settings, setting_specs
from .urls import MASK


def resumed_settings(given: Settings, recorded: dict[str, Any]) -> Settings:
    """The settings of run ``given.resume`` from its recorded tree (``Settings.recorded_tree``)
    and the settings the resuming command was given."""
    tree = copy.deepcopy(recorded)
    # what was given, with the paths and the demo's dataset resolved as the run resolved its own
    resolved = anchor_paths(with_demo_defaults(given)).model_dump(mode="json")
    values = given.model_dump()  # a secret as its SecretStr
    changes, masked = [], []
    for spec in setting_specs():
        if _given(given, spec):
            if spec.operational:
                _put(tree, spec, _at(values, spec))
            elif _at(resolved, spec) != _at(tree, spec, None):
                changes.append(f"{spec.flag} {_shown(_at(resolved, spec))} (the run has {_shown(_at(tree, spec, None))})")
        elif spec.url and MASK in str(_at(tree, spec, None) or ""):
            masked.append(spec.flag)
    if changes:
        raise UserError(
            f"--resume {given.resume} goes on with the settings the run recorded, and these would change it: "
            f"{'; '.join(changes)}; leave them out (flag, variable or config key), or start a new run without --resume"
        )
    if masked:
        raise UserError(
            f"run {given.resume} recorded {' and '.join(masked)} with its credentials masked: give "
            f"{' and '.join(masked)} again (or OPENAI_BASE_URL / the config file) with --resume"
        )
    return load_settings(tree)


def _given(settings: Settings, spec: SettingSpec) -> bool:
    """Whether a flag, a variable or the config file set it."""
    holder = getattr(settings, spec.group) if spec.group else settings
    return spec.name in holder.model_fields_set


def _at(tree: dict[str, Any], spec: SettingSpec, *default: Any) -> Any:
    holder = tree.get(spec.group, {}) if spec.group else tree
    return holder.get(spec.name, *default) if default else holder[spec.name]


def _put(tree: dict[str, Any], spec: SettingSpec, value: Any) -> None:
    (tree.setdefault(spec.group, {}) if spec.group else tree)[spec.name] = value


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
