"""`dfdetect train`: train a detector on the prepared cache, with checkpoints, resume and MLflow tracking."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, runtime
from .artifact import TrainedModel
from .augment import augment_batch, recompress
from .config import AugmentParams, Params
from .data import PreparedSplit, batch_loader, load_split, preprocess_config
from .ema import WeightAverage
from .mixture import MixtureSampler
from .sbi import sbi_batch
from .io_utils import atomic_write_csv, atomic_write_json, remove_stale_temporaries
from .metrics import eer_and_threshold, roc_auc
from .models import count_parameters, create_model
from .inference import predict_scores
from .preprocessing import PreprocessConfig, standardize
from .progress import progress
from . import tracking

log = logging.getLogger(__name__)
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "seconds"]


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_id: str | None
    best_epoch: int
    best_val_auc: float
    threshold: float
    epochs_run: int
    completed: bool
    stopped_early: bool


def freeze_parameters(model: nn.Module, pattern: str) -> int:
    """Stop training the parameters whose names match `pattern`; returns how many tensors were frozen."""
    if not pattern:
        return 0
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name in names if re.search(pattern, name)]
    if not frozen:
        raise TrainError(f"train.freeze={pattern!r} matches no parameter of this model; its names start with "
                         + ", ".join(names[:4]))
    if len(frozen) == len(names):
        raise TrainError(f"train.freeze={pattern!r} matches every parameter: nothing would be trained")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)


def make_optimizer(model: nn.Module, params: Params) -> torch.optim.Optimizer:
    t = params.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, params: Params):
    t = params.train
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def training_batch(images: torch.Tensor, augment: AugmentParams, gen: torch.Generator, pre: PreprocessConfig,
                   rt: runtime.Runtime) -> torch.Tensor:
    """uint8 batch from the cache -> augmented, normalised model input on the device."""
    x = recompress(images, augment, gen).to(rt.device, non_blocking=True).float().div_(255)
    x = standardize(augment_batch(x, augment, gen), pre, inplace=True)
    return x.contiguous(memory_format=rt.memory_format())


def train_step(model: nn.Module, optimizer, scaler, rt: runtime.Runtime, x: torch.Tensor, y: torch.Tensor):
    with rt.autocast():
        logits = model(x).float()
    loss = F.binary_cross_entropy_with_logits(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def _comparable(params: Params) -> dict:
    """What must not change between a run and its resumption."""
    return {"seed": params.seed, "model": params.model.model_dump(), "train": params.train.model_dump(exclude={"device", "num_workers"})}


def _diff(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r}, now {vb!r}")
    return out


def training_sources(prepared_dir: str | Path) -> dict[str, dict]:
    """Each source of the prepared data: its DVC version and its train/val images per class (for the model card)."""
    report_path = Path(prepared_dir) / "report.json"
    if not report_path.exists():
        return {}
    report = json.loads(report_path.read_text())
    versions = report.get("source_versions", {})
    return {name: {"version": versions.get(name, "unknown"), **{s: per[s] for s in per if s in ("train", "val")}}
            for name, per in report.get("sources", {}).items()}


def write_history(path: Path, history: list[dict]) -> None:
    atomic_write_csv(path, history, HISTORY_FIELDS)


class _NoTracking:
    """Stands in for MLflow when tracking is off (library use in tests and benchmarks)."""

    def log_metrics(self, *a, **k):
        pass


def train(
    params: Params,
    prepared_dir: str | Path,
    model_dir: str | Path,
    history_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after_epochs: int | None = None,
    track: bool = True,
) -> TrainResult:
    """Train; `stop_after_epochs` ends this invocation early (a preemptible job), `resume` continues it."""
    model_dir = Path(model_dir)
    t = params.train
    d = distributed.setup()
    if d.is_main:  # a kill during a checkpoint write leaves its temporary behind
        stale = remove_stale_temporaries(model_dir, ("best.pt", "last.pt", "summary.json"))
        if stale:
            log.info("removed temporaries of an interrupted write: %s", ", ".join(p.name for p in stale))
    device = t.device
    if d.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{d.local_rank}"  # one GPU per process
    rt = runtime.resolve(device, t.precision, t.channels_last)
    runtime.flush_denormals(rt.device)
    if t.batch_size % d.world:
        raise TrainError(f"train.batch_size={t.batch_size} is the global batch: it must divide among {d.world} processes")
    track = track and d.is_main  # one MLflow run, one set of checkpoints
    runtime.seed_everything(params.seed)
    pre = preprocess_config(prepared_dir)
    train_split, val_split = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    if t.sbi.mode == "only":  # real faces only: every fake seen in training is self-blended
        reals = np.flatnonzero(train_split.labels == 0)
        train_split = PreparedSplit(np.asarray(train_split.images[reals]), train_split.labels[reals],
                                    [train_split.relpaths[i] for i in reals],
                                    datasets=[train_split.datasets[i] for i in reals] if train_split.datasets else None)

    landmarker = None
    if t.sbi.mode != "none" and t.sbi.mask == "landmarks":  # loaded before any work: a missing model fails now
        from .landmarks import FaceLandmarker

        landmarker = FaceLandmarker.load()
    model = create_model(params.model).to(rt.device, memory_format=rt.memory_format())
    frozen = freeze_parameters(model, t.freeze)
    ema = WeightAverage(model, t.ema_decay) if t.ema_decay else None
    shipped = ema.module if ema else model  # what is validated, checkpointed as best and registered
    optimizer = make_optimizer(model, params)
    scheduler = make_scheduler(optimizer, params)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    shuffle_gen = torch.Generator().manual_seed(params.seed)
    augment_gen = torch.Generator().manual_seed(params.seed + 1 + d.rank)
    state = {"epoch": 0, "best_val_auc": -1.0, "best_epoch": 0, "stale_epochs": 0, "history": [], "run_id": None,
             "threshold": 0.5}

    if resume:
        ckpt = checkpoint.load(resume)
        changed = _diff(ckpt["params"], _comparable(params))
        if ckpt.get("world", 1) != d.world:
            changed.append(f"processes: checkpoint {ckpt.get('world', 1)}, now {d.world}")
        if changed:
            raise TrainError(f"{resume}: cannot resume, params differ from the checkpoint's:\n  " + "\n  ".join(changed))
        model.load_state_dict(ckpt["state_dict"] if ckpt.get("train_state_dict") is None else ckpt["train_state_dict"])
        if ema:
            ema.load_state_dict({"module": ckpt["state_dict"], "updates": ckpt["ema_updates"]})
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        own = ckpt["rng"]["ranks"][d.rank] if d.enabled else ckpt["rng"]
        augment_gen.set_state(own["augment"])
        torch.set_rng_state(own["torch"])
        if rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], rt.device)
        state.update({k: ckpt[k] for k in state})
        log.info("resuming from %s after epoch %d", resume, state["epoch"])

    sampler = None
    if t.source_weights:  # a mixture: each source its share of the draws, in an order fixed by the seed and epoch
        sampler = MixtureSampler(train_split.datasets or [params.prepare.name] * len(train_split.labels),
                                 t.source_weights, params.seed, d.rank, d.world)
        log.info("mixture draws per epoch: %s", sampler.counts())
    elif d.enabled:  # each process trains on its share, in an order fixed by the seed and the epoch
        sampler = torch.utils.data.distributed.DistributedSampler(train_split.labels, num_replicas=d.world, rank=d.rank,
                                                                  shuffle=True, seed=params.seed, drop_last=True)
    train_loader = batch_loader(train_split, t.batch_size // d.world, shuffle=True, generator=shuffle_gen,
                                num_workers=t.num_workers, drop_last=len(train_split.labels) > t.batch_size,
                                pin_memory=rt.device.type == "cuda", sampler=sampler)
    net = model
    if d.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    val_loader = batch_loader(val_split, max(t.batch_size, 64), shuffle=False)
    log.info("model %s (%d parameters, %d tensors frozen) on %s, precision %s, channels_last %s; %d train / %d val images",
             params.model.name, count_parameters(model), frozen, rt.device, rt.precision, rt.channels_last,
             len(train_split.labels), len(val_split.labels))

    mlflow = tracking.setup_mlflow(params) if track else None
    run = None
    if mlflow:
        run = mlflow.start_run(run_id=state["run_id"]) if state["run_id"] else mlflow.start_run()
        state["run_id"] = run.info.run_id
        if not resume:
            mlflow.log_params(tracking.flat_params(params))
            mlflow.set_tags({"dfdetect.data_version": tracking.data_version(), "dfdetect.git_commit": tracking.git_commit(),
                             "dfdetect.params_hash": tracking.params_hash(params), "dfdetect.label_map": "real=0,fake=1",
                             "dfdetect.device": str(rt.device), "dfdetect.precision": rt.precision,
                             "dfdetect.training_sources": json.dumps(training_sources(prepared_dir))})
    sink = mlflow or _NoTracking()
    logged: dict[str, set[int]] = {}  # metric -> the steps the run already has

    def log_epoch(row: dict) -> None:
        """Each epoch's metrics exactly once in the run, also across a kill and resume."""
        new = {k: v for k, v in row.items() if k != "epoch" and row["epoch"] not in logged.setdefault(k, set())}
        if new:
            sink.log_metrics(new, step=row["epoch"])
            for k in new:
                logged[k].add(row["epoch"])

    if mlflow and resume:
        # Killed between an epoch's metrics and its checkpoint, the run has that epoch and the resumed loop
        # repeats it: skip what the run has; log the checkpoint's epochs the run lacks.
        client = mlflow.MlflowClient()
        logged = {k: {m.step for m in client.get_metric_history(state["run_id"], k)}
                  for k in HISTORY_FIELDS if k != "epoch"}
        for row in state["history"]:
            log_epoch(row)

    def ckpt_state(epoch: int, ranks: list) -> dict:
        return {
            "model": params.model.model_dump(), "state_dict": shipped.state_dict(), "preprocess": pre.to_dict(),
            # with weight averaging, the weights being trained differ from the shipped average
            "train_state_dict": model.state_dict() if ema else None, "ema_updates": ema.updates if ema else 0,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": {"shuffle": shuffle_gen.get_state(), "augment": augment_gen.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
                    "ranks": ranks if d.enabled else None},
            "params": _comparable(params), "world": d.world, **{**state, "epoch": epoch},
        }

    stopped_early, epochs_this_run = False, 0
    try:
        with progress(disable=not d.is_main) as bar:
            for epoch in range(state["epoch"] + 1, t.epochs + 1):
                if stop_after_epochs is not None and epochs_this_run >= stop_after_epochs:
                    break
                started = time.time()
                if sampler is not None:
                    sampler.set_epoch(epoch)
                net.train()
                task = bar.add_task(f"epoch {epoch}/{t.epochs}", total=len(train_loader), info="")
                loss_sum, correct, seen = 0.0, 0, 0
                for images, y in train_loader:
                    if t.sbi.mode != "none":
                        images, y = sbi_batch(images, y, t.sbi.prob, augment_gen, landmarker)
                    x = training_batch(images, t.augment, augment_gen, pre, rt)
                    y = y.to(rt.device).float()
                    loss, logits = train_step(net, optimizer, scaler, rt, x, y)
                    if ema:
                        ema.update(model)
                    loss_sum += loss.item() * len(y)
                    correct += int(((logits > 0).float() == y).sum())
                    seen += len(y)
                    bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f}")
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                ranks = distributed.gather(d, {"augment": augment_gen.get_state(), "torch": torch.get_rng_state()})
                state["epoch"] = epoch
                epochs_this_run += 1
                if not d.is_main:  # rank 0 validates, decides and writes; the others follow its decision
                    if distributed.broadcast(d, None):
                        stopped_early = True
                        break
                    continue

                scores, labels, val_loss = predict_scores(shipped, val_loader, pre, rt)
                val_auc = roc_auc(labels, scores, 0.5)
                row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                       "val_loss": val_loss, "val_acc": float(((scores >= 0.5) == labels).mean()), "val_auc": val_auc,
                       "seconds": round(time.time() - started, 2)}
                state["history"].append(row)
                bar.update(task, info=f"loss {row['train_loss']:.4f} val_auc {val_auc:.4f} val_loss {val_loss:.4f}")
                log_epoch(row)

                if val_auc > state["best_val_auc"] + 1e-6:
                    state.update(best_val_auc=val_auc, best_epoch=epoch, stale_epochs=0,
                                 threshold=eer_and_threshold(labels, scores)[1])
                    checkpoint.save(model_dir / "best.pt", ckpt_state(epoch, ranks))
                else:
                    state["stale_epochs"] += 1
                checkpoint.save(model_dir / "last.pt", ckpt_state(epoch, ranks))
                stop = bool(t.early_stopping_patience and state["stale_epochs"] >= t.early_stopping_patience)
                distributed.broadcast(d, stop)
                if stop:
                    log.info("early stopping: val AUC has not improved for %d epochs", state["stale_epochs"])
                    stopped_early = True
                    break
    except BaseException:
        if mlflow:
            mlflow.end_run(status="FAILED")
        raise

    completed = stopped_early or state["epoch"] >= t.epochs
    distributed.teardown(d)
    if not d.is_main:
        return TrainResult(None, 0, float("nan"), 0.5, state["epoch"], completed, stopped_early)
    calibration, trained = None, None
    if completed and (model_dir / "best.pt").exists():
        best_state = checkpoint.load(model_dir / "best.pt")
        trained = TrainedModel.from_state(best_state)
        if t.calibrate:
            from .calibration import calibrate

            trained = calibrate(trained, val_split, t.device)
            trained.save(model_dir / "best.pt", training_state=best_state)
            calibration = trained.calibration
            state["threshold"] = trained.threshold
            log.info("calibrated: temperature %.3f, validation ECE %.4f -> %.4f", calibration["temperature"],
                     calibration["val_ece_before"], calibration["val_ece_after"])
    result = TrainResult(state["run_id"], state["best_epoch"], state["best_val_auc"], state["threshold"],
                         state["epoch"], completed, stopped_early)
    if history_path:
        write_history(Path(history_path), state["history"])
    if completed:
        best = {"best_epoch": result.best_epoch, "val_auc": result.best_val_auc, "threshold": result.threshold,
                "epochs_run": result.epochs_run, **({"temperature": calibration["temperature"],
                                                    "val_ece": calibration["val_ece_after"]} if calibration else {})}
        if metrics_path:
            atomic_write_json(metrics_path, best)
        atomic_write_json(model_dir / "summary.json", {
            **asdict(result), "model": params.model.name, "tracking_uri": tracking.redact(tracking.tracking_uri(params)) if track else None,
            "data_version": tracking.data_version(), "params_hash": tracking.params_hash(params)})
        if mlflow:
            from .model_logging import log_training_outputs

            log_training_outputs(mlflow, params, trained, model_dir / "best.pt", history_path, best)
    if mlflow:
        mlflow.end_run(status="FINISHED" if completed else "KILLED")
    return result
