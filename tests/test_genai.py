"""DistillPrompt inside ``mlflow.genai.optimize_prompts``, against a real ``mlflow server``:
the app's own ``predict_fn`` calls the scripted endpoint as its model, a scorer function
grades it, and ``DistillPromptOptimizer`` writes candidates with an optimizer model on the
same endpoint (answering the way a capable model does: structured prompts)."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from typing import Any

import pytest
from packaging.version import Version

from tests.conftest import review_rows
from tests.endpoint import HELPFUL, ScriptedEndpoint, fraction, true_label

RULES = [
    "- Judge the overall tone and attitude of the writer, not the plot.",
    "- Weigh the opinion and emotion the words express.",
    "- Decide the polarity of the feeling as a whole.",
    "- Read every sentence before you decide.",
]


class AppModel:
    """Meta-prompts get structured prompts that keep the placeholders the meta-prompt names,
    except the paraphrase reply of sample 1, which drops them, and every fourth distillation
    (the 2nd, 6th …: one in a run of four or more), which invents ``{{rating}}``. The app's requests get a label that is right more often
    when the instruction has more of the words that help."""

    def __init__(self) -> None:
        self.distills = 0

    def __call__(self, request: dict[str, Any], kind: str, stage: str) -> str | None:
        content = "\n".join(str(m.get("content", "")) for m in request.get("messages", []))
        if kind == "meta":
            return self.meta(content, stage, request.get("_sample", 0))
        if kind == "other":
            return self.answer(content)
        return None

    def meta(self, content: str, stage: str, sample: int) -> str:
        names = list(dict.fromkeys(re.findall(r"\{\{\s*(\w+)\s*\}\}", content.split("Instruction")[0])))
        depth = {"rewrite": 1, "distill": 2, "compress": 2, "aggregate": 3, "paraphrase": 3}.get(stage, 1)
        lines = ["You label customer reviews for a shop.", "", "## How to decide", *RULES[: depth + sample % 2]]
        if stage == "paraphrase" and sample == 1:
            names = []  # forgets the placeholders
        if stage == "distill":
            self.distills += 1
            if self.distills % 4 == 2:
                names = [*names, "rating"]  # invents one
        if names:
            lines += ["", *[f"{name.capitalize()}: {{{{{name}}}}}" for name in names]]
        lines += ["", "Output format: one word, positive or negative."]
        return "Here is the improved instruction:\n<START>" + "\n".join(lines) + "<END>"

    def answer(self, content: str) -> str:
        review = content.rsplit("Review:", 1)[-1].split("\n\n")[0]
        instruction = content.replace(review, "")
        helpful = sum(word in instruction.lower() for word in HELPFUL)
        right = true_label(review, ["negative", "positive"])
        if fraction("app", instruction, review) < min(0.95, 0.4 + 0.12 * helpful):
            return right
        return "negative" if right == "positive" else "positive"


@pytest.fixture(scope="module")
def app_endpoint():
    with ScriptedEndpoint(responder=AppModel(), models=["app-model", "opt-model"]) as server:
        yield server


def train_records(count: int = 12) -> list[dict[str, Any]]:
    return [
        {"inputs": {"review": row["text"], "product": f"item {i}"}, "outputs": row["label"]}
        for i, row in enumerate(review_rows(count, seed=31))
    ]


def optimize_app(server_uri: str, endpoint: ScriptedEndpoint, template: Any, name: str, experiment: str,
                 cache_path, **settings: Any):
    """What the README shows an MLflow user doing, against the test server and endpoint."""
    import mlflow
    import openai
    from mlflow.genai.scorers import scorer

    from mlflow_project import DistillPromptOptimizer

    mlflow.set_tracking_uri(server_uri)
    mlflow.set_experiment(experiment)
    prompt = mlflow.genai.register_prompt(name=name, template=template)
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="unused")

    def predict_fn(review: str, product: str) -> str:
        filled = mlflow.genai.load_prompt(prompt.uri).format(review=review, product=product)
        messages = filled if isinstance(filled, list) else [{"role": "user", "content": filled}]
        reply = client.chat.completions.create(model="app-model", messages=messages, temperature=0)
        return reply.choices[0].message.content

    @scorer
    def accuracy(outputs: str, expectations: dict) -> float:
        return float(outputs.strip().lower() == expectations["expected_response"])

    optimizer = DistillPromptOptimizer(
        **{"base_url": endpoint.base_url, "model": "opt-model", "epochs": 2, "seed": 0, "cache_path": str(cache_path),
           **settings}
    )
    result = mlflow.genai.optimize_prompts(
        predict_fn=predict_fn, train_data=train_records(), prompt_uris=[prompt.uri], optimizer=optimizer,
        scorers=[accuracy],
    )
    (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["start_time DESC"])[:1]
    return result, optimizer, run


# the placeholder comes first, so the whole template is the candidate and must keep it
TEXT_TEMPLATE = "Review: {{review}}\n\nSay if this review is positive or negative."
SPLIT_TEMPLATE = "Say if this review is positive or negative.\n\nReview: {{review}}"


def test_a_text_prompt_gets_a_better_registered_version_linked_to_the_run(mlflow_server, app_endpoint, tmp_path):
    from mlflow import MlflowClient

    result, optimizer, run = optimize_app(mlflow_server["uri"], app_endpoint, TEXT_TEMPLATE, "app-text", "genai-text",
                                          tmp_path / "cache.sqlite")
    (version,) = result.optimized_prompts
    assert version.name == "app-text" and version.version == 2
    assert version.template != TEXT_TEMPLATE and "{{review}}" in version.template
    assert result.optimizer_name == "DistillPromptOptimizer"
    assert result.final_eval_score > result.initial_eval_score  # the structured rules help the app's model
    linked = json.loads(run.data.tags["mlflow.linkedPrompts"])
    assert {"name": "app-text", "version": "2"} in linked
    client = MlflowClient(mlflow_server["uri"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "best_train_score")] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "distill_mean_score")
    assert run.data.metrics["final_eval_score"] == result.final_eval_score
    assert run.data.params["distillprompt.rounds"] == "2"
    # the reply that forgot {{review}} and the one that invented {{rating}} never became candidates
    history = optimizer.results["app-text"]
    dropped = {reason: n for reasons in history.rejections.values() for reason, n in reasons.items()}
    assert dropped.get("variable_dropped", 0) >= 1 and dropped.get("variable_invented", 0) >= 1, history.rejections
    assert all(re.findall(r"\{\{\s*(\w+)\s*\}\}", c.prompt) == ["review"] for c in history.history)
    # raced: eval_fn scored the 12 records a block of 5 at a time (5, 5, 2), a stopped candidate on fewer
    assert history.race["scoring"] == "race" and history.race["block"] == 5
    assert {c.examples_scored for c in history.history if c.duplicate_of is None} <= {5, 10, 12}
    # distillation saw what the app answered and its score, next to the expected answer
    distills = [e.content for e in app_endpoint.requests(kind="meta", stage="distill")]
    assert distills and all("The model's answer:" in text and "Its score:" in text for text in distills)


def test_a_rerun_with_the_same_seed_asks_the_optimizer_model_nothing(mlflow_server, app_endpoint, tmp_path):
    first, optimizer, _ = optimize_app(mlflow_server["uri"], app_endpoint, TEXT_TEMPLATE, "app-rerun", "genai-rerun",
                                       tmp_path / "cache.sqlite")
    meta_sent = len(app_endpoint.requests(kind="meta"))
    second, again, _ = optimize_app(mlflow_server["uri"], app_endpoint, TEXT_TEMPLATE, "app-rerun", "genai-rerun",
                                    tmp_path / "cache.sqlite")
    assert len(app_endpoint.requests(kind="meta")) == meta_sent
    assert [c.prompt for c in again.results["app-rerun"].history] == [c.prompt for c in optimizer.results["app-rerun"].history]
    assert second.optimized_prompts[0].template == first.optimized_prompts[0].template
    # the app registered its template again (version 3), the optimizer's result is version 4
    assert (first.optimized_prompts[0].version, second.optimized_prompts[0].version) == (2, 4)


# optimize_prompts takes chat prompts from MLflow 3.16 on; before, MLflow itself refuses one
# ("Only text prompts can be optimized") before any optimizer sees it (docs/mlflow.md)
chat_prompts = pytest.mark.skipif(Version(version("mlflow")) < Version("3.16"),
                                  reason="MLflow before 3.16 optimizes text prompts only")


@chat_prompts
def test_a_chat_prompt_keeps_its_variables_and_changes_only_its_instruction(mlflow_server, app_endpoint, tmp_path):
    chat = [
        {"role": "system", "content": "Say if the review is positive or negative."},
        {"role": "user", "content": "Product: {{product}}\nReview: {{review}}"},
    ]
    result, optimizer, run = optimize_app(mlflow_server["uri"], app_endpoint, chat, "app-chat", "genai-chat",
                                          tmp_path / "cache.sqlite", rewrites=2)
    (version,) = result.optimized_prompts
    template = version.template
    assert isinstance(template, list) and [m["role"] for m in template] == ["system", "user"]
    assert template[1] == chat[1]  # the user message, with both variables, as written
    assert template[0]["content"] != chat[0]["content"] and "{{" not in template[0]["content"]
    assert result.final_eval_score >= result.initial_eval_score
    dropped = {r: n for reasons in optimizer.results["app-chat"].rejections.values() for r, n in reasons.items()}
    assert dropped.get("variable_invented", 0) >= 1  # the system message has no placeholder: one invented is refused


@chat_prompts
def test_a_chat_prompt_is_optimized_message_by_message(mlflow_server, app_endpoint, tmp_path):
    from mlflow import MlflowClient

    chat = [
        {"role": "system", "content": "You help a shop sort its customer reviews."},
        {"role": "user", "content": "Say if the review is positive or negative.\n\nProduct: {{product}}\nReview: {{review}}"},
        {"role": "assistant", "content": "Understood."},
    ]
    result, optimizer, run = optimize_app(mlflow_server["uri"], app_endpoint, chat, "app-chat2", "genai-chat2",
                                          tmp_path / "cache.sqlite", rewrites=2, epochs=1)
    template = result.optimized_prompts[0].template
    assert [m["role"] for m in template] == ["system", "user", "assistant"]
    assert template[0]["content"] != chat[0]["content"]  # both instruction messages rewritten
    assert template[2] == chat[2]  # not an instruction
    system, user = optimizer.results["app-chat2:0"], optimizer.results["app-chat2:1"]
    assert system.initial.prompt == chat[0]["content"] and template[0]["content"] == system.final.prompt
    # the user message's instruction part had a run of its own, with the new system message in place;
    # its inputs part stayed as written
    assert user.initial.prompt == "Say if the review is positive or negative."
    assert user.initial.score == system.final.score
    assert [c for c in user.history if c.stage == "rewrite"] and all("{{" not in c.prompt for c in user.history)
    assert template[1]["content"] == user.final.prompt.rstrip() + "\n\nProduct: {{product}}\nReview: {{review}}"
    client = MlflowClient(mlflow_server["uri"])
    for message in ("message0", "message1"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{message}.best_train_score")] == [1]


def test_instruction_messages_leave_inputs_and_few_shot_pairs_as_written():
    from mlflow_project.genai import PromptTarget

    chat = [
        {"role": "system", "content": "You sort reviews."},
        {"role": "user", "content": "Great phone, love it."},  # a few-shot example: answered below
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Review: {{review}}"},  # inputs only
        {"role": "user", "content": "Answer with one word.\n\nProduct: {{product}}"},  # instruction + inputs
        {"role": "user", "content": "Think before you answer."},  # an instruction of its own
    ]
    assert PromptTarget.instruction_positions("p", json.dumps(chat)) == [0, 4, 5]


def test_an_inputs_part_at_the_end_stays_as_written(mlflow_server, app_endpoint, tmp_path):
    result, optimizer, _ = optimize_app(mlflow_server["uri"], app_endpoint, SPLIT_TEMPLATE, "app-split", "genai-split",
                                        tmp_path / "cache.sqlite", rewrites=2)
    template = result.optimized_prompts[0].template
    assert template.endswith("\n\nReview: {{review}}") and template.count("{{") == 1
    assert template != SPLIT_TEMPLATE
    run = optimizer.results["app-split"]
    assert run.initial.prompt == "Say if this review is positive or negative."  # only the instruction was rewritten
    assert all("{{" not in c.prompt for c in run.history)
    dropped = {r: n for reasons in run.rejections.values() for r, n in reasons.items()}
    assert "variable_dropped" not in dropped and dropped.get("variable_invented", 0) >= 1


def test_unknown_settings_and_missing_scorers_fail_with_the_fix(mlflow_server, app_endpoint, tmp_path):
    from distillprompt.errors import UserError
    from mlflow_project import DistillPromptOptimizer

    with pytest.raises(UserError, match="unknown setting 'epoch'"):
        DistillPromptOptimizer(epoch=2)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        DistillPromptOptimizer(api_key="sk-in-code")
    optimizer = DistillPromptOptimizer(base_url=app_endpoint.base_url, model="opt-model", cache_path=str(tmp_path / "c"))
    with pytest.raises(UserError, match="train_data and scorers"):
        optimizer.optimize(None, [], {"p": "Classify {{review}}"}, enable_tracking=False)


def test_an_optimizer_endpoint_that_serves_only_the_optimizer_model(mlflow_server, app_endpoint, tmp_path):
    """In optimize_prompts the app's predict_fn is the target: only the optimizer model is
    checked on its endpoint, and ``model`` is never needed (a vLLM serving one model)."""
    import mlflow
    import openai
    from mlflow.genai.scorers import scorer

    from mlflow_project import DistillPromptOptimizer

    mlflow.set_tracking_uri(mlflow_server["uri"])
    mlflow.set_experiment("genai-one-model")
    prompt = mlflow.genai.register_prompt(name="app-one-model", template=TEXT_TEMPLATE)
    client = openai.OpenAI(base_url=app_endpoint.base_url, api_key="unused")

    def predict_fn(review: str, product: str) -> str:
        filled = mlflow.genai.load_prompt(prompt.uri).format(review=review, product=product)
        reply = client.chat.completions.create(model="app-model", messages=[{"role": "user", "content": filled}])
        return reply.choices[0].message.content

    @scorer
    def accuracy(outputs: str, expectations: dict) -> float:
        return float(outputs.strip().lower() == expectations["expected_response"])

    with ScriptedEndpoint(responder=AppModel(), models=["my-model"]) as only_mine:
        optimizer = DistillPromptOptimizer(optimizer_model="my-model", base_url=only_mine.base_url, rounds=1, rewrites=2,
                                           cache_path=str(tmp_path / "cache.sqlite"))
        result = mlflow.genai.optimize_prompts(
            predict_fn=predict_fn, train_data=train_records(), prompt_uris=[prompt.uri], optimizer=optimizer,
            scorers=[accuracy],
        )
        asked = {e.body_hash for e in only_mine.requests(kind="meta")}
    assert result.optimized_prompts[0].version == 2 and asked  # it ran, its meta-prompts on that endpoint
