"""The ``geolora`` command end to end on a tiny config-built BERT saved to disk (no download)."""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file

from geolora import GeoLoRAOptimizer
from geolora.app import cli
from geolora.app.finetune import finetune

FMC_DEFAULT = inspect.signature(GeoLoRAOptimizer).parameters["first_moment_correction"].default
"""GeoLoRAOptimizer's own default, which the CLI must take over."""

WORDS = [
    *("the", "a", "movie", "film", "was", "is", "very", "not", "plot"),
    *("good", "great", "fun", "bad", "awful", "boring"),
]
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "awful", "boring"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny BertForSequenceClassification and a word-level BertTokenizerFast, saved."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(root / "model")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    """32 short reviews whose label (pos/neg) is set by the sentiment word."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    lines = ["text,label"]
    for i in range(32):
        good = i % 2 == 0
        word = (POSITIVE if good else NEGATIVE)[i % 3]
        noun = ["movie", "film"][i % 2]
        lines.append(f"the {noun} was {'very ' * (i % 3)}{word},{'pos' if good else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(model_dir, dataset, out, *extra):
    return [
        "finetune",
        "--model", str(model_dir),
        "--dataset", str(dataset),
        "--epochs", "2",
        "--batch-size", "8",
        "--max-length", "16",
        "--r", "2",
        "--r-max", "8",
        "--lr", "0.01",
        "--output-dir", str(out),
        "--quiet",
        *extra,
    ]  # fmt: skip


def _tensors(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tiny_csv, tmp_path_factory):
    """One uninterrupted run, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(_args(tiny_model_dir, tiny_csv, out)) == 0
    return out


def test_finetune_writes_adapters_metrics_and_report(run_dir, tiny_model_dir, capsys):
    for name in ["metrics.json", "rank_report.json", "rank_heatmap.png", "rank_history.json"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "rank_history.png").is_file()
    assert not (run_dir / "checkpoint").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 32 examples, 20% held out: 26 train -> 4 batches of 8 per epoch, 2 epochs.
    assert (metrics["train_examples"], metrics["eval_examples"], metrics["steps"]) == (26, 6, 8)
    assert metrics["label_names"] == ["neg", "pos"]
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["first_moment_correction"] is FMC_DEFAULT  # the optimizer's default, as used
    history = json.loads((run_dir / "rank_history.json").read_text())
    assert history["steps"] == list(range(9))
    # The peft export computes what the GeoLoRA adapter computes.
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from geolora.io import load_adapter

    ids = torch.tensor([[2, 5, 7, 9, 13, 3]])
    geo = load_adapter(
        BertForSequenceClassification.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tiny_model_dir), str(run_dir / "peft_adapter")
    ).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, geo(input_ids=ids).logits)
    assert torch.any(
        geo(input_ids=ids).logits
        != BertForSequenceClassification.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    )


def test_report_and_export_commands(run_dir, tiny_model_dir, tmp_path, capsys):
    assert cli.main(["report", str(run_dir)]) == 0
    table = capsys.readouterr().out
    ranks = json.loads((run_dir / "rank_report.json").read_text())["ranks"]
    assert "bert.encoder.layer.1.attention.self.query" in table
    total_row = next(line for line in table.splitlines() if line.startswith("total"))
    assert total_row.split()[1] == str(sum(ranks.values()))
    assert cli.main(["report", str(run_dir / "adapter"), "--plots", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "rank_heatmap.png").is_file()
    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    mine, theirs = _tensors(out), _tensors(run_dir / "peft_adapter")
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key])


def test_config_file_flag_precedence_and_sentence_pairs(tiny_model_dir, tmp_path):
    """A JSONL dataset of sentence pairs with integer labels; the config file names the columns
    and sets r, lr and epochs; the --lr flag wins over the file."""
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "first": f"the movie was {w}",
            "second": f"it is {v}",
            "y": int((w in POSITIVE) == (v in POSITIVE)),
        }
        for w in POSITIVE + NEGATIVE
        for v in POSITIVE + NEGATIVE
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    config = tmp_path / "run.yaml"
    config.write_text(
        "r: 3\nlr: 0.02\nepochs: 1\ntarget_modules: [query, value]\n"
        f"first_moment_correction: {'no' if FMC_DEFAULT else 'yes'}\n"  # not the default
        "text_column: first\ntext-pair-column: second\nlabel_column: y\n"
    )
    out = tmp_path / "cfg"
    args = _args(tiny_model_dir, data, out, "--config", str(config))
    args[args.index("--epochs") : args.index("--epochs") + 2] = []  # epochs from the file
    args[args.index("--r") : args.index("--r") + 2] = []  # r from the file
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    options = metrics["options"]
    assert (options["adapter"]["r"], options["epochs"], options["lr"]) == (3, 1, 0.01)
    assert options["adapter"]["target_modules"] == ["query", "value"]
    assert options["text_pair_column"] == "second"
    assert metrics["first_moment_correction"] is not FMC_DEFAULT  # the file's value was used
    assert metrics["label_names"] == ["0", "1"] and metrics["train_examples"] == 29
    assert len(json.loads((out / "rank_report.json").read_text())["ranks"]) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--r", "x"], "invalid int value"),
        (["finetune", "--truncation", "sideways"], "invalid choice"),
        (["finetune", "--lr", "fast"], "invalid float value"),
        (["finetune", "--no-such-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("geolora: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", "", "is empty"),
        ("ragged.csv", "text,label\ngood movie,pos\nbad,film,neg\n", "line 3"),
        (
            "broken.jsonl",
            '{"text": "good", "label": 1}\n{"text": "bad", \n',
            "line 2 is not valid JSON",
        ),
        ("one_class.csv", "text,label\ngood,pos\ngreat,pos\n", "single label"),
    ],
)
def test_bad_dataset_files(name, content, expected, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    err = _error(_args(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert name in err and expected in err


def test_unknown_label_column(tiny_model_dir, tiny_csv, tmp_path, capsys):
    argv = _args(tiny_model_dir, tiny_csv, tmp_path / "out", "--label-column", "sentiment")
    err = _error(argv, capsys)
    assert "'sentiment'" in err and "['text', 'label']" in err and "--label-column" in err


def test_missing_model_path_and_unreachable_hub(tiny_csv, tmp_path, capsys):
    err = _error(_args(tmp_path / "no-model", tiny_csv, tmp_path / "out"), capsys)
    assert "no-model does not exist" in err
    err = _error(_args("nobody/no-such-model", tiny_csv, tmp_path / "out"), capsys)
    assert "Could not load model 'nobody/no-such-model'" in err


def test_invalid_rank_settings_and_config_keys(tiny_model_dir, tiny_csv, tmp_path, capsys):
    err = _error(_args(tiny_model_dir, tiny_csv, tmp_path / "o", "--r", "9"), capsys)
    assert "r=9 is larger than r_max=8" in err
    err = _error(_args(tiny_model_dir, tiny_csv, tmp_path / "o", "--r", "0"), capsys)
    assert "r must be a positive integer" in err
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    err = _error(_args(tiny_model_dir, tiny_csv, tmp_path / "o", "--config", str(config)), capsys)
    assert "bad.yaml" in err and "unknown key 'learning_rate'" in err
    config.write_text("r: [1, 2\n")
    err = _error(_args(tiny_model_dir, tiny_csv, tmp_path / "o", "--config", str(config)), capsys)
    assert "bad.yaml is not valid YAML/JSON" in err


def test_interrupt_then_resume_matches_uninterrupted(
    run_dir, tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys
):
    """Ctrl-C (a real SIGINT) at step 3 writes a checkpoint; --resume ends where the
    uninterrupted run ended, bit for bit."""

    def interrupt_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cli, "finetune", functools.partial(finetune, on_step=interrupt_at_3))
    assert cli.main(_args(tiny_model_dir, tiny_csv, out)) == 130
    assert "Interrupted at step 3/8" in capsys.readouterr().err
    assert (out / "checkpoint" / "state.pt").is_file() and not (out / "metrics.json").exists()
    err = _error(["finetune", "--resume", "--output-dir", str(out), "--lr", "0.5"], capsys)
    assert "differ: ['lr']" in err
    monkeypatch.setattr(cli, "finetune", finetune)
    assert cli.main(["finetune", "--resume", "--output-dir", str(out), "--quiet"]) == 0
    for part in ["adapter", "peft_adapter"]:
        resumed, full = _tensors(out / part), _tensors(run_dir / part)
        assert resumed.keys() == full.keys()
        for key in full:
            assert torch.equal(resumed[key], full[key]), key
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (out, run_dir)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
    assert metrics[0]["eval_loss"] == metrics[1]["eval_loss"]
    history = json.loads((out / "rank_history.json").read_text())
    assert history == json.loads((run_dir / "rank_history.json").read_text())
    err = _error(["finetune", "--resume", "--output-dir", str(tmp_path / "none")], capsys)
    assert "Nothing to resume" in err


def test_hub_dataset_without_datasets_package_or_hub(tiny_model_dir, tmp_path, capsys):
    err = _error(_args(tiny_model_dir, "glue/sst2", tmp_path / "out"), capsys)
    assert "'glue/sst2'" in err
    assert "pip install datasets" in err or "Could not load the Hugging Face dataset" in err


def test_head_of_another_size_is_replaced_with_a_note(tiny_csv, tmp_path, capsys):
    """A saved 3-class classifier fine-tuned on 2-label data gets a new 2-output head."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    model_dir = tmp_path / "three-class"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(model_dir)
    BertForSequenceClassification(tiny_bert_config(num_labels=3)).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cli.main(_args(model_dir, tiny_csv, out, "--epochs", "1")) == 0
    assert "has 3 outputs and the data 2 labels" in capsys.readouterr().err
    assert _tensors(out / "adapter")["classifier.weight"].shape[0] == 2


def test_config_threads_and_quiet_and_resume_keeps_threads(
    tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys
):
    """``threads`` and ``quiet`` are config-file keys; --resume keeps the run's thread count."""
    config = tmp_path / "run.yaml"
    config.write_text("threads: 2\nquiet: true\n")
    out = tmp_path / "threads"

    def interrupt_at_1(step: int) -> None:
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        monkeypatch.setattr(cli, "finetune", functools.partial(finetune, on_step=interrupt_at_1))
        argv = _args(tiny_model_dir, tiny_csv, out, "--config", str(config), "--epochs", "1")
        argv.remove("--quiet")
        assert cli.main(argv) == 130
        torch.set_num_threads(1)
        monkeypatch.setattr(cli, "finetune", finetune)
        assert cli.main(["finetune", "--resume", "--output-dir", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["threads"] == 2 and metrics["options"]["quiet"] is True
        assert "finetune:" not in capsys.readouterr().err  # no progress bar
    finally:
        torch.set_num_threads(1)


def test_report_into_a_closed_pipe_exits_quietly(run_dir, capsys):
    """``geolora report RUN | head -1``: the reader leaves early; no error, status 0."""
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe, previous = os.fdopen(write_end, "w", buffering=1), sys.stdout
    try:
        sys.stdout = pipe
        assert cli.main(["report", str(run_dir)]) == 0
    finally:
        sys.stdout = previous
        pipe.close()  # fd now points at /dev/null: closing it cannot fail
    assert capsys.readouterr().err == ""


def test_two_row_single_label_file_names_the_label_it_has(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "two.csv"
    path.write_text("text,label\ngood movie,1\nbad film,1\n")
    err = _error(_args(tiny_model_dir, path, tmp_path / "out"), capsys)
    assert "single label value ['1']" in err


def test_every_option_is_a_flag_a_config_key_and_documented():
    """One declaration per option: GeoLoRAConfig's fields and FinetuneOptions' fields give the
    flags and config keys; docs/cli.md lists every flag."""
    import dataclasses
    from pathlib import Path

    from geolora import GeoLoRAConfig
    from geolora.app.options import FinetuneOptions, option_specs

    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    specs = {spec.name: spec for spec in option_specs()}
    adapter = {f.name for f in dataclasses.fields(GeoLoRAConfig)} - {"metadata"}
    run = {f.name for f in dataclasses.fields(FinetuneOptions)} - {"adapter"}
    assert set(specs) == adapter | run
    for spec in specs.values():
        flag = spec.command_line_flag
        assert f"`{flag}" in docs or f", `{flag}`" in docs, flag
        assert spec.help, spec.name
    assert specs["tau"].default == GeoLoRAConfig.tau  # no second default for the same option
    assert specs["first_moment_correction"].default is FMC_DEFAULT  # likewise
    tasks = ("classification", "causal-lm")
    defaults = {task: FinetuneOptions(task=task).peak_lr for task in tasks}
    assert defaults == {"classification": 1e-3, "causal-lm": 3e-4}  # the task picks the default
    assert FinetuneOptions(task="causal-lm", lr=0.01).peak_lr == 0.01
    rules = {task: FinetuneOptions(task=task).task_base_rule for task in tasks}
    assert rules == {"classification": None, "causal-lm": "riemannian_adam_rows"}
    assert FinetuneOptions(task="causal-lm", base_rule="sgd").task_base_rule == "sgd"
    with pytest.raises(ValueError, match=r"--base-rule: base_rule must be one of .*'sgd'"):
        FinetuneOptions(base_rule="lion")  # checked against the base rules' registry
    options = FinetuneOptions.from_dict({"r-max": 16, "lr": 0.01, "threads": 1, "quiet": True})
    assert options.adapter == {"r_max": 16} and options.adapter_config("all-linear").r_max == 16


def test_switches_that_are_on_by_default_turn_off_and_say_so(capsys):
    """A switch whose default is on is offered as ``--no-…``: it turns the option off, and its
    help says that the option is on by default (not the option's own description alone, which
    would read as if the flag turned it on)."""
    from geolora.app.options import option_specs

    on = [spec for spec in option_specs() if spec.switched_on]
    assert {spec.name for spec in on} >= {"chat_template", "first_moment_correction"}
    parser = cli.build_parser()
    defaults, _ = cli._finetune_options(parser.parse_args(["finetune"]))
    for spec in on:
        assert spec.command_line_flag == "--no-" + spec.name.replace("_", "-")
        options, _ = cli._finetune_options(parser.parse_args(["finetune", spec.command_line_flag]))
        assert getattr(options, spec.name) is False and getattr(defaults, spec.name) is True
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for spec in on:
        assert f"{spec.command_line_flag} turns off (on by default): " in shown, spec.name
