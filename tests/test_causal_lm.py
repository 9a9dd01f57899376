"""``geolora finetune --task causal-lm`` and ``geolora generate`` on a tiny config-built Llama."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llama import FACTS, save_tiny_llama, tiny_tokenizer

from geolora.app import cli
from geolora.app.causal_lm import encode_chats, load_chat_task, prompt_ids
from geolora.app.evaluation import answer_labels, first_label, generate_answers
from geolora.app.jobs import inject_adapters
from geolora.app.options import FinetuneOptions
from geolora.app.tables import DataError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def facts_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = [{"prompt": p, "response": r} for _ in range(10) for p, r in FACTS.items()]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def _sft_args(model_dir, dataset, out, *extra):
    return [
        "finetune", "--task", "causal-lm",
        "--model", str(model_dir), "--dataset", str(dataset),
        "--epochs", "4", "--batch-size", "8", "--r", "2", "--r-max", "8", "--lr", "0.03",
        "--output-dir", str(out), "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(llama_dir, facts_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert cli.main(_sft_args(llama_dir, facts_jsonl, out, "--save-merged")) == 0
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_sft_learns_the_answers_and_writes_adapter_peft_and_merged(sft_run, llama_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from geolora.io import load_adapter

    metrics = json.loads((sft_run / "metrics.json").read_text())
    # 40 examples, 8 held out (every held-out prompt also occurs in training).
    assert (metrics["train_examples"], metrics["eval_examples"], metrics["steps"]) == (32, 8, 16)
    assert metrics["exact_match"] == 1.0 and metrics["accuracy"] == 1.0
    assert metrics["peak_lr"] == 0.03  # the lr the run used (--lr 0.03)
    assert metrics["base_rule"] == "riemannian_adam_rows"  # causal-lm's default rule
    assert metrics["label_names"] == sorted(FACTS.values())
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())
    assert metrics["perplexity"] < 2.0
    assert metrics["adapters"] == 14  # q, k, v, o, gate, up, down in each of 2 layers
    base = LlamaForCausalLM.from_pretrained(llama_dir)
    tokenizer = tiny_tokenizer()
    prompts = [[{"role": "user", "content": p}] for p in FACTS]
    zero_shot = generate_answers(base, tokenizer, prompts, max_new_tokens=3)
    assert zero_shot != list(FACTS.values())  # the training made the difference
    ids = torch.tensor([prompt_ids(tokenizer, prompts[0])])
    geo = load_adapter(LlamaForCausalLM.from_pretrained(llama_dir), sft_run / "adapter")
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(llama_dir), str(sft_run / "peft_adapter")
    )
    merged = LlamaForCausalLM.from_pretrained(sft_run / "merged")
    torch.testing.assert_close(_logits(peft_model, ids), _logits(geo, ids))
    torch.testing.assert_close(_logits(merged, ids), _logits(geo, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_logits(base, ids), _logits(geo, ids))


def test_generate_command_answers_prompts(sft_run, tmp_path, capsys):
    prompts = list(FACTS)[:2]
    argv = ["generate", str(sft_run), "--prompt", prompts[0], "--prompt", prompts[1]]
    assert cli.main([*argv, "-o", str(tmp_path / "answers.jsonl")]) == 0
    assert capsys.readouterr().out.split() == [FACTS[p] for p in prompts]
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "response": FACTS[p]} for p in prompts]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(FACTS) + "\n")
    assert cli.main(["generate", str(sft_run / "adapter"), "--prompts", str(file)]) == 0
    assert capsys.readouterr().out.split() == list(FACTS.values())
    assert cli.main(["generate", str(sft_run)]) == 2
    assert "No prompts" in capsys.readouterr().err


def test_export_command_rebuilds_the_causal_lm(sft_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "peft"
    assert cli.main(["export", str(sft_run), "-o", str(out)]) == 0
    mine = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(sft_run / "peft_adapter" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key])


def test_encoding_trains_only_the_answer_tokens():
    tokenizer = tiny_tokenizer()
    chat = [
        {"role": "user", "content": "what colour is the sky ?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and the grass ?"},
        {"role": "assistant", "content": "green ."},
    ]
    encoded = encode_chats(tokenizer, [chat], max_length=64)
    ids, labels = encoded.input_ids[0], encoded.labels[0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    trained = [t for t, label in zip(tokens, labels) if label != -100]
    assert trained == ["blue", "<|end|>", "green", ".", "<|end|>"]
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    first_prompt = prompt_ids(tokenizer, chat[:1])
    assert ids[: len(first_prompt)] == first_prompt and first_prompt[-1] == 5  # <|assistant|>
    # Without a chat template: prompt + "\n" + answer + EOS, the answer and EOS trained.
    plain = encode_chats(tokenizer, [chat[:2]], max_length=64, chat_template=False)
    assert tokenizer.convert_ids_to_tokens(plain.input_ids[0]) == [
        *("what", "colour", "is", "the", "sky", "?", "blue", "<|end|>")
    ]
    assert plain.labels[0] == [-100] * 6 + plain.input_ids[0][6:]
    with pytest.raises(DataError, match="Multi-turn messages need a tokenizer with a chat"):
        encode_chats(tokenizer, [chat], max_length=64, chat_template=False)
    # Cut at max_length: an example whose answer starts after the cut is dropped.
    night = [
        {"role": "user", "content": "what colour is the sky at night ?"},
        {"role": "assistant", "content": "black"},
    ]
    cut = encode_chats(tokenizer, [chat[:2], night], max_length=10)
    assert len(cut) == 1 and cut.dropped == 1 and len(cut.input_ids[0]) == 10
    with pytest.raises(DataError, match="raise --max-length"):
        encode_chats(tokenizer, [chat[:2]], max_length=5)


def test_chat_files_messages_column_csv_and_bad_messages(tmp_path):
    chat = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": chat}) for _ in range(5)))
    task = load_chat_task(str(path), eval_fraction=0.2)
    assert (len(task.train), len(task.eval)) == (4, 1) and task.eval[0] == chat
    csv = tmp_path / "pairs.csv"
    csv.write_text("question,answer\nsay hello,hello\nwhat is the sky ?,blue\n")
    task = load_chat_task(str(csv), "question", "answer", eval_fraction=0.5)
    assert sorted(c[-1]["content"] for c in task.train + task.eval) == ["blue", "hello"]
    with pytest.raises(DataError, match="no column 'prompt'.*--prompt-column"):
        load_chat_task(str(csv))
    path.write_text(json.dumps({"messages": chat[:1]}) + "\n" + json.dumps({"messages": chat}))
    with pytest.raises(DataError, match="last message must be the assistant's"):
        load_chat_task(str(path))


def test_label_answers_are_scored_by_the_first_label_named():
    chats = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": a}] for a in "ab"]
    assert answer_labels(chats, chats[:1]) == ["a", "b"]
    open_ended = [[{"role": "assistant", "content": str(i)}] for i in range(30)]
    assert answer_labels(open_ended, open_ended[:1]) is None
    labels = ["negative", "positive"]
    assert first_label("It is Positive, not negative.", labels) == "positive"
    assert first_label("nonpositive", labels) is None


def test_targets_all_linear_and_targets_matching_nothing(llama_dir, facts_jsonl, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    parsed = cli.build_parser().parse_args(["finetune", "--target-modules", "all-linear"])
    assert parsed.target_modules == "all-linear"
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    options = FinetuneOptions(task="causal-lm", adapter={"target_modules": "all-linear", "r": 2})
    inject_adapters(model, options)
    adapted = {name for name, m in model.named_modules() if hasattr(m, "base_layer")}
    assert len(adapted) == 14 and "lm_head" not in adapted
    argv = _sft_args(llama_dir, facts_jsonl, tmp_path / "o", "--target-modules", "query,value")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "['query', 'value'] match no module" in err
    assert "linear layers are named ['down_proj', 'gate_proj', 'k_proj'" in err


def test_python_example_runs_on_a_tiny_llama(llama_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "llm_sft.py"
    spec = importlib.util.spec_from_file_location("llm_sft_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--model", str(llama_dir), "--examples", "10", "--epochs", "1"]
    metrics = example.main([*argv, "--output-dir", str(tmp_path / "run")])
    assert metrics["train_examples"] == 8 and metrics["task"] == "causal-lm"
    assert "What is 31 + 48? Answer with the number only. ->" in capsys.readouterr().out
