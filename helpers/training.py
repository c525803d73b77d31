"""One training loop for every chapter, on accelerate (Ho et al. 2020, Algorithm 1 for diffusion).

The same code runs on a CPU, one GPU, or several with ``accelerate launch``: accelerate places
the model, wraps it for data parallelism and syncs gradients. Chapters write this loop out by
hand once before they call :func:`train`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm import tqdm

from helpers.core import append_dims, get_device, seed_everything
from helpers.diffusion import diffusion_loss, q_sample

__all__ = ["TrainResult", "conditioned_batches", "diffusion_objective", "ema_update", "train"]


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    model: torch.nn.Module  # the trained weights (unwrapped from accelerate)
    ema: torch.nn.Module | None  # the exponential moving average of the weights: sample with this
    losses: list[float]  # one per step
    steps: int
    seconds: float
    snapshots: list[tuple[int, float, dict]] = field(default_factory=list)  # (step, seconds, EMA weights)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def conditioned_batches(cond_dropout: float = 0.0, null_cond: dict[str, torch.Tensor] | None = None,
                        **cond_keys) -> Callable:
    """``split(batch) -> (x0, cond)``: the images and the model's keyword conditions of a batch.

    ``batch`` is an image tensor, or a tuple whose first item is the images and whose other
    items become keywords by ``cond_keys`` (position of the extra, "0", "1", ... -> keyword).
    With ``cond_dropout``, each example's conditions are replaced by ``null_cond[name]`` with
    that probability (one draw per example, shared by all its conditions), so one model learns
    the conditional and the unconditional prediction that classifier-free guidance combines.
    Shared by the diffusion and the flow-matching objectives.
    """
    if not 0 <= cond_dropout < 1:
        raise ValueError(f"cond_dropout must lie in [0, 1); got {cond_dropout}")
    if cond_dropout and set(null_cond or {}) != set(cond_keys.values()):
        raise ValueError(f"null_cond must give a null value for each of {sorted(cond_keys.values())}; "
                         f"got {sorted(null_cond or {})}")
    for pos in cond_keys:
        if not str(pos).isdigit():
            raise ValueError(f"cond_keys map positions of the batch's extras ('0', '1', ...) to keywords; got {pos!r}")

    def split(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0, *extra = batch if isinstance(batch, (tuple, list)) else (batch,)
        cond = {name: extra[int(pos)] for pos, name in cond_keys.items()}
        if cond_dropout:
            drop = torch.rand(len(x0), device=x0.device) < cond_dropout
            for name, value in cond.items():
                null = null_cond[name].to(value.device, value.dtype).expand_as(value)
                cond[name] = torch.where(append_dims(drop, value.ndim), null, value)
        return x0, cond

    return split


def diffusion_objective(
    alpha_bar: torch.Tensor,
    prediction_type: str = "epsilon",
    cond_dropout: float = 0.0,
    null_cond: dict[str, torch.Tensor] | None = None,
    **cond_keys,
) -> Callable:
    """The DDPM training loss as a function ``loss(model, batch)``.

    For each image: draw t uniformly from [0, T) and eps ~ N(0, I), form xt in closed form,
    and regress the model's output on the target of ``prediction_type`` (eps, x0 or v).
    ``batch`` is an image tensor, or a tuple whose first item is the images and whose other
    items are passed to the model under the names given in ``cond_keys`` (position -> name).
    ``cond_dropout`` replaces each example's condition by ``null_cond[name]`` (the null
    prompt or class) with that probability, so one model learns both the conditional and
    the unconditional prediction that classifier-free guidance combines.
    """
    T = len(alpha_bar)
    split = conditioned_batches(cond_dropout, null_cond, **cond_keys)

    def loss(model, batch) -> torch.Tensor:
        x0, cond = split(batch)
        ab = alpha_bar.to(x0.device)
        t = torch.randint(0, T, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        xt = q_sample(x0, t, eps, ab)
        out = model(xt, t, **cond)
        out = out.sample if hasattr(out, "sample") else out
        return diffusion_loss(out, x0, eps, append_dims(ab[t], x0.ndim), prediction_type)

    return loss


def live_progress_bar() -> bool:
    """Whether training draws a live bar: yes, unless ``COURSE_PROGRESS`` is ``summary``."""
    mode = os.environ.get("COURSE_PROGRESS", "bar")
    if mode not in ("bar", "summary"):
        raise ValueError(f"COURSE_PROGRESS must be 'bar' or 'summary'; got {mode!r}")
    return mode == "bar"


def train(
    model: torch.nn.Module,
    data: torch.Tensor | tuple[torch.Tensor, ...],
    loss_fn: Callable,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    ema_decay: float | None = 0.999,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    data_seed: int | None = None,
    cpu: bool = False,
    device: str | torch.device | None = None,
    snapshot_every: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on in-memory ``data`` with AdamW for ``steps`` steps or ``seconds`` seconds.

    Each step draws a random batch (with replacement; each process its own under
    ``accelerate launch``), computes ``loss_fn(model, batch)``, clips the gradient norm to
    ``grad_clip``, steps AdamW (linear warm-up, then a constant rate) and updates the EMA.
    ``snapshot_every`` (steps) keeps copies of the EMA weights to measure quality against
    training time. Seeded and deterministic on the CPU for a step budget.

    ``data_seed``: draw the batches from a generator of their own: each step draws
    ``num_processes * batch_size`` indices and process ``r`` takes the ``r``-th slice, so two
    processes at ``batch_size`` see exactly the examples one process sees at twice that batch (and,
    with a deterministic loss, end at its weights). Unset, one process draws from the global RNG (as
    the zoo's recipes were trained); several processes then use ``data_seed = seed``. The learning
    rate schedule counts optimizer steps, whatever the number of processes.

    ``device``: where the model, data and EMA live (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``,
    ``"auto"``); unset, accelerate chooses (the GPU if any, or each process's own under
    ``accelerate launch``). ``cpu=True`` is ``device="cpu"``.

    ``progress``: a live bar while training, then one summary line (steps, seconds, final
    loss). Where ``COURSE_PROGRESS=summary`` (as ``tools/build.py`` sets for the pages) only
    the summary line is printed, so a published page carries no bar's hundreds of redraws.
    """
    if (steps is None) == (seconds is None):
        raise ValueError("give exactly one budget: steps=... or seconds=...")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive; got {seconds!r}")
    if data_seed is not None and not isinstance(data_seed, int):
        raise ValueError(f"data_seed must be an int or None; got {data_seed!r}")
    tensors = data if isinstance(data, (tuple, list)) else (data,)
    n = len(tensors[0])
    if any(len(x) != n for x in tensors):
        raise ValueError("every tensor in data must have the same length")

    if device is not None:
        device = get_device(device)  # a clear error for a device this machine lacks
        cpu = cpu or device.type == "cpu"
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # accelerate's single-process "cuda" is the current device
    accelerator = Accelerator(cpu=cpu)
    if device is not None and accelerator.device.type != device.type:
        raise ValueError(f"device {str(device)!r} was asked for, but accelerate placed the run on "
                         f"{str(accelerator.device)!r}; launch without accelerate's device settings or pass device=None")
    seed_everything(seed + accelerator.process_index)
    world, rank = accelerator.num_processes, accelerator.process_index
    if data_seed is None and world > 1:
        data_seed = seed
    order = None if data_seed is None else torch.Generator().manual_seed(data_seed)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    # The schedule is not handed to accelerate, which would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    tensors = tuple(x.to(accelerator.device) for x in tensors)

    losses, snapshots = [], []
    start = time.perf_counter()
    total = steps if steps is not None else None
    report = progress and accelerator.is_local_main_process
    bar = tqdm(total=total, disable=not report or not live_progress_bar(), mininterval=2.0, desc="training", unit="step")
    model.train()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if (steps is not None and step >= steps) or (seconds is not None and elapsed >= seconds):
            break
        if order is None:
            idx = torch.randint(0, n, (batch_size,), device=accelerator.device)
        else:  # one global batch for all processes; this one's slice of it
            idx = torch.randint(0, n, (world * batch_size,), generator=order)[rank * batch_size:(rank + 1) * batch_size]
            idx = idx.to(accelerator.device)
        batch = tuple(x[idx] for x in tensors)
        loss = loss_fn(model, batch if len(batch) > 1 else batch[0])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        schedule.step()
        if ema is not None:
            # Warm-up: average over at most the steps taken so far, so early weights fade fast.
            ema_update(ema, accelerator.unwrap_model(model), min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if snapshot_every and step % snapshot_every == 0:
            source = ema if ema is not None else accelerator.unwrap_model(model)
            snapshots.append((step, time.perf_counter() - start, copy.deepcopy(source.state_dict())))
    bar.close()
    seconds_taken = time.perf_counter() - start
    if report:
        last = losses[-50:]
        final = f", final loss {sum(last) / len(last):.4f} (mean of the last {len(last)} steps)" if last else ""
        print(f"training: {step} steps in {seconds_taken:.0f} s{final}", flush=True)
    model.eval()
    if ema is not None:
        ema.eval()
    return TrainResult(accelerator.unwrap_model(model), ema, losses, step, seconds_taken, snapshots)
