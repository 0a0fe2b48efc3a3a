"""Runs the authors' DistillPrompt implementation (the `coolprompt` package, PromptTuner with
method "distill") on the same data and endpoint as `distillprompt optimize`, for the optional
column of scoring_throughput.py. It needs its own environment: coolprompt requires Python
3.12 and LangChain, none of which this project installs.

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/coolprompt-venv
    /tmp/coolprompt-venv/bin/pip install coolprompt==2.1.1
    python benchmarks/scoring_throughput.py --reference "/tmp/coolprompt-venv/bin/python benchmarks/reference_distillprompt.py"

Its train and validation data are the first --train-size rows of the train split (it splits
them itself, 25% for validation); its evaluator scores in batches of --concurrency requests
(LangChain's batch). Only the wall time and the endpoint's count of requests are compared.
coolprompt loads its F1 metric with Hugging Face ``evaluate.load("f1")``, which fetches a
script from the hub (unreachable here): this runner writes a local ``f1`` metric module of
its own (scikit-learn's macro F1) in a temporary folder and runs from there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


F1_MODULE = '''
import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="macro F1 (scikit-learn)", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro"):
        return {"f1": float(f1_score(references, predictions, labels=labels, average=average, zero_division=0))}
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", type=Path, required=True, help="a folder with train.jsonl (text, label)")
    parser.add_argument("--rounds", "--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=20)
    parser.add_argument("--concurrency", default="32")
    args = parser.parse_args()

    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="reference-"))
    (folder / "f1").mkdir()
    (folder / "f1" / "f1.py").write_text(F1_MODULE)
    dataset = args.dataset.resolve()
    os.chdir(folder)  # evaluate.load("f1") finds ./f1/f1.py first
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from coolprompt.assistant import PromptTuner
    from langchain_openai import ChatOpenAI

    rows = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[: args.train_size]
    names = {0: "negative", 1: "positive"}
    texts = [row["text"] for row in rows]
    labels = [names.get(row["label"], str(row["label"])) for row in rows]
    model = ChatOpenAI(base_url=args.base_url, model=args.model, api_key="not-needed", max_retries=8, temperature=0.0)
    tuner = PromptTuner(target_model=model)
    batch = 32 if args.concurrency == "auto" else int(args.concurrency)
    prompt = tuner.run(
        start_prompt="Read the text and answer with the label that fits it best: negative, positive.",
        task="classification",
        dataset=texts,
        target=labels,
        method="distill",
        problem_description="Sentiment classification of movie reviews: negative or positive.",
        batch_size=batch,
        num_epochs=args.rounds,
        enable_telemetry=False,
        verbose=0,
    )
    print(json.dumps({"final_prompt": prompt}))


if __name__ == "__main__":
    main()
