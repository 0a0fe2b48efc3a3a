"""DistillPrompt inside mlflow.genai.optimize_prompts, on the embedded model: no API key.

The "app" is a review classifier that fills a registered prompt and asks a model; here
that model is the bundled SmolLM2-135M on a llama.cpp server the script starts. The
optimizer writes its candidates with the embedded model too (no base_url configured).
Run: MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/mlflow_optimize_prompts.py
"""

import json
from pathlib import Path

import mlflow
import openai
from mlflow.genai.scorers import scorer

from distillprompt.local_llm import LocalServer, bundled_model
from mlflow_project import DistillPromptOptimizer

# the app's model: the embedded server (any OpenAI-compatible endpoint works the same way)
app_server = LocalServer(bundled_model()).start()
app_server.wait_ready()
client = openai.OpenAI(base_url=app_server.base_url, api_key="unused")

prompt = mlflow.genai.register_prompt(
    name="review-sentiment",
    template="Is this product review positive or negative? Answer with one word.\n\nReview: {{review}}",
)


def predict_fn(review: str) -> str:
    text = mlflow.genai.load_prompt(prompt.uri).format(review=review)
    reply = client.chat.completions.create(
        model=bundled_model().alias, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=8
    )
    return reply.choices[0].message.content or ""


@scorer
def accuracy(outputs: str, expectations: dict) -> float:
    """1 when the answer names the expected label."""
    return float(expectations["expected_response"] in outputs.lower())


demo = Path(__file__).resolve().parent.parent / "distillprompt" / "demo" / "train.jsonl"
rows = [json.loads(line) for line in demo.read_text().splitlines()][:8]
train_data = [{"inputs": {"review": row["text"]}, "outputs": row["label"]} for row in rows]

try:
    result = mlflow.genai.optimize_prompts(
        predict_fn=predict_fn,
        train_data=train_data,
        prompt_uris=[prompt.uri],
        optimizer=DistillPromptOptimizer(rounds=2, rewrites=2, paraphrases=2, seed=0),
        scorers=[accuracy],
    )
finally:
    app_server.stop()

best = result.optimized_prompts[0]
print(f"score {result.initial_eval_score:.3f} -> {result.final_eval_score:.3f}; registered {best.name} version {best.version}")
print(best.template)
