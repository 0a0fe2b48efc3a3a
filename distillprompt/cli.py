"""``distillprompt optimize`` and ``distillprompt evaluate``.

Every setting of the settings tree is a flag (named like the field, with dashes); flags
the user did not type leave the environment and the config file in charge.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import logging
import re
import sys
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .data import count_text
from .errors import EndpointUnavailable, UserError
from .progress import ConsoleProgress
from .settings import ENV_PREFIX, Settings, load_settings, setting_specs
from .urls import mask_log_lines, masked

GROUP_TITLES = {
    "llm": "endpoint and models",
    "data": "task and data",
    "optimizer": "method",
    "cache": "response cache",
    "mlflow": "MLflow tracking and registry",
    None: "run",
}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes end in one line that names the fix, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for spec in setting_specs():
        group = groups.get(spec.group)
        if group is None:
            group = groups[spec.group] = parser.add_argument_group(GROUP_TITLES.get(spec.group, spec.group))
        info = spec.info
        annotation = info.annotation
        help_text = info.description or spec.name.replace("_", " ")
        default = info.get_default(call_default_factory=True)
        if default is not None and default != [] and not hasattr(default, "get_secret_value"):
            shown = ",".join(default) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        help_text += f" [env {spec.env}]"
        kwargs: dict[str, Any] = {"dest": "setting:" + ".".join(spec.path), "help": help_text, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            if choices:
                kwargs["choices"] = choices
            kwargs["metavar"] = spec.name.upper() if not choices else None
        group.add_argument(spec.flag, *([spec.former_flag] if spec.former_flag else []), **kwargs)


COMMAND_PLUGINS = "distillprompt.commands"
CALLBACK_PLUGINS = "distillprompt.callbacks"
PROMPT_SOURCES = "distillprompt.prompt_sources"
# the exit status of a run that finished but left a record unfinished (tracking lost): not a
# failed optimization (1) or a mistake to fix (2); the warning names the command that finishes it
INCOMPLETE = 3


def command_plugins() -> dict[str, Any]:
    """Subcommands that adapters add (``submit`` from ray_jobs …), by entry point."""
    return {entry.name: entry.load()() for entry in entry_points(group=COMMAND_PLUGINS)}


def callback_plugins(settings: Settings) -> list[Any]:
    """Callbacks that adapters add to a run (MLflow tracking …); each decides from the
    settings whether it takes part."""
    found = []
    for entry in entry_points(group=CALLBACK_PLUGINS):
        callback = entry.load()(settings)
        if callback is not None:
            found.append(callback)
    return found


def resolve_prompt(text: str) -> str:
    """A prompt given as a URI (``prompts:/NAME@alias``) is fetched by the plugin of its scheme."""
    scheme = re.match(r"^([a-z][a-z0-9+.-]*):/", text)
    if scheme:
        for entry in entry_points(group=PROMPT_SOURCES):
            if entry.name == scheme.group(1):
                return entry.load()(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="distillprompt",
        description="Optimize an LLM prompt with the DistillPrompt method against any OpenAI-compatible endpoint.",
        epilog=f"Settings come from flags, then {ENV_PREFIX}<GROUP>__<NAME> variables, then --config, then "
        "OPENAI_API_KEY/OPENAI_BASE_URL, then defaults. Exit codes: 0 finished; 1 the endpoint gave up "
        "beyond every retry; 2 a setting, the data or a service to fix (the line names it); 3 finished with "
        "result.json, but the MLflow record is incomplete (the warning names the command that completes it); "
        "130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    optimize = commands.add_parser("optimize", help="find a better prompt for a task", description="Run DistillPrompt.")
    evaluate = commands.add_parser(
        "evaluate", help="score one prompt on the test sample", description="Score one prompt on the test sample."
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text to score")
    source.add_argument("--prompt-file", type=Path, help="a file holding the prompt to score")
    plugins = command_plugins()
    with_settings = [optimize, evaluate]
    for name, plugin in plugins.items():
        command = commands.add_parser(name, help=plugin.help, description=plugin.help)
        plugin.configure(command)
        if getattr(plugin, "takes_settings", True):
            with_settings.append(command)
    for command in with_settings:
        command.add_argument("--config", type=Path, help="TOML or YAML file with settings (tables llm, data, optimizer, cache)")
        command.add_argument("--quiet", action="store_true", help="no progress display, only the summary")
        _add_setting_flags(command)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("setting:"):
            continue
        *groups, name = key.removeprefix("setting:").split(".")
        target = overrides
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = value
    return load_settings(overrides, args.config)


def _format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items()) or "not scored"


def _print_result(result: Any, folder: Path, settings: Settings) -> None:
    usage = result.usage
    lines = [
        "",
        "initial prompt:",
        f"  {result.initial_prompt}",
        f"  train: {_format_scores(result.initial_scores['train'])}",
        *_val_line(result.initial_scores),
        f"  test:  {_format_scores(result.initial_scores['test'])}",
        f"final prompt (candidate {result.final.id}, {result.final.stage}, round {result.final.round}):",
        f"  {result.final_prompt}",
        f"  train: {_format_scores(result.final_scores['train'])}",
        *_val_line(result.final_scores),
        f"  test:  {_format_scores(result.final_scores['test'])}",
        f"stopped by: {result.stop_reason}; {len(result.history)} candidates, wall time {result.wall_time:.1f}s",
        f"LLM requests: {usage.requests} sent, {usage.cache_hits} from cache, {usage.retries} retried; "
        f"tokens {usage.input_tokens} in, {usage.output_tokens} out"
        + (f" ({usage.reasoning_tokens} of them reasoning)" if usage.reasoning_tokens else "")
        + f"; cost ${usage.cost:.4f}" + _budget(result, settings.optimizer.max_cost),
        f"result: {folder / 'result.json'}",
    ]
    dropped = {stage: reasons for stage, reasons in result.rejections.items() if sum(reasons.values())}
    if dropped:
        lines.insert(-1, "dropped meta-replies: " + ", ".join(
            f"{stage} {sum(reasons.values())} ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))})"
            for stage, reasons in dropped.items()
        ))
    if result.refused:
        lines.insert(-1, refused_line(result.refused))
    race = result.race
    if race.get("scoring") == "race" and race.get("full_requests"):
        lines.insert(-1, f"racing: {race['stopped']} of {race['candidates']} candidates stopped early; train scoring "
                         f"{race['requests']} of {race['full_requests']} requests ({race['saved_fraction']:.0%} saved)")
    estimate = result.records.estimate
    if estimate:
        lines.insert(-1, f"estimated before the run: {estimate['estimated_requests']} requests"
                         + (f" (at most {estimate['estimated_requests_max']})" if estimate["scoring"] == "race" else "")
                         + (f", ${estimate['estimated_cost_usd']:.4f}" if usage.cost or estimate["estimated_cost_usd"] else ""))
    summary = (result.records.pareto or {}).get("summary")
    if summary:
        lines.insert(-1, f"score against length: {summary} (pareto.png, candidates.csv)")
    lines[-1:-1] = _data_lines(result.task)
    if result.diagnosis:
        lines.append(result.diagnosis)
    if result.verdict is not None:
        lines.append(result.verdict.sentence)
    print("\n".join(lines))


def refused_line(refused: list[dict[str, Any]]) -> str:
    """The examples the endpoint refused a scoring request for, in one line: by sample and by
    reason, and the requests that scored as wrong answers."""
    samples: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for entry in refused:
        samples[entry["sample"]] = samples.get(entry["sample"], 0) + 1
        for reason in entry["reasons"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    requests = sum(entry["requests"] for entry in refused)
    return (f"refused by the endpoint: {len(refused)} examples ({', '.join(f'{s} {n}' for s, n in samples.items())}; "
            f"{', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))}), {requests} scoring requests counted as "
            "wrong answers (refused in result.json)")


def _budget(result: Any, budget: float | None) -> str:
    """With --max-cost: what every call cost (the cache's included, as the budget counts them)
    against the budget."""
    if not budget:
        return ""
    return f" (every call, the cache's included: ${result.usage.all_cost:.4f} of the --max-cost budget ${budget:g})"


def _data_lines(task: dict[str, Any]) -> list[str]:
    """What the data checks changed: rows dropped per split and labels merged or renamed."""
    dropped = {split: counts for split, counts in (task.get("rows_dropped") or {}).items() if sum(counts.values())}
    lines = []
    if dropped:
        parts = [f"{split} {sum(counts.values())} ({count_text(counts)})" for split, counts in dropped.items()]
        lines.append("rows dropped: " + "; ".join(parts))
    return lines + list(task.get("label_changes") or [])


def _val_line(scores: dict[str, dict[str, float]]) -> list[str]:
    value = (scores.get("val") or {}).get("score")
    return [] if value is None else [f"  validation: score {value:.4f}"]


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        prompt = args.prompt
    else:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read --prompt-file {args.prompt_file} ({error.__class__.__name__}): check the path") from None
    if not prompt.strip():
        raise UserError("the prompt to evaluate is empty: pass a non-empty --prompt or --prompt-file")
    return prompt.strip()


def _run(args: argparse.Namespace) -> int:
    if args.command not in ("optimize", "evaluate"):
        plugin = command_plugins()[args.command]
        settings = settings_from_args(args) if getattr(plugin, "takes_settings", True) else None
        return plugin.run(args, settings)
    given = settings_from_args(args)
    progress = None if args.quiet else ConsoleProgress()
    if args.command == "optimize":
        return _optimize(given, progress)
    return _evaluate(resolve_prompt(_read_prompt(args)), given, progress)


def _optimize(given: Settings, progress: ConsoleProgress | None) -> int:
    from . import runner
    from .cost import require_prices
    from .resolution import recorded_run, resolve

    require_prices(given)
    if given.dry_run:
        return _dry_run(resolve(given))
    plan = resolve(given, recorded_run(given) if given.resume else None)
    callbacks = callback_plugins(plan.settings)
    result, folder = asyncio.run(runner.optimize(plan, progress=progress, callbacks=callbacks))
    _print_result(result, folder, plan.settings)
    unfinished = _warn_unfinished(callbacks)
    if result.failure:
        print(
            f"distillprompt: error: the endpoint gave up ({result.failure}); the best prompt of the finished rounds "
            f"is in {folder / 'result.json'}; rerun the same command later to continue from the cache",
            file=sys.stderr,
        )
        return 1
    return INCOMPLETE if unfinished else 0


def _dry_run(plan: Any) -> int:
    from . import runner

    estimate = asyncio.run(runner.dry_run(plan))
    if estimate is not None and os.environ.get("MLFLOW_RUN_ID"):
        # inside `mlflow run` the run exists already: it holds the estimate (params estimated_*)
        for callback in callback_plugins(plan.settings):
            callback.on_estimate(estimate)
            callback.on_end(True)
    print(estimate.text() if estimate is not None else
          f"no estimate for {plan.settings.optimizer.method}: MLflow's optimizers choose their own calls "
          "(--max-scoring-calls bounds their scoring)")
    print("dry run: no completion request was sent")
    return 0


def _evaluate(prompt: str, given: Settings, progress: ConsoleProgress | None) -> int:
    from . import runner
    from .resolution import resolve

    plan = resolve(given)
    callbacks = callback_plugins(plan.settings)
    try:
        score, task, usage = asyncio.run(runner.evaluate(plan, prompt, progress=progress))
        for callback in callbacks:
            getattr(callback, "on_evaluation", lambda *a: None)(task, prompt, score, usage)
    except BaseException:
        for callback in callbacks:
            callback.on_end(False)
        raise
    for callback in callbacks:
        callback.on_end(True)
    print(f"\nprompt: {prompt}")
    print(f"test ({len(task.test)} examples of {task.name}): {_format_scores(score.summary())}")
    if score.refused_count:
        print(f"refused by the endpoint: {score.refused_count} of {len(task.test)} examples, counted as wrong answers")
    print(f"LLM requests: {usage['requests']} sent, {usage['cache_hits']} from cache")
    return INCOMPLETE if _warn_unfinished(callbacks) else 0


def _warn_unfinished(callbacks: list[Any]) -> bool:
    """Prints what the callbacks could not finish (a tracking server that went away) and the
    command that finishes it; whether there was any (exit code 3)."""
    unfinished = [text for text in (getattr(c, "incomplete", lambda: None)() for c in callbacks) if text]
    for text in unfinished:
        print(f"distillprompt: warning: {masked(text)}", file=sys.stderr)
    return bool(unfinished)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mask_log_lines()
    for noisy in ("httpx", "httpx2", "openai", "datasets", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as error:
        print(f"distillprompt: error: {masked(str(error))}", file=sys.stderr)
        return error.exit_code
    except EndpointUnavailable as error:
        print(f"distillprompt: error: the endpoint gave up: {masked(str(error))}; try again later or lower --concurrency",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distillprompt: interrupted; replies received so far are in the response cache", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The console script: ``main``, then the exit handlers (they flush MLflow's trace queue
    and stop Ray, among others) and a quick exit that skips the interpreter's own teardown:
    0.4 s of a run's end, 0.6 s with Ray loaded (docs/decisions.md)."""
    code = 1  # an error that escapes main (a bug) exits as Python's would

    def quick_exit() -> None:
        logging.shutdown()  # the one handler registered before this one (importing logging does)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # registered before anything main() imports registers its own, so it runs after them all
    atexit.register(quick_exit)
    try:
        code = main()
    except SystemExit as stop:  # argparse's --help and usage errors
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    sys.exit(code)


if __name__ == "__main__":
    entry()
