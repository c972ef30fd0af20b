"""``fastconv train``: d2l's training loop (``train_ch6``) for any model in fastconv.models,
stock or converted.

SGD with the learning rate, epochs and batch size of MODELS.md by default, Xavier-uniform
init of every Conv2d and Linear weight, cross-entropy; a progress bar per epoch on stderr and,
after each epoch, loss, train accuracy, test accuracy and examples/sec as d2l prints them.

Checkpoints (``--save``) hold the model's state_dict with stock torch.nn keys (``convert``
keeps them), so a stock model loads them directly, plus what resuming exactly needs: the
optimizer state, where in which epoch training stopped and the random generator states.

Data-parallel: run under ``torchrun --nproc-per-node N -m fastconv train ...``. Each process
takes an equal slice of every global batch (``--batch-size`` is the global batch), gradients
are averaged by DistributedDataParallel (gloo on CPU, NCCL on GPU), so the parameters follow a
single-process run on the same global batch. Batch norm statistics stay per process, as with
plain DDP.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from .. import convert, conversion_report, models
from . import data as datalib
from .args import add_model_arguments, image_size, nonneg_int, positive_float, positive_int
from .common import (BACKEND_CHOICES, grad_scaler, parse_model_args, pick_device, sgd_step,
                     short_reason, unusable_reason, xavier_init)
from .flops import count as count_flops
from .plot import TrainPlot, require_matplotlib
from .progress import Progress

CHECKPOINT_FORMAT = "fastconv-train-1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, default="lenet_bn", batch=False, dtype=None, device_help=(
        "cpu, cuda or cuda:N (default: cuda if present; under torchrun each process takes "
        "cuda:LOCAL_RANK)"), model_help="lenet_bn learns the small digits set in seconds on CPU")
    p.add_argument("--data", default=None, choices=datalib.DATA_SETS,
                   help="default: fashion-mnist when --data-dir is given, else digits "
                        "(needs scikit-learn)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST IDX files (raw or .gz; torchvision's "
                        "FashionMNIST/raw layout and d2l's ../data work too; default: none)")
    p.add_argument("--synthetic-size", type=positive_int, default=None,
                   help="training examples of --data synthetic (default: 10 batches)")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="resize to this side (default: the model's d2l input size)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="default: the model's recipe")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="default: the model's recipe")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch size (default: the model's recipe)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="stock: plain torch.nn, no conversion; otherwise fastconv.convert "
                        "with this backend (auto: the best per call)")
    p.add_argument("--amp", nargs="?", const="auto", default=None,
                   choices=("auto", "float16", "bfloat16"),
                   help="mixed precision under torch.autocast (bare --amp: bfloat16 where "
                        "supported, else float16 with loss scaling; default: off)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of init and shuffling")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many training steps (default: no limit)")
    p.add_argument("--save", default=None,
                   help="write a checkpoint here after every epoch (default: none)")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint (default: none)")
    p.add_argument("--json", default=None,
                   help="write the per-epoch history here (default: none)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the run's outputs: DIR/train.png (the plot), "
                        "DIR/history.json (default: none)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw train loss, train and test accuracy per epoch as d2l's animator "
                        "does, refreshed every epoch (needs matplotlib; default: DIR/train.png "
                        "with --out, else none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class History:
    epochs: list = dataclasses.field(default_factory=list)      # one dict per epoch
    step_losses: list = dataclasses.field(default_factory=list)  # this process's batch losses
    steps: int = 0


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _all_reduce(values: list[float], device, dist: DistInfo) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def evaluate_accuracy(net: nn.Module, test_data: datalib.ArrayData, batch_size: int, size,
                      device, amp=None, channels_last=False, dist: DistInfo = DistInfo()
                      ) -> float:
    """Fraction of test examples classified right (d2l's evaluate_accuracy_gpu)."""
    was_training = net.training
    net.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32,
                                         enabled=amp is not None):
        for x, y in datalib.eval_batches(test_data, batch_size, size, device, rank=dist.rank,
                                         world=dist.world, channels_last=channels_last):
            correct += (net(x).argmax(dim=1) == y).sum()
            count += y.numel()
    net.train(was_training)
    total_correct, total = _all_reduce([float(correct), float(count)], device, dist)
    return total_correct / max(total, 1)


def fit(net: nn.Module, train_data: datalib.ArrayData, test_data: datalib.ArrayData, *,
        epochs: int, lr: float, batch_size: int, device: torch.device, size=None,
        seed: int = 0, amp: Optional[torch.dtype] = None, channels_last: bool = False,
        max_steps: Optional[int] = None, optimizer: Optional[torch.optim.Optimizer] = None,
        start_epoch: int = 0, start_batch: int = 0, progress: bool = True,
        out=None, dist: DistInfo = DistInfo(),
        on_epoch_end: Optional[Callable[[int, int, History], None]] = None,
        on_progress: Optional[Callable[[float, float, float], None]] = None) -> History:
    """Train ``net`` (already on ``device``) with SGD and cross-entropy, d2l style.

    ``on_epoch_end(epoch, next_batch, history)`` runs after each epoch's evaluation
    (``next_batch`` > 0 when ``max_steps`` stopped the epoch early). ``on_progress(x, loss,
    train_acc)`` gets this process's running means five times an epoch, as d2l's animator
    does (``x``: epochs so far, fractional); it synchronises the device, so only when given.
    After the first batches the estimated epoch time is printed on stderr (rank 0), with a
    warning when an epoch will take more than :data:`LONG_EPOCH_S`.
    """
    out = out if out is not None else sys.stdout
    size = size or tuple(train_data.images.shape[-2:])
    opt = optimizer or torch.optim.SGD(net.parameters(), lr=lr)
    scaler = grad_scaler(amp, device)
    history = History()
    n_batches = datalib.num_batches(len(train_data), batch_size, dist.world)
    show = progress and dist.rank == 0
    for epoch in range(start_epoch, epochs):
        net.train()
        first = start_batch if epoch == start_epoch else 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen, losses = 0, []
        bar = Progress(n_batches - first, f"epoch {epoch + 1}/{epochs}", enabled=show)
        stopped_at = None

        def postfix():
            return f"loss {float(loss_sum) / max(seen, 1):.3f}"

        t0 = time.perf_counter()
        t_first = None
        for b, (x, y) in enumerate(datalib.train_batches(
                train_data, batch_size, size, device, seed=seed, epoch=epoch, start=first,
                rank=dist.rank, world=dist.world, channels_last=channels_last), start=first):
            loss, y_hat = sgd_step(net, opt, x, y, amp, scaler)
            with torch.no_grad():  # accumulated on the device: no synchronisation per step
                loss_sum += loss.detach().double() * y.numel()
                correct += (y_hat.argmax(dim=1) == y).sum()
            losses.append(loss.detach())
            seen += y.numel()
            history.steps += 1
            bar.update(1, postfix)
            done = b + 1 - first
            if epoch == start_epoch and dist.rank == 0 and n_batches - first > ESTIMATE_AFTER:
                # the first batch pays for warm-up (allocation, autotuning): time the next few
                if done == 1 or done == ESTIMATE_AFTER + 1:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.perf_counter()
                    if done == 1:
                        t_first = now
                    else:
                        per_batch = (now - t_first) / ESTIMATE_AFTER
                        _print_estimate(per_batch, n_batches - first, epochs - epoch)
            if on_progress is not None and (
                    done % max(1, (n_batches - first) // 5) == 0 or b + 1 == n_batches):
                on_progress(epoch + (b + 1) / n_batches, float(loss_sum) / max(seen, 1),
                            float(correct) / max(seen, 1))
            if max_steps is not None and history.steps >= max_steps:
                if b + 1 < n_batches:
                    stopped_at = b + 1
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        bar.close()
        history.step_losses += [float(v) for v in losses]
        total_loss, total_correct, total_seen = _all_reduce(
            [float(loss_sum), float(correct), float(seen)], device, dist)
        test_acc = evaluate_accuracy(net, test_data, batch_size, size, device, amp,
                                     channels_last, dist)
        # examples/sec of the job: every rank's examples over the slowest rank's time
        slowest = _max_over_ranks(seconds, device) if dist.enabled else seconds
        record = dict(epoch=epoch + 1, loss=total_loss / max(total_seen, 1),
                      train_acc=total_correct / max(total_seen, 1), test_acc=test_acc,
                      examples=int(total_seen), seconds=slowest,
                      examples_per_sec=total_seen / slowest if slowest > 0 else 0.0,
                      steps=history.steps, partial=stopped_at is not None)
        history.epochs.append(record)
        if dist.rank == 0:
            note = f" (stopped after batch {stopped_at}/{n_batches})" if stopped_at else ""
            print(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.3f}, train acc "
                  f"{record['train_acc']:.3f}, test acc {record['test_acc']:.3f}, "
                  f"{record['examples_per_sec']:.1f} examples/sec on {device}{note}",
                  file=out, flush=True)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stopped_at or 0, history)
        if stopped_at is not None or (max_steps is not None and history.steps >= max_steps):
            break
    return history


ESTIMATE_AFTER = 3   # timed batches (after the first) behind the epoch-time estimate
LONG_EPOCH_S = 600.0


def _fmt_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_estimate(per_batch: float, batches: int, epochs_left: int) -> None:
    epoch_s = per_batch * batches
    print(f"estimated time per epoch: {_fmt_seconds(epoch_s)} ({batches} batches at "
          f"{per_batch:.3g} s), {_fmt_seconds(epoch_s * epochs_left)} for the "
          f"{epochs_left} epoch(s) to go", file=sys.stderr, flush=True)
    if epoch_s > LONG_EPOCH_S:
        print(f"warning: an epoch will take about {_fmt_seconds(epoch_s)}; for a quick look "
              "try --max-steps N, a smaller --image-size, a GPU (--device cuda) or the small "
              "digits set (--data digits)", file=sys.stderr, flush=True)


def _max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, *, epoch: int,
                    next_batch: int, steps: int, config: dict, history: list,
                    device: torch.device) -> None:
    """``epoch``/``next_batch``: where training continues (``next_batch`` 0 = a new epoch)."""
    state = dict(format=CHECKPOINT_FORMAT,
                 model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                 optimizer=opt.state_dict(), epoch=epoch, next_batch=next_batch, steps=steps,
                 config=config, history=history, rng_cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving never leaves a torn checkpoint


def load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"--resume {path}: no such file") from None
    except Exception as exc:
        raise SystemExit(f"--resume {path}: not a readable checkpoint: {short_reason(exc)}")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--resume {path}: not a fastconv train checkpoint (no "
                         f"format={CHECKPOINT_FORMAT!r})")
    return state


# --------------------------------------------------------------------------- set-up
def init_distributed(device_arg: Optional[str]) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), pick_device(device_arg)
    import torch.distributed as tdist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank), device


def resolve_amp(choice: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    if choice is None:
        return None
    if choice == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[choice]


def build_model(name: str, in_channels: int, num_classes: int, model_kwargs: dict,
                image_size: Optional[int]) -> nn.Module:
    kwargs = dict(model_kwargs)
    native = models.INPUT_SIZES[name][1]
    if image_size and image_size != native:
        params = inspect.signature(models.MODELS[name]).parameters
        if "image_size" in params:
            kwargs["image_size"] = image_size
        elif name in ("lenet", "lenet_bn", "vgg16_bn"):
            raise SystemExit(f"--image-size {image_size}: {name} takes {native}x{native} "
                             "input only (its Linear layer is sized for it)")
    try:
        return models.build(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise SystemExit(f"--model-arg: {name} does not take {model_kwargs}: {exc}") from None


def flops_per_example(name: str, in_channels: int, num_classes: int, model_kwargs: dict,
                      size) -> int:
    """Forward FLOPs of one example, counted on a meta-device copy (shapes only, no work)."""
    kwargs = dict(model_kwargs)
    if "image_size" in inspect.signature(models.MODELS[name]).parameters:
        kwargs["image_size"] = size[0]
    with torch.device("meta"):
        model = models.build(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    return count_flops(model.eval(), torch.empty(1, in_channels, *size, device="meta"))


def run(args) -> int:
    dist, device = init_distributed(args.device)
    try:
        return _run(args, dist, device, parse_model_args(args.model_arg))
    except datalib.DataError as exc:
        print(f"fastconv train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, dist: DistInfo, device: torch.device, model_kwargs: dict) -> int:
    recipe = models.RECIPES[args.model]
    epochs = args.epochs if args.epochs is not None else recipe["epochs"]
    lr = args.lr if args.lr is not None else recipe["lr"]
    batch_size = args.batch_size if args.batch_size is not None else recipe["batch_size"]
    data_name = args.data or ("fashion-mnist" if args.data_dir else "digits")
    amp = resolve_amp(args.amp, device)
    plot_path = args.plot or (os.path.join(args.out, "train.png") if args.out else None)
    json_path = args.json or (os.path.join(args.out, "history.json") if args.out else None)
    if plot_path:
        require_matplotlib()  # before any data is read or model built
    if args.backend not in ("stock", "auto"):
        reason = unusable_reason(args.backend, device)
        if reason is not None and not (args.backend == "triton" and device.type == "cpu"
                                       and os.environ.get("TRITON_INTERPRET", "0") != "0"):
            raise SystemExit(f"--backend {args.backend} cannot run on {device}: {reason}")
    if batch_size % dist.world:
        raise SystemExit(f"--batch-size {batch_size} must be divisible by the {dist.world} "
                         "processes")

    train_data, test_data = datalib.load(
        data_name, args.model, data_dir=args.data_dir, batch_size=batch_size,
        synthetic_size=args.synthetic_size, image_size=args.image_size, seed=args.seed)
    train_data, test_data = train_data.to(device), test_data.to(device)
    size = datalib.input_size(args.model, args.image_size)
    in_channels = train_data.images.shape[1]

    torch.manual_seed(args.seed)
    net = xavier_init(build_model(args.model, in_channels, train_data.num_classes, model_kwargs,
                                  args.image_size))
    config = dict(model=args.model, model_kwargs=model_kwargs, data=data_name, lr=lr,
                  batch_size=batch_size, epochs=epochs, seed=args.seed, backend=args.backend,
                  image_size=list(size), in_channels=int(in_channels))
    state = load_checkpoint(args.resume) if args.resume else None
    if state is not None:
        saved = state.get("config", {})
        for key in ("model", "model_kwargs", "image_size", "in_channels"):
            if saved.get(key) != config[key]:
                raise SystemExit(f"--resume {args.resume}: checkpoint has {key}="
                                 f"{saved.get(key)!r}, this run {config[key]!r}")
        net.load_state_dict(state["model"])  # stock keys, before any conversion
    net = net.to(device)
    if args.backend != "stock":
        net = convert(net, backend=None if args.backend == "auto" else args.backend)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    start_epoch = start_batch = 0
    past: list = []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = lr
        start_epoch, start_batch, past = state["epoch"], state["next_batch"], state["history"]
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    model = net
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    plot = None
    if dist.rank == 0:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        report = conversion_report(net)
        how = "stock torch.nn" if report is None else (
            f"converted (backend {args.backend}): {len(report.replaced)} layers replaced, "
            f"{len(report.left)} left")
        print(f"training {args.model} on {data_name} ({len(train_data)} train, "
              f"{len(test_data)} test, {in_channels}x{size[0]}x{size[1]}), {how}; lr {lr}, "
              f"batch {batch_size}{f' over {dist.world} processes' if dist.enabled else ''}, "
              f"{epochs} epochs, {device}{', AMP ' + str(amp).replace('torch.', '') if amp else ''}"
              f"{', channels_last' if args.channels_last else ''}"
              + (f"; resuming at epoch {start_epoch + 1}, batch {start_batch}"
                 if state is not None else ""), flush=True)
        params = sum(p.numel() for p in net.parameters())
        flops = flops_per_example(args.model, int(in_channels), train_data.num_classes,
                                  model_kwargs, size)
        print(f"  {params:,d} parameters, {flops / 1e9:.3g} GFLOP per example forward "
              "(multiply-add = 2 FLOPs)", flush=True)
        if args.model == "vgg11" and not model_kwargs.get("narrow"):
            print("  vgg11 is the full-width VGG-11 (ImageNet's channel counts); d2l trains a "
                  "narrow copy with 1/4 of the channels: --model-arg narrow=true", flush=True)
        if start_epoch >= epochs:
            print(f"nothing to do: the checkpoint already finished {start_epoch} epochs",
                  flush=True)
        if plot_path:
            plot = TrainPlot(plot_path, f"{args.model}, {args.backend}, {device}", epochs)
            for e in past:
                plot.add(e["epoch"], train_loss=e["loss"], train_acc=e["train_acc"],
                         test_acc=e["test_acc"])
    n_batches = datalib.num_batches(len(train_data), batch_size, dist.world)

    def on_progress(x: float, loss: float, acc: float) -> None:
        plot.add(x, train_loss=loss, train_acc=acc)

    def on_epoch_end(epoch: int, next_batch: int, history: History) -> None:
        if plot is not None:
            last = history.epochs[-1]
            plot.add(epoch + (next_batch / n_batches if next_batch else 1),
                     test_acc=last["test_acc"])
            plot.save(f"{args.model}, {args.backend}, {device}: "
                      f"{last['examples_per_sec']:.1f} examples/sec")
        if args.save and dist.rank == 0:
            save_checkpoint(args.save, net, opt,
                            epoch=epoch if next_batch else epoch + 1, next_batch=next_batch,
                            steps=(state or {}).get("steps", 0) + history.steps,
                            config=config, history=past + history.epochs, device=device)

    history = fit(model, train_data, test_data, epochs=epochs, lr=lr, batch_size=batch_size,
                  device=device, size=size, seed=args.seed, amp=amp,
                  channels_last=args.channels_last, max_steps=args.max_steps, optimizer=opt,
                  start_epoch=start_epoch, start_batch=start_batch,
                  progress=not args.no_progress, dist=dist, on_epoch_end=on_epoch_end,
                  on_progress=on_progress if plot is not None else None)
    if dist.rank == 0 and history.epochs:
        last = history.epochs[-1]
        total_time = sum(e["seconds"] for e in history.epochs)
        total_ex = sum(e["examples"] for e in history.epochs)
        # d2l's closing two lines
        print(f"loss {last['loss']:.3f}, train acc {last['train_acc']:.3f}, "
              f"test acc {last['test_acc']:.3f}")
        print(f"{total_ex / total_time if total_time else 0.0:.1f} examples/sec on {device}")
        if plot is not None:
            print(f"plot: {plot.path}")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(config=config, epochs=past + history.epochs,
                               step_losses=history.step_losses), f, indent=1)
    return 0


def main(argv: Optional[list] = None) -> int:
    from ..cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
