"""The default base rule (issue 9): Riemannian Adam against its per-feature variants and
per-coordinate Adam on the real task.

all-MiniLM-L6-v2 with adapters on every linear map of all six encoder layers (not the top layer
alone), Rotten Tomatoes, 400 steps, seed 0, the library's other defaults (r = 8, r_max = 32,
τ = 0.1, growth margin 0.1, scale s = 1), each rule at the same learning rates. Reported: test
accuracy, final total rank and trainable parameters. One seed per cell: a first cut to choose the
default, sized to the shared 2-core CPU (each run is 10-15 min there); the seeds and peft
baselines are in the real-task benchmarks.
"""

from __future__ import annotations

from typing import Any

import common

NAME = "base_rule_choice"
SETUP = common.Setup(
    n_train=2000, n_val=400, n_test=800, max_length=40, batch_size=16, steps=400, top_layers=6
)
SMOKE = common.Setup(
    n_train=32, n_val=16, n_test=16, max_length=12, batch_size=8, steps=3, top_layers=6
)
GRID = (
    ("riemannian_adam", 3e-4),
    ("riemannian_adam", 1e-3),
    ("riemannian_adam", 3e-3),
    ("riemannian_adam_rows", 3e-4),
    ("riemannian_adam_rows", 1e-3),
    ("riemannian_adam_features", 3e-4),
    ("riemannian_adam_features", 1e-3),
    ("adam", 3e-4),
    ("adam", 1e-3),
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def options(parser) -> None:
        rules = list(dict.fromkeys(rule for rule, _ in GRID))
        parser.add_argument("--rules", nargs="+", choices=rules, default=rules, help="only these")
        parser.add_argument("--shrinkage", type=float, default=None, help="GeoLoRA's μ for all")

    args = common.parse_args(__doc__.splitlines()[0], argv, add_options=options)
    setup = SMOKE if args.smoke else SETUP
    rows, payload = [], {}
    for rule, lr in (cell for cell in GRID if cell[0] in args.rules):
        hyper = dict(lr=lr, base_rule=rule, lora_alpha=None)
        if args.shrinkage is not None:
            hyper["shrinkage"] = args.shrinkage
        res = common.run("geolora", hyper, setup, args.out)
        payload[f"{rule}@{lr:g}"] = res
        rows.append(
            f"| {rule} | {lr:g} | {100 * res['test_acc']:.2f} | {100 * res['val_acc']:.2f} | "
            f"{res['final_train_loss']:.3f} | {res['total_rank']} | {res['trainable_params']:,} |"
        )
    lines = [
        common.setup_note(setup),
        "",
        "| base rule | lr | test acc % | val acc % | final train loss | total rank | params |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    common.publish(NAME, "Default base rule", lines, payload, args)
    return payload


if __name__ == "__main__":
    main()
