"""Train one of ``helpers.zoo``'s recipes on one process or several, and save it.

    .venv/bin/python tools/train.py digits_unet --out runs/digits_unet            # one process
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \\
        tools/train.py digits_unet --out runs/digits_unet                         # every GPU of a machine
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 \\
        tools/train.py digits_unet --steps 50 --out runs/digits_unet              # two CPU processes (gloo)

Each process trains on its own slice of every batch (``helpers.training.train``'s ``data_seed``),
so N processes at the recipe's batch size train as one process at N times that batch, and the
learning rate schedule counts optimizer steps. The main process saves the model
(``save_pretrained``) and ``summary.json`` (processes, distributed type, steps, seconds, loss).
Recipes that need others (the miniature Stable Diffusion needs the VAE and the tiny CLIP) load
them from the zoo's cache; the main process trains any that are missing first, alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from helpers import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(zoo.RECIPES))
    parser.add_argument("--out", type=Path, required=True, help="folder to save the trained model in")
    parser.add_argument("--steps", type=int, help="override the recipe's step budget")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size (per process)")
    args = parser.parse_args(argv)

    recipe = zoo.RECIPES[args.recipe]
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    recipe = dataclasses.replace(recipe, train_kwargs={**recipe.train_kwargs, **overrides})
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # torchrun on CPUs: MULTI_CPU over gloo
    if state.is_main_process:
        for name in recipe.requires:
            zoo.load(name, progress=False)
    state.wait_for_everyone()  # the others then load what they need from the cache

    model, result = zoo.TRAINERS[recipe.kind](recipe, state.is_main_process)
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        last = result.losses[-50:]
        summary = {"recipe": recipe.name, "processes": state.num_processes, "distributed_type": str(state.distributed_type),
                   "steps": result.steps, "batch_size_per_process": recipe.train_kwargs["batch_size"],
                   "seconds": round(result.seconds, 2), "final_loss": sum(last) / len(last)}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
