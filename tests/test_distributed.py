"""``helpers.training.train`` on two CPU processes (accelerate's multi-CPU path, gloo).

``accelerate launch --num_processes 2`` on a machine without a GPU starts one process
(accelerate issue 2741), so the test forks two with ``accelerate.debug_launcher``, as
accelerate's own CPU tests do. It checks that the run really is distributed (two processes,
``MULTI_CPU``, a different slice of the data on each rank, the same parameters on both after
every step) and that it is data parallelism exactly: the final weights equal one process
trained at twice the batch on the same examples.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from diffusers import UNet2DModel

from helpers import training, zoo

REPO = Path(__file__).resolve().parent.parent
STEPS, BATCH, DATA_SEED = 12, 8, 3
# warm-up shorter than the run and a clip that binds: both must count the same on one and two processes
SETTINGS = dict(steps=STEPS, lr=0.05, warmup_steps=4, ema_decay=0.9, grad_clip=0.5, data_seed=DATA_SEED, progress=False)


def _problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    x[:, 0] = torch.arange(64, dtype=torch.float64)  # each row names its index
    y = torch.sin(x[:, 1:]).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    return model, (x, y)


def _recording_loss(log):
    """A deterministic loss (no noise draws) that records each step's batch and starting weights."""

    def loss(model, batch):
        x, y = batch
        log["rows"].append(x[:, 0].long().tolist())
        log["params"].append([p.detach().clone() for p in model.parameters()])
        return torch.nn.functional.mse_loss(model(x), y)

    return loss


def _worker(model, data, out_dir):
    AcceleratorState._reset_state(True)  # the forked child must not inherit the parent's single-process state
    torch.set_num_threads(1)
    log = {"rows": [], "params": []}
    result = training.train(model, data, _recording_loss(log), batch_size=BATCH, **SETTINGS)
    state = PartialState()
    torch.save({"rank": state.process_index, "world": state.num_processes, "type": str(state.distributed_type),
                "rows": log["rows"], "params": log["params"],
                "final": [p.detach().clone() for p in result.model.parameters()],
                "ema": [p.detach().clone() for p in result.ema.parameters()]},
               out_dir / f"rank{state.process_index}.pt")


def launch(out_dir: Path) -> None:
    model, data = _problem()
    debug_launcher(_worker, args=(model, data, out_dir), num_processes=2)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    # debug_launcher forks; a process whose torch has started its thread pools (as pytest's has, after
    # other tests) can deadlock in the child, so the ranks are forked from a fresh interpreter
    out_dir = tmp_path_factory.mktemp("ddp")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_distributed; " \
           f"test_distributed.launch(__import__('pathlib').Path({str(out_dir)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=REPO)
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def test_two_processes_run_distributed_on_their_own_slices(two_ranks):
    assert [r["rank"] for r in two_ranks] == [0, 1]
    assert all(r["world"] == 2 and r["type"] == str(DistributedType.MULTI_CPU) for r in two_ranks)
    for step in range(STEPS):
        rows0, rows1 = two_ranks[0]["rows"][step], two_ranks[1]["rows"][step]
        assert len(rows0) == len(rows1) == BATCH and rows0 != rows1, step  # each rank its own examples
        for p0, p1 in zip(two_ranks[0]["params"][step], two_ranks[1]["params"][step]):
            torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # the same weights on both ranks before every step
    assert two_ranks[0]["params"][-1][0].ne(two_ranks[0]["params"][0][0]).any(), "the weights moved"


def test_two_processes_equal_one_at_twice_the_batch(two_ranks):
    model, data = _problem()
    log = {"rows": [], "params": []}
    single = training.train(copy.deepcopy(model), data, _recording_loss(log), batch_size=2 * BATCH, **SETTINGS)
    for step in range(STEPS):  # the same examples: rank 0's slice, then rank 1's
        assert log["rows"][step] == two_ranks[0]["rows"][step] + two_ranks[1]["rows"][step], step
    for name, ours in [("final", single.model), ("ema", single.ema)]:
        for p_single, p_ddp in zip(ours.parameters(), two_ranks[0][name]):
            torch.testing.assert_close(p_ddp, p_single.detach(), rtol=0, atol=1e-12)
    # and the equality is not trivial: the weights moved far more than the tolerance
    moved = max((a - b).abs().max().item() for a, b in zip(single.model.parameters(), model.parameters()))
    assert moved > 1e-2, moved


def test_data_seed_is_checked():
    model, data = _problem()
    with pytest.raises(ValueError, match="data_seed"):
        training.train(model, data, _recording_loss({"rows": [], "params": []}), steps=1, data_seed=1.5, progress=False)



def test_the_launch_script_trains_a_recipe_on_two_cpu_processes(tmp_path):
    """What the README shows GPU users, run here as two CPU processes under torchrun."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "COURSE_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", "29512",
           str(REPO / "tools" / "train.py"), "digits_unet", "--steps", "3", "--batch-size", "8", "--out", str(out)]
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_type"] == str(DistributedType.MULTI_CPU), summary
    assert summary["steps"] == 3
    trained = UNet2DModel.from_pretrained(out)
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in zoo.build("digits_unet").parameters())


@pytest.mark.parametrize("name, processes, machines", [("multi_gpu", 2, 1), ("multi_node", 16, 2)])
def test_the_accelerate_configs_are_valid(name, processes, machines):
    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))  # unknown keys raise
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_processes, config.num_machines) == (processes, machines)
