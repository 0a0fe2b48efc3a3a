"""MLflow adapter of distillprompt: tracking callback, prompt and model registry, MLproject entry points."""
