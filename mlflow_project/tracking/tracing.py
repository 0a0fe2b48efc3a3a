"""Per-request tracing (``--trace``): one MLflow trace per answered LLM request."""

from __future__ import annotations

from typing import Any

from distillprompt.llm import LLMCall


def trace_call(mlflow: Any, run: Any, call: LLMCall) -> None:
    """A span with the request's messages and model in, the reply's texts out, and its stage
    and tokens, linked to ``run`` (the key never travels with it)."""
    span = mlflow.start_span_no_context(
        name=f"llm.{call.stage or 'call'}",
        span_type="CHAT_MODEL",
        inputs={"messages": call.messages, "model": call.model},
        attributes={"stage": call.stage, "tokens_in": call.usage.input_tokens, "tokens_out": call.usage.output_tokens},
        tags={"mlflow.sourceRun": run.info.run_id},
        experiment_id=run.info.experiment_id,
        start_time_ns=int(call.started * 1e9),
    )
    span.set_outputs({"choices": call.texts})
    span.end(end_time_ns=int(call.ended * 1e9))
