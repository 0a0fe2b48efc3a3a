"""MLflow adapter of distillprompt: tracking callback, prompt and model registry, MLproject entry points."""


def __getattr__(name: str):
    # imported on first use: mlflow.genai is heavy, and the CLI's plugins do not need it
    if name == "DistillPromptOptimizer":
        from .genai import DistillPromptOptimizer

        return DistillPromptOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DistillPromptOptimizer"]
