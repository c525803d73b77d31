"""The training loop and the zoo: losses fall, runs repeat, recipes cache and retrain."""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import models, training, zoo


def _tiny_run(steps=150, seed=0):
    x0, _ = helpers.load_digits()
    helpers.seed_everything(seed)  # the initial weights too
    model = models.digits_unet(widths=(16, 32), attention=False)
    objective = training.diffusion_objective(helpers.get_schedule("linear").alpha_bar)
    return training.train(model, x0, objective, steps=steps, lr=2e-3, seed=seed, progress=False, batch_size=64)


def test_diffusion_loss_falls_and_runs_repeat():
    """The DDPM loss starts near 1 (predicting 0 for unit noise) and must fall well below it."""
    a, b = _tiny_run(), _tiny_run()
    first, last = sum(a.losses[:20]) / 20, sum(a.losses[-20:]) / 20
    assert first > 0.5 and last < 0.6 * first, (first, last)
    assert a.losses == b.losses, "same seed, same step budget: the same run on the CPU"
    for pa, pb in zip(a.ema.parameters(), b.ema.parameters()):
        assert torch.equal(pa, pb)


def test_ema_follows_the_weights_with_warm_up():
    """EMA with decay d: ema <- d*ema + (1-d)*w; after the run it lies between init and final weights."""
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.clone()
    training.ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight)
    run = _tiny_run(steps=30)
    assert not torch.equal(next(run.ema.parameters()), next(run.model.parameters()))


def test_a_page_gets_one_summary_line_and_no_bar(capsys, monkeypatch):
    """COURSE_PROGRESS=summary (the build's setting): stdout has one line, stderr no bar's redraws."""
    x0 = torch.randn(64, 1, 8, 8)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)

    def loss(m, x):
        return (m(x) - x).pow(2).mean()

    monkeypatch.setenv("COURSE_PROGRESS", "summary")
    run = training.train(model, x0, loss, steps=60, batch_size=8, ema_decay=None, warmup_steps=1)
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith("training: 60 steps in "), out
    mean = sum(run.losses[-50:]) / 50
    assert f"final loss {mean:.4f}" in out
    assert "training" not in err and "step/s" not in err, err
    monkeypatch.setenv("COURSE_PROGRESS", "bar")
    training.train(model, x0, loss, steps=5, batch_size=8, ema_decay=None, warmup_steps=1)
    out, err = capsys.readouterr()
    assert "training:" in err, "interactive use keeps the live bar"
    training.train(model, x0, loss, steps=5, batch_size=8, ema_decay=None, warmup_steps=1, progress=False)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("COURSE_PROGRESS", "quiet")
    with pytest.raises(ValueError, match="COURSE_PROGRESS"):
        training.train(model, x0, loss, steps=5, batch_size=8, ema_decay=None)


def test_the_device_parameter_places_the_run_and_a_missing_device_is_named(monkeypatch):
    """device='cpu' keeps every tensor the loss sees on the CPU, even where a GPU is visible."""
    seen = set()

    def loss(m, x):
        seen.update({x.device.type, *(p.device.type for p in m.parameters())})
        return (m(x) - x).pow(2).mean()

    run = training.train(torch.nn.Conv2d(1, 1, 3, padding=1), torch.randn(16, 1, 8, 8), loss, steps=3,
                         batch_size=4, device="cpu", progress=False)
    assert seen == {"cpu"} and {p.device.type for p in run.ema.parameters()} == {"cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for missing in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{missing}' is not available"):
            training.train(torch.nn.Conv2d(1, 1, 3), torch.randn(16, 1, 8, 8), loss, steps=1, device=missing)
    with pytest.raises(ValueError, match="device must be"):
        helpers.get_device("gpu")


def test_train_rejects_bad_budgets():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="budget"):
        training.train(model, torch.zeros(4, 1), lambda m, b: m(b).mean(), progress=False)
    with pytest.raises(ValueError, match="steps"):
        training.train(model, torch.zeros(4, 1), lambda m, b: m(b).mean(), steps=0, progress=False)


def cached(cache: Path) -> list[Path]:
    """The trained artefacts in a cache folder (not its .locks)."""
    return [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_zoo_trains_once_then_loads_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    tiny = dataclasses.replace(
        zoo.RECIPES["digits_unet"], name="tiny", model_kwargs={"size": 8, "widths": [16, 32], "attention": False},
        train_kwargs={"steps": 20, "batch_size": 32, "lr": 1e-3, "seed": 0},
    )
    monkeypatch.setitem(zoo.RECIPES, "tiny", tiny)
    first = zoo.load("tiny", progress=False)
    (folder,) = cached(tmp_path)
    assert folder.name == f"tiny-{tiny.key()}" and (folder / "recipe.json").exists()
    second = zoo.load("tiny", progress=False)
    fresh = zoo.build("tiny")  # the recipe's architecture, untrained: snapshots load into it
    fresh.load_state_dict(second.state_dict())
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    # A changed recipe has a new key, so it trains anew into its own folder.
    monkeypatch.setitem(zoo.RECIPES, "tiny", dataclasses.replace(tiny, train_kwargs={**tiny.train_kwargs, "steps": 21}))
    zoo.load("tiny", progress=False)
    assert len(cached(tmp_path)) == 2
    with pytest.raises(ValueError, match="name"):
        zoo.load("no-such-recipe")


RACE = """
import dataclasses, sys, time
from helpers import zoo
zoo.RECIPES["tiny"] = dataclasses.replace(
    zoo.RECIPES["digits_unet"], name="tiny", model_kwargs={"size": 8, "widths": [16, 32], "attention": False},
    train_kwargs={"steps": 60, "batch_size": 32, "lr": 1e-3, "seed": 0})
while time.time() < float(sys.argv[1]):  # both processes ask at the same moment
    time.sleep(0.01)
zoo.load("tiny", progress=False)
"""


def test_two_processes_needing_one_recipe_train_it_once(tmp_path):
    """tools/build.py --jobs 2 runs notebooks side by side: the cache lock makes the second wait and load."""
    env = os.environ | {"COURSE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    start_at = str(time.time() + 15)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, start_at], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    said = sorted("trained" if "zoo: trained tiny" in log else "loaded" if "zoo: loaded tiny" in log else log
                  for log in logs)
    assert said == ["loaded", "trained"], logs
    assert len(cached(tmp_path)) == 1
