"""`dfdetect train`: train a detector on the prepared cache, with checkpoints, resume and MLflow tracking."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, operating_point, runtime, tracking
from .artifact import TrainedModel
from .augment import augment_with_masks, recompress
from .boundary import BoundaryError, BoundarySupervision
from .config import AugmentParams, DistillParams, Params
from .data import PreparedSplit, batch_loader, load_split, preprocess_config
from .ema import WeightAverage
from .inference import predict_scores
from .io_utils import atomic_write_csv, atomic_write_json, remove_stale_temporaries
from .linear_probe import new_parameter_names, probing
from .metrics import roc_auc
from .mixstyle import MixStyleError, mixing_style, mixstyle_layers
from .mixture import MixtureSampler
from .models import ModelError, count_parameters, create_model
from .preprocessing import PreprocessConfig, standardize, to_size
from .progress import progress
from .sbi import batch_options as sbi_batch_options
from .sbi import sbi_batch, sbi_batch_with_masks
from .weight_space import LINEAGE_KEY as MIXED
from .weight_space import mix_with_pretrained, pretrained_weights

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
    # the validation ROC-AUC of the model as written, where it differs from the best epoch's (a WiSE-FT mix)
    shipped_val_auc: float | None = None

    @property
    def model_val_auc(self) -> float:
        """The validation ROC-AUC of the model this run ships: the mixed model's, else the best epoch's."""
        return self.best_val_auc if self.shipped_val_auc is None else self.shipped_val_auc


def freeze_parameters(model: nn.Module, pattern: str) -> int:
    """Stop training the parameters whose names match `pattern`; returns how many tensors were frozen."""
    if not pattern:
        return 0
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name in names if re.search(pattern, name)]
    if not frozen:
        raise TrainError(
            f"train.freeze={pattern!r} matches no parameter of this model; its names start with " + ", ".join(names[:4])
        )
    if len(frozen) == len(names):
        raise TrainError(f"train.freeze={pattern!r} matches every parameter: nothing would be trained")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return len(frozen)


def make_optimizer(model: nn.Module, params: Params, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer of the model's trainable parameters, and of `extra`'s (a training-only head)."""
    t = params.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(extra.parameters()) if extra is not None else []
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


def _better(val_auc: float, val_loss: float, best_auc: float, best_loss: float) -> bool:
    """An epoch is the new best on a higher val ROC-AUC, or on the same one with a lower val loss: on data the
    model separates perfectly early (AUC 1.0 from epoch 1) the first epoch would otherwise ship, before its
    scores are confident or calibrated."""
    if val_auc > best_auc + 1e-6:
        return True
    return val_auc >= best_auc - 1e-6 and val_loss < best_loss


def augmented_batch(
    images: torch.Tensor, augment: AugmentParams, gen: torch.Generator, rt: runtime.Runtime
) -> torch.Tensor:
    """uint8 batch from the cache -> augmented float images in [0, 1] on the device (what a teacher also sees)."""
    return augmented_batch_with_masks(images, None, augment, gen, rt)[0]


def augmented_batch_with_masks(
    images: torch.Tensor,
    masks: torch.Tensor | None,
    augment: AugmentParams,
    gen: torch.Generator,
    rt: runtime.Runtime,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """augmented_batch (the same draws), and the self-blends' blending masks moved as their images were."""
    x = recompress(images, augment, gen).to(rt.device, non_blocking=True).float().div_(255)
    return augment_with_masks(x, masks, augment, gen)


def model_input(x: torch.Tensor, pre: PreprocessConfig, rt: runtime.Runtime) -> torch.Tensor:
    """Images in [0, 1] -> the normalised input of the model being trained (in place when already at its size)."""
    return standardize(to_size(x, pre.image_size), pre, inplace=True).contiguous(memory_format=rt.memory_format())


def training_batch(
    images: torch.Tensor, augment: AugmentParams, gen: torch.Generator, pre: PreprocessConfig, rt: runtime.Runtime
) -> torch.Tensor:
    """uint8 batch from the cache -> augmented, normalised model input on the device."""
    return model_input(augmented_batch(images, augment, gen, rt), pre, rt)


def class_balanced_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-image loss weights under which a batch's reals and fakes weigh half each (mean weight 1); a batch of
    one class keeps weight 1 everywhere."""
    fakes = y.sum()
    reals = len(y) - fakes
    if fakes == 0 or reals == 0:
        return torch.ones_like(y)
    return torch.where(y > 0.5, len(y) / (2 * fakes), len(y) / (2 * reals))


def consistency_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean symmetric KL divergence between the Bernoulli P(fake) of two views' logits (R-Drop's form), which for
    logits reduces to (sigmoid(a) - sigmoid(b)) x (a - b) / 2: zero when both views get the same score, whatever
    the label."""
    return ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)).mean() / 2


def label_loss(logits, y, soft=None, distill: DistillParams | None = None, balance: bool = False) -> torch.Tensor:
    """The labels' loss (each class weighing half with `balance`); with `soft` (a teacher's P(fake) at the
    distillation temperature), (1 - alpha) x that loss + alpha x T^2 x the soft loss (Hinton et al.'s scaling)."""
    loss = F.binary_cross_entropy_with_logits(logits, y, weight=class_balanced_weights(y) if balance else None)
    if soft is not None:
        t = distill.temperature
        soft_loss = F.binary_cross_entropy_with_logits(logits / t, soft) * (t * t)
        loss = (1 - distill.alpha) * loss + distill.alpha * soft_loss
    return loss


def train_step(
    model: nn.Module,
    optimizer,
    scaler,
    rt: runtime.Runtime,
    x: torch.Tensor,
    y: torch.Tensor,
    soft: torch.Tensor | None = None,
    distill: DistillParams | None = None,
    balance: bool = False,
    second_view: torch.Tensor | None = None,
    consistency: float = 0.0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
):
    """One optimiser step on `label_loss`. With `second_view` (the same images augmented again), both views are
    scored in one batch, the label loss is their mean, plus `consistency` x `consistency_loss` between them;
    `soft` then holds both views' soft targets, the first view's first. `extra_loss()`, called after the forward
    pass, adds a term of a training-only head (dfdetect.boundary). Returns the loss (every term included) and the
    first view's logits."""
    with rt.autocast():
        logits = model(x if second_view is None else torch.cat([x, second_view])).float()
    if second_view is None:
        loss = label_loss(logits, y, soft, distill, balance)
    else:
        logits, again = logits.split(len(x))
        soft, soft_again = soft.split(len(x)) if soft is not None else (None, None)
        loss = (label_loss(logits, y, soft, distill, balance) + label_loss(again, y, soft_again, distill, balance)) / 2
        loss = loss + consistency * consistency_loss(logits, again)
    if extra_loss is not None:
        loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def _comparable(params: Params, lineage: dict | None = None) -> dict:
    """What must not change between a run and its resumption."""
    return {
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": params.train.model_dump(exclude={"device", "num_workers"}),
        **({"lineage": lineage} if lineage else {}),
    }


def _diff(a: dict, b: dict, prefix="", defaults: dict | None = None) -> list[str]:
    """What differs between a checkpoint's params `a` and today's `b`. A key the checkpoint lacks (a parameter added
    after it was written) is no difference while today's value is its `defaults` value: what the older code did."""
    out, defaults = [], defaults or {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.", defaults.get(k) if isinstance(defaults.get(k), dict) else None)
        elif k not in a and k in defaults and vb == defaults[k]:
            continue
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
    return {
        name: {"version": versions.get(name, "unknown"), **{s: per[s] for s in per if s in ("train", "val")}}
        for name, per in report.get("sources", {}).items()
    }


OPTIONAL_HISTORY_FIELDS = ["train_boundary_loss"]  # columns of a recipe's own terms, only where it has them


def write_history(path: Path, history: list[dict]) -> None:
    optional = [k for k in OPTIONAL_HISTORY_FIELDS if any(k in row for row in history)]
    atomic_write_csv(path, history, HISTORY_FIELDS + optional)


class _NoTracking:
    """Stands in for MLflow when tracking is off (library use in tests and benchmarks)."""

    def log_metrics(self, *a, **k):
        pass


class Trainer:
    """One training run in parts a reader can hold: set-up (`__init__`), `resume`, `run_epoch`,
    `validate_and_checkpoint` and `finish`; `train` below strings them together."""

    def __init__(
        self,
        params: Params,
        prepared_dir: str | Path,
        model_dir: str | Path,
        track: bool = True,
        initial: nn.Module | None = None,
        teacher=None,
        lineage: dict | None = None,
    ):
        """Devices and processes, data, model, optimizer, generators and loaders; nothing is trained yet.

        `initial`: start from this module instead of `model` params (a pruned network to fine-tune);
        `teacher`: a `distill.Teacher` whose soft P(fake) the loss also follows; `lineage`: where the model
        comes from (pruned from, distilled from), stored in every checkpoint and tagged on the run."""
        self.params, self.t, self.prepared_dir, self.model_dir = (
            params,
            params.train,
            Path(prepared_dir),
            Path(model_dir),
        )
        self.initial, self.teacher, self.lineage = initial, teacher, dict(lineage or {})
        self._set_up_processes(track)
        self._set_up_data()
        self._set_up_model()
        self._set_up_loaders()
        self.state = {
            "epoch": 0,
            "best_val_auc": -1.0,
            "best_val_loss": float("inf"),  # breaks ties in val AUC (a saturated 1.0 on easy data)
            "best_epoch": 0,
            "stale_epochs": 0,
            "history": [],
            "run_id": None,
            "threshold": 0.5,
            "operating_point": None,
        }
        self.mlflow, self.sink, self.logged = None, _NoTracking(), {}
        log.info(
            "model %s (%d parameters, %d tensors frozen) on %s, precision %s, channels_last %s; %d train / %d val images",
            params.model.name,
            count_parameters(self.model),
            self.frozen,
            self.rt.device,
            self.rt.precision,
            self.rt.channels_last,
            len(self.train_split.labels),
            len(self.val_split.labels),
        )

    def _set_up_processes(self, track: bool) -> None:
        """The process group, this process's device and runtime, the seeds; stale checkpoint temporaries go."""
        t = self.t
        self.d = d = distributed.setup()
        if d.is_main:  # a kill during a checkpoint write leaves its temporary behind
            stale = remove_stale_temporaries(self.model_dir, ("best.pt", "last.pt", "summary.json"))
            if stale:
                log.info("removed temporaries of an interrupted write: %s", ", ".join(p.name for p in stale))
        device = t.device
        if d.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{d.local_rank}"  # one GPU per process
        self.rt = runtime.resolve(device, t.precision, t.channels_last)
        runtime.flush_denormals(self.rt.device)
        if t.batch_size % d.world:
            raise TrainError(
                f"train.batch_size={t.batch_size} is the global batch: it must divide among {d.world} processes"
            )
        self.track = track and d.is_main  # one MLflow run, one set of checkpoints
        runtime.seed_everything(self.params.seed)

    def _set_up_data(self) -> None:
        """The prepared splits, their preprocessing and, for landmark SBI masks or aligned donors, the landmark
        model."""
        t = self.t
        self.pre = preprocess_config(self.prepared_dir)
        size = self.params.model.image_size
        if size and size != self.pre.image_size:  # a smaller model: downscaled from the cache, served at its size
            if size > self.pre.image_size:
                raise TrainError(
                    f"model.image_size={size} is larger than the prepared images ({self.pre.image_size} px): "
                    "prepare at that size instead (prepare.image_size)"
                )
            self.pre = replace(self.pre, image_size=size)
        self.pre = replace(self.pre, colour=self.params.model.colour)  # stored with the model: serving sees as training
        self.train_split = load_split(self.prepared_dir, "train")
        self.val_split = load_split(self.prepared_dir, "val")
        if t.sbi.mode == "only":  # real faces only: every fake seen in training is self-blended
            self.train_split = _reals_only(self.train_split)
        self.sbi_options = sbi_batch_options(t.sbi)  # loads the face mesh now: a missing model fails before any work

    def _set_up_model(self) -> None:
        """The network, its frozen part, the weight average that ships, the optimizer, schedule and scaler."""
        params, t, rt = self.params, self.t, self.rt
        self.pretrained = self._pretrained_for_mixing()
        self.model = self.initial if self.initial is not None else create_model(params.model)
        self.model = self.model.to(rt.device, memory_format=rt.memory_format())
        self.frozen = freeze_parameters(self.model, t.freeze)
        self.probed = self._probed_parameters()
        try:  # checked now, not at the first step: a wrong name fails before any work
            self.mixstyle_layers = mixstyle_layers(self.model, t.mixstyle)
        except MixStyleError as exc:
            raise TrainError(str(exc)) from None
        self.ema = WeightAverage(self.model, t.ema_decay) if t.ema_decay else None
        self.shipped = self.ema.module if self.ema else self.model  # what is validated, checkpointed and registered
        self.boundary = None
        if t.sbi.boundary_weight > 0:  # a training-only head: never in the shipped model
            try:
                self.boundary = BoundarySupervision(
                    self.model, t.sbi.boundary_layer, t.sbi.boundary_weight, self.pre.image_size, rt.device
                )
            except BoundaryError as exc:
                raise TrainError(str(exc)) from None
        self.optimizer = make_optimizer(self.model, params, self.boundary.head if self.boundary else None)
        self.scheduler = make_scheduler(self.optimizer, params)
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
        self.net = self.model
        if self.d.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
            )
            if self.boundary:  # its gradients averaged across processes like the model's
                self.boundary.net = torch.nn.parallel.DistributedDataParallel(
                    self.boundary.head, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
                )

    def _pretrained_for_mixing(self) -> dict | None:
        """The ImageNet weights that `train.wise_alpha` mixes back in at the end, loaded now: a run that
        cannot be mixed fails before any work."""
        params, t = self.params, self.t
        if t.wise_alpha >= 1.0:
            return None
        if self.initial is not None or not params.model.pretrained:
            raise TrainError(
                "train.wise_alpha < 1 mixes the trained weights with the ImageNet weights they started from: it "
                "needs model.pretrained: true and no other starting network (a pruned one)"
            )
        if not t.calibrate:
            raise TrainError(
                "train.wise_alpha < 1 needs train.calibrate: true (the mixed model's temperature and threshold "
                "are chosen again on validation)"
            )
        return _imagenet_weights(params)

    def _probed_parameters(self) -> set[str]:
        """The parameters that `train.probe_epochs` train alone (those without an ImageNet counterpart), found
        now: a run that cannot be probed fails before any work. Empty without a probe."""
        params, t = self.params, self.t
        if not t.probe_epochs:
            return set()
        if self.initial is not None or not params.model.pretrained:
            raise TrainError(
                "train.probe_epochs > 0 trains a head on frozen ImageNet features first: it needs "
                "model.pretrained: true and no other starting network (a pruned one)"
            )
        if self.d.enabled:  # DistributedDataParallel fixes which parameters get gradients when it wraps the model
            raise TrainError("train.probe_epochs > 0 runs in one process; set it to 0 for distributed training")
        pretrained = self.pretrained if self.pretrained is not None else _imagenet_weights(params)
        probed = new_parameter_names(self.model, pretrained)
        if not probed or len(probed) == len(list(self.model.parameters())):
            raise TrainError(
                f"train.probe_epochs: {len(probed)} parameter tensors of {params.model.name} lack an ImageNet "
                "counterpart; a probe needs pretrained layers and a new head"
            )
        if not any(p.requires_grad for name, p in self.model.named_parameters() if name in probed):
            raise TrainError(
                f"train.freeze={t.freeze!r} freezes the whole new head ({', '.join(sorted(probed))}): a linear "
                "probe (train.probe_epochs) would have nothing to train"
            )
        log.info("linear probe: the first %d epoch(s) train %d new tensors alone", t.probe_epochs, len(probed))
        return probed

    def _set_up_loaders(self) -> None:
        """The generators (fixed by the seed), the sampler (a mixture's shares, or this process's share) and
        the train and validation loaders."""
        params, t, d = self.params, self.t, self.d
        self.shuffle_gen = torch.Generator().manual_seed(params.seed)
        self.augment_gen = torch.Generator().manual_seed(params.seed + 1 + d.rank)
        self.sampler = None
        if t.source_weights:  # a mixture: each source its share of the draws, in an order fixed by the seed and epoch
            self.sampler = MixtureSampler(
                self.train_split.datasets or [params.prepare.name] * len(self.train_split.labels),
                t.source_weights,
                params.seed,
                d.rank,
                d.world,
            )
            log.info("mixture draws per epoch: %s", self.sampler.counts())
        elif d.enabled:  # each process trains on its share, in an order fixed by the seed and the epoch
            self.sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_split.labels,
                num_replicas=d.world,
                rank=d.rank,
                shuffle=True,
                seed=params.seed,
                drop_last=True,
            )
        self.train_loader = batch_loader(
            self.train_split,
            t.batch_size // d.world,
            shuffle=True,
            generator=self.shuffle_gen,
            num_workers=t.num_workers,
            drop_last=len(self.train_split.labels) > t.batch_size,
            pin_memory=self.rt.device.type == "cuda",
            sampler=self.sampler,
        )
        self.val_loader = batch_loader(self.val_split, max(t.batch_size, 64), shuffle=False)

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by this recipe: weights, optimizer, schedules, RNGs and history."""
        d, rt = self.d, self.rt
        ckpt = checkpoint.load(path)
        if ckpt.get("lineage", {}).get("pruned"):
            raise TrainError(f"{path}: a pruned network's fine-tune cannot be resumed; run `dfdetect prune` again")
        if ckpt.get("calibration") or MIXED in (ckpt.get("lineage") or {}):
            raise TrainError(
                f"{path} is a finished model (calibrated, perhaps mixed with its ImageNet weights): its weights are "
                "no longer the trained ones; resume from last.pt"
            )
        changed = _diff(ckpt["params"], _comparable(self.params, self.lineage), defaults=_comparable(Params()))
        if ckpt.get("world", 1) != d.world:
            changed.append(f"processes: checkpoint {ckpt.get('world', 1)}, now {d.world}")
        if changed:
            raise TrainError(f"{path}: cannot resume, params differ from the checkpoint's:\n  " + "\n  ".join(changed))
        shipped = checkpoint.with_calibration_buffers(ckpt["state_dict"])  # from before a buffer existed
        trained = ckpt.get("train_state_dict")
        self.model.load_state_dict(shipped if trained is None else checkpoint.with_calibration_buffers(trained))
        if self.ema:
            self.ema.load_state_dict({"module": shipped, "updates": ckpt["ema_updates"]})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.boundary:
            self.boundary.head.load_state_dict(ckpt["boundary_head"])
        self.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        own = ckpt["rng"]["ranks"][d.rank] if d.enabled else ckpt["rng"]
        self.augment_gen.set_state(own["augment"])
        torch.set_rng_state(own["torch"])
        if rt.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], rt.device)
        self.state.update({k: ckpt[k] for k in self.state if k in ckpt})  # older checkpoints lack newer keys
        log.info("resuming from %s after epoch %d", path, self.state["epoch"])

    def start_tracking(self, resumed: bool) -> None:
        """Open (or, resumed, reopen) the run's MLflow run; params and provenance tags are logged once."""
        if not self.track:
            return
        params, state = self.params, self.state
        self.mlflow = mlflow = tracking.setup_mlflow(params)
        run = mlflow.start_run(run_id=state["run_id"]) if state["run_id"] else mlflow.start_run()
        state["run_id"] = run.info.run_id
        self.sink = mlflow
        if not resumed:
            mlflow.log_params(tracking.flat_params(params))
            mlflow.set_tags(
                {
                    "dfdetect.data_version": tracking.data_version(),
                    "dfdetect.git_commit": tracking.git_commit(),
                    "dfdetect.params_hash": tracking.params_hash(params),
                    "dfdetect.label_map": "real=0,fake=1",
                    "dfdetect.device": str(self.rt.device),
                    "dfdetect.precision": self.rt.precision,
                    "dfdetect.training_sources": json.dumps(training_sources(self.prepared_dir)),
                    **({"dfdetect.lineage": json.dumps(self.lineage)} if self.lineage else {}),
                }
            )
        else:
            # Killed between an epoch's metrics and its checkpoint, the run has that epoch and the resumed loop
            # repeats it: skip what the run has; log the checkpoint's epochs the run lacks.
            client = mlflow.MlflowClient()
            self.logged = {
                k: {m.step for m in client.get_metric_history(state["run_id"], k)}
                for k in HISTORY_FIELDS
                if k != "epoch"
            }
            for row in state["history"]:
                self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        """Each epoch's metrics exactly once in the run, also across a kill and resume."""
        new = {k: v for k, v in row.items() if k != "epoch" and row["epoch"] not in self.logged.setdefault(k, set())}
        if new:
            self.sink.log_metrics(new, step=row["epoch"])
            for k in new:
                self.logged[k].add(row["epoch"])

    def run_epoch(self, epoch: int, bar) -> dict:
        """One pass over the training draws: self-blends, augmentation, steps, weight averaging. Returns the
        epoch's learning rate, mean loss and accuracy, and each process's RNG states (for the checkpoint)."""
        t = self.t
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.net.train()
        probe = epoch <= t.probe_epochs
        label = f"epoch {epoch}/{t.epochs}" + (" (linear probe)" if probe else "")
        task = bar.add_task(label, total=len(self.train_loader), info="")
        with (
            probing(self.model, self.probed) if probe else nullcontext(),
            mixing_style(self.model, self.mixstyle_layers, t.mixstyle),  # style mixing acts in these steps only
            self.boundary.attached(self.model) if self.boundary else nullcontext(),
        ):
            train_loss, train_acc = self._train_steps(bar, task)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        ranks = distributed.gather(self.d, {"augment": self.augment_gen.get_state(), "torch": torch.get_rng_state()})
        self.state["epoch"] = epoch
        return {
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "ranks": ranks,
            "task": task,
            **({"train_boundary_loss": self.boundary.epoch_loss()} if self.boundary else {}),
        }

    def _train_steps(self, bar, task) -> tuple[float, float]:
        """The epoch's steps over the training draws; returns the mean loss and accuracy."""
        t, rt = self.t, self.rt
        loss_sum, correct, seen = 0.0, 0, 0
        for images, y in self.train_loader:
            masks = known = None
            if self.boundary:  # the self-blends' masks too: the boundary head learns their seams
                images, y, masks, known = sbi_batch_with_masks(images, y, gen=self.augment_gen, **self.sbi_options)
            elif t.sbi.mode != "none":
                images, y = sbi_batch(images, y, gen=self.augment_gen, **self.sbi_options)
            x, masks = augmented_batch_with_masks(images, masks, t.augment, self.augment_gen, rt)
            second = None
            if t.consistency > 0:  # the same images (self-blends included) through another draw of the augmentation
                second = augmented_batch(images, t.augment, self.augment_gen, rt)
            soft = None
            if self.teacher:  # before the views are normalised in place; each view gets its own soft targets
                soft = self.teacher.soft_targets(x if second is None else torch.cat([x, second]))
            x = model_input(x, self.pre, rt)
            if second is not None:
                second = model_input(second, self.pre, rt)
            y = y.to(rt.device).float()
            loss, logits = train_step(
                self.net,
                self.optimizer,
                self.scaler,
                rt,
                x,
                y,
                soft,
                self.params.distill,
                t.balance_classes,
                second,
                t.consistency,
                partial(self.boundary.loss, masks, known) if self.boundary else None,
            )
            if self.ema:
                self.ema.update(self.model)
            loss_sum += loss.item() * len(y)
            correct += int(((logits > 0).float() == y).sum())
            seen += len(y)
            bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f}")
        return loss_sum / seen, correct / seen

    def _checkpoint_state(self, epoch: int, ranks: list) -> dict:
        d, rt = self.d, self.rt
        return {
            "model": self.params.model.model_dump(),
            "state_dict": self.shipped.state_dict(),
            "preprocess": self.pre.to_dict(),
            # with weight averaging, the weights being trained differ from the shipped average
            "train_state_dict": self.model.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "boundary_head": self.boundary.head.state_dict() if self.boundary else None,
            "rng": {
                "shuffle": self.shuffle_gen.get_state(),
                "augment": self.augment_gen.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
                "ranks": ranks if d.enabled else None,
            },
            "params": _comparable(self.params, self.lineage),
            "lineage": self.lineage,
            "world": d.world,
            **{**self.state, "epoch": epoch},
        }

    def validate_and_checkpoint(self, epoch: int, stats: dict, started: float, bar) -> bool:
        """Rank 0 scores validation, logs the epoch, writes best.pt on a new best and last.pt always, and
        decides early stopping; every process returns that decision."""
        state, t = self.state, self.t
        if not self.d.is_main:  # rank 0 validates, decides and writes; the others follow its decision
            return bool(distributed.broadcast(self.d, None))
        scores, labels, val_loss = predict_scores(self.shipped, self.val_loader, self.pre, self.rt)
        val_auc = roc_auc(labels, scores, 0.5)
        row = {
            "epoch": epoch,
            "lr": stats["lr"],
            "train_loss": stats["train_loss"],
            "train_acc": stats["train_acc"],
            **{k: stats[k] for k in OPTIONAL_HISTORY_FIELDS if k in stats},  # this process's; unweighted
            "val_loss": val_loss,
            "val_acc": float(((scores >= 0.5) == labels).mean()),
            "val_auc": val_auc,
            "seconds": round(time.time() - started, 2),
        }
        state["history"].append(row)
        bar.update(stats["task"], info=f"loss {row['train_loss']:.4f} val_auc {val_auc:.4f} val_loss {val_loss:.4f}")
        self.log_epoch(row)
        if _better(val_auc, val_loss, state["best_val_auc"], state["best_val_loss"]):
            point = operating_point.choose(labels, scores, t.operating_point)
            state.update(
                best_val_auc=val_auc,
                best_val_loss=val_loss,
                best_epoch=epoch,
                stale_epochs=0,
                threshold=point["threshold"],
                operating_point=point,
            )
            checkpoint.save(self.model_dir / "best.pt", self._checkpoint_state(epoch, stats["ranks"]))
        elif epoch > t.probe_epochs:  # a linear probe's epochs never stop the run before it fine-tunes
            state["stale_epochs"] += 1
        checkpoint.save(self.model_dir / "last.pt", self._checkpoint_state(epoch, stats["ranks"]))
        stop = bool(t.early_stopping_patience and state["stale_epochs"] >= t.early_stopping_patience)
        distributed.broadcast(self.d, stop)
        if stop:
            log.info(
                "early stopping: val AUC (or, tied, val loss) has not improved for %d epochs", state["stale_epochs"]
            )
        return stop

    def finish(self, completed: bool, stopped_early: bool, history_path, metrics_path) -> TrainResult:
        """Calibrate the best model in memory and write it once; the history, metrics and summary files; the
        run's model and artifacts logged once; the MLflow run closed."""
        state, t, model_dir = self.state, self.t, self.model_dir
        distributed.teardown(self.d)
        if not self.d.is_main:
            return TrainResult(None, 0, float("nan"), 0.5, state["epoch"], completed, stopped_early)
        calibration, trained = None, None
        if completed and (model_dir / "best.pt").exists():
            best_state = checkpoint.load(model_dir / "best.pt")
            trained = TrainedModel.from_state(best_state)
            if self.pretrained is not None and MIXED not in trained.lineage:  # finished again: mixed once only
                trained = mix_with_pretrained(trained, self.pretrained, t.wise_alpha)
                log.info("mixed with the ImageNet weights (WiSE-FT): %s", trained.lineage[MIXED])
            if t.calibrate:
                from .calibration import calibrate

                trained = calibrate(trained, self.val_split, t.device, t.operating_point)
                trained.save(model_dir / "best.pt", training_state=best_state)
                calibration = trained.calibration
                state["threshold"], state["operating_point"] = trained.threshold, trained.operating_point
                log.info(
                    "calibrated: temperature %.3f, validation ECE %.4f -> %.4f, validation ROC-AUC %s",
                    calibration["temperature"],
                    calibration["val_ece_before"],
                    calibration["val_ece_after"],
                    calibration["val_roc_auc"],
                )
        result = TrainResult(
            state["run_id"],
            state["best_epoch"],
            state["best_val_auc"],
            state["threshold"],
            state["epoch"],
            completed,
            stopped_early,
            _shipped_val_auc(trained, calibration),
        )
        if history_path:
            write_history(Path(history_path), state["history"])
        if completed:
            best = {
                "best_epoch": result.best_epoch,
                "val_auc": result.best_val_auc,
                "threshold": result.threshold,
                **{
                    f"threshold_{k}": state["operating_point"][k]
                    for k in ("val_fpr", "val_recall")
                    if state["operating_point"]
                },
                "epochs_run": result.epochs_run,
                **(
                    {
                        "temperature": calibration["temperature"],
                        "logit_shift": calibration["logit_shift"],
                        "val_ece": calibration["val_ece_after"],
                    }
                    if calibration
                    else {}
                ),
                # val_auc is the best epoch's; the model shipped after a mix ranks validation anew (none: one class)
                **({"mixed_val_auc": result.shipped_val_auc} if result.shipped_val_auc is not None else {}),
            }
            if metrics_path:
                atomic_write_json(metrics_path, best)
            atomic_write_json(
                model_dir / "summary.json",
                {
                    **asdict(result),
                    "model": self.params.model.name,
                    "tracking_uri": tracking.redact(tracking.tracking_uri(self.params)) if self.track else None,
                    "data_version": tracking.data_version(),
                    "params_hash": tracking.params_hash(self.params),
                },
            )
            if self.mlflow:
                from .model_logging import log_training_outputs

                log_training_outputs(self.mlflow, self.params, trained, model_dir / "best.pt", history_path, best)
        if self.mlflow:
            self.mlflow.end_run(status="FINISHED" if completed else "KILLED")
        return result


def _imagenet_weights(params: Params) -> dict:
    """The ImageNet tensors the model starts from (for the mix and the probe); a missing file is a TrainError."""
    try:
        return pretrained_weights(params.model)
    except ModelError as exc:
        raise TrainError(str(exc)) from None


def _shipped_val_auc(trained: TrainedModel | None, calibration: dict | None) -> float | None:
    """The mixed model's validation ROC-AUC, measured by its calibration; None when nothing was mixed (the best
    epoch's figure stands) or validation has one class."""
    if trained is None or calibration is None or MIXED not in trained.lineage:
        return None
    return calibration["val_roc_auc"]


def _reals_only(split: PreparedSplit) -> PreparedSplit:
    reals = np.flatnonzero(split.labels == 0)
    return PreparedSplit(
        np.asarray(split.images[reals]),
        split.labels[reals],
        [split.relpaths[i] for i in reals],
        datasets=[split.datasets[i] for i in reals] if split.datasets else None,
    )


def train(
    params: Params,
    prepared_dir: str | Path,
    model_dir: str | Path,
    history_path: str | Path | None = None,
    metrics_path: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after_epochs: int | None = None,
    track: bool = True,
    trainer: Trainer | None = None,
    on_epoch=None,
) -> TrainResult:
    """Train; `stop_after_epochs` ends this invocation early (a preemptible job), `resume` continues it.
    `trainer`: one built by the caller (fine-tuning a pruned network, distilling); `on_epoch(epoch, row)` is
    called after each validated epoch with its history row (a search reports it, and may stop the run by
    raising)."""
    trainer = trainer or Trainer(params, prepared_dir, model_dir, track)
    if resume:
        trainer.resume(resume)
    trainer.start_tracking(resumed=bool(resume))
    stopped_early, epochs_this_run = False, 0
    try:
        with progress(disable=not trainer.d.is_main) as bar:
            for epoch in range(trainer.state["epoch"] + 1, params.train.epochs + 1):
                if stop_after_epochs is not None and epochs_this_run >= stop_after_epochs:
                    break
                started = time.time()
                stats = trainer.run_epoch(epoch, bar)
                epochs_this_run += 1
                stop = trainer.validate_and_checkpoint(epoch, stats, started, bar)
                if on_epoch and trainer.d.is_main:
                    on_epoch(epoch, trainer.state["history"][-1])
                if stop:
                    stopped_early = True
                    break
    except BaseException:
        if trainer.mlflow:
            trainer.mlflow.end_run(status="FAILED")
        raise
    completed = stopped_early or trainer.state["epoch"] >= params.train.epochs
    return trainer.finish(completed, stopped_early, history_path, metrics_path)
