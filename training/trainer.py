"""The local training step (one site) and the single-site training loop built on it.

`LocalTrainer` has the shape of MONAI's `monai.fl` ClientAlgo: `train(weights, epochs, global_weights=, prox_mu=)`
returns a `LocalUpdate` (weights, number of training cases, metrics); `evaluate(weights)` and `get_weights()`.
The federated layer calls it unchanged; with `prox_mu > 0` the loss gains FedProx's (μ/2)‖w − w_global‖².

Data: each case is preprocessed once (`models.preprocessing.preprocess(..., pad_for_inference=False)`, the mask
resampled onto that grid linearly and thresholded at 0.5) and kept in memory. Each epoch draws
`plan.iterations_per_epoch` patches: a `foreground_fraction` of them centred on a random lesion voxel, the rest on
a random voxel, zero-padded where the patch leaves the grid, then augmented with seeded MONAI dict transforms.
Every epoch's sampling and augmentation seeds derive from (plan.seed, epoch), so `--resume` replays exactly what
a straight run would have done. Validation runs Gaussian-weighted sliding windows on the preprocessed grid, maps
probabilities back with `to_source`, thresholds there and scores with the ISLES'22 metrics.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from tqdm import tqdm

from models.metrics import compute_metrics, dice_at_thresholds
from models.network_plan import Norm
from models.networks import build_network, load_network_weights, network_weights
from models.preprocessing import to_source
from training.calibration import THRESHOLD_CANDIDATES, best_threshold
from training.checkpoint import checkpoint_plan, load_checkpoint, save_checkpoint
from training.patches import CaseLike, PatchSampler, PreparedCase, prepare_case
from training.plan import TrainingPlan
from training.stream import CaseStream
from training.synthetic import derived_seed

VAL_METRICS = ("dice", "avd_ml", "lf1")
VAL_WINDOW = 160  # voxels per axis of a validation window for batch-normalized networks


@dataclass
class LocalUpdate:
    weights: dict[str, np.ndarray]
    n_cases: int
    metrics: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch sees no GPU); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device}")
    return device


def build_augmentation(plan: TrainingPlan) -> Compose:
    a = plan.augmentation
    rad = math.radians(a.rotate_deg)
    keys = ("image", "label")
    transforms = [RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(3)]
    transforms += [
        RandAffined(
            keys, prob=a.affine_prob, rotate_range=(rad, rad, rad), scale_range=(a.scale,) * 3,
            mode=("bilinear", "nearest"), padding_mode="zeros",
        ),
        RandScaleIntensityd("image", factors=a.intensity_scale, prob=a.intensity_prob),
        RandShiftIntensityd("image", offsets=a.intensity_shift, prob=a.intensity_prob),
        RandAdjustContrastd("image", gamma=a.gamma_range, prob=a.gamma_prob),
        RandGaussianNoised("image", prob=a.noise_prob, std=a.noise_std),
        RandBiasFieldd("image", coeff_range=(0.0, a.bias_field_coeff), prob=a.bias_field_prob),
    ]
    return Compose(transforms)


def _tensor(value: Any) -> torch.Tensor:
    value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(np.asarray(value))
    return value.float()


def _epoch_seed(plan_seed: int, epoch: int, stream: int) -> int:
    return derived_seed(plan_seed, epoch, stream)


def _lr_factor(plan: TrainingPlan, step: int, schedule_epochs: int) -> float:
    """The learning rate's factor at `step` of a schedule over `schedule_epochs`."""
    total = schedule_epochs * plan.steps_per_epoch
    warmup = min(plan.warmup_epochs * plan.steps_per_epoch, max(total - 1, 0))
    if warmup and step < warmup:
        return max((step + 1) / warmup, plan.min_lr_ratio)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if plan.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = (1.0 - progress) ** 0.9
    return max(factor, plan.min_lr_ratio)


class LocalTrainer:
    """One site's trainer; keeps model, optimizer, scheduler and epoch counter between `train` calls.

    `schedule_epochs`: the epochs the learning-rate schedule spans, where they are more than the plan's (a
    federation's rounds × local epochs; `start_round` places each round on it).
    """

    def __init__(
        self,
        plan: TrainingPlan,
        train_cases: Iterable[CaseLike] | CaseStream,
        val_cases: Iterable[CaseLike] | None = None,
        device: str | torch.device = "cpu",
        *,
        progress: bool = True,
        schedule_epochs: int | None = None,
    ):
        if schedule_epochs is not None and (isinstance(schedule_epochs, bool) or not isinstance(schedule_epochs, int)
                                            or schedule_epochs < plan.epochs):
            raise ValueError(f"schedule_epochs must be an integer ≥ the plan's {plan.epochs} epochs, "
                             f"got {schedule_epochs!r}")
        self.plan = plan
        self.schedule_epochs = schedule_epochs or plan.epochs
        self.device = resolve_device(device)
        self.progress = progress
        if self.device.type == "cpu":
            # Tiny gradients make Adam's second moments denormal, and x86 denormal arithmetic is ~100× slower:
            # measured, 20 steps on a repeated batch took 4 s or 64 s depending on it.
            torch.set_flush_denormal(True)
        # A stream replaces the training cases with a fresh pool every epoch (`batches`).
        self.stream = train_cases if isinstance(train_cases, CaseStream) else None
        self.train_data = [] if self.stream else [self._prepare(case) for case in train_cases]  # type: ignore[union-attr]
        self.val_data = [self._prepare(case) for case in (val_cases or [])]
        if not self.train_data and not self.stream:
            raise ValueError("no training cases")
        torch.manual_seed(plan.seed)
        self.model = build_network(plan.in_channels, 1, plan.network).to(self.device)
        self.loss_fn = DiceCELoss(sigmoid=True)
        if plan.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(), lr=plan.lr, momentum=plan.momentum, nesterov=plan.momentum > 0,
                weight_decay=plan.weight_decay,
            )
        self.scheduler = self._schedule(0)
        self.amp = plan.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.augment = build_augmentation(plan)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.best_val_dice: float | None = None

    def _schedule(self, first_step: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(self.plan, first_step + step, self.schedule_epochs))

    def start_round(self, first_epoch: int) -> None:
        """Begin a federated round at epoch `first_epoch` of the schedule with a fresh optimizer state, so that a
        round's update depends on the global weights, the round and the site's cases only, not on which earlier
        rounds this process trained: a restarted site trains as the sites that never stopped do (with the schedule
        in each process, a restarted site's first round ran at the full learning rate while the others sat at the
        floor, and its ×100 larger change was refused at screening as hostile)."""
        last = self.schedule_epochs - 1
        if isinstance(first_epoch, bool) or not isinstance(first_epoch, int) or not 0 <= first_epoch <= last:
            raise ValueError(f"first_epoch must be an integer in 0–{last}, got {first_epoch!r}")
        self.optimizer.state.clear()
        self.scheduler = self._schedule(first_epoch * self.plan.steps_per_epoch)
        self.epoch = first_epoch

    def _prepare(self, case: CaseLike) -> PreparedCase:
        if len(case.channels) != self.plan.in_channels:
            raise ValueError(f"case {case.case_id}: {len(case.channels)} channel(s), the plan needs "
                             f"{self.plan.in_channels}")
        return prepare_case(case, self.plan.preprocessing)

    # -- weights ---------------------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """Each tensor once (`network_weights`): what a site sends and the coordinator averages."""
        return {name: value.detach().cpu().numpy().copy() for name, value in network_weights(self.model).items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load (possibly partial, e.g. FedBN without norm layers) weights; unknown names are an error."""
        load_network_weights(self.model, weights)

    # -- training --------------------------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches, a pure function of (plan, cases, epoch); a stream's cases are its epoch's pool."""
        plan = self.plan
        if self.stream is not None:
            self.train_data = self.stream.pool(epoch)
        sampler = PatchSampler(self.train_data, plan.patch_size, plan.foreground_fraction)
        rng = np.random.default_rng(_epoch_seed(plan.seed, epoch, 0))
        self.augment.set_random_state(seed=_epoch_seed(plan.seed, epoch, 1) % (2**32))
        remaining = plan.iterations_per_epoch
        while remaining > 0:
            size = min(plan.batch_size, remaining)
            remaining -= size
            images, labels = [], []
            for _ in range(size):
                image, label = sampler.sample(rng)
                item = self.augment({"image": image, "label": label})
                images.append(_tensor(item["image"]))
                labels.append((_tensor(item["label"]) > 0.5).float())
            yield torch.stack(images), torch.stack(labels)

    def _prox_term(self, global_params: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, param in self.model.named_parameters():
            if name in global_params:
                total = total + (param - global_params[name]).pow(2).sum()
        return total

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, *, global_params=None, prox_mu=0.0) -> float:
        self.model.train()
        images, labels = images.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits = self.model(images)
        loss = self.loss_fn(logits.float(), labels)
        if prox_mu > 0 and global_params:
            loss = loss + 0.5 * prox_mu * self._prox_term(global_params)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def train(
        self,
        weights: Mapping[str, np.ndarray] | None = None,
        epochs: int = 1,
        *,
        global_weights: Mapping[str, np.ndarray] | None = None,
        prox_mu: float = 0.0,
    ) -> LocalUpdate:
        """Load `weights` (if given), train `epochs` local epochs, return the new weights.

        With `prox_mu > 0` the loss adds (μ/2)‖w − w_global‖² over the parameters named in `global_weights`
        (default: `weights`, the round's starting point).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an integer ≥ 1, got {epochs!r}")
        if not (prox_mu >= 0 and math.isfinite(prox_mu)):
            raise ValueError(f"prox_mu must be a finite number ≥ 0, got {prox_mu!r}")
        if weights is not None:
            self.set_weights(weights)
        global_params = None
        if prox_mu > 0:
            reference = global_weights if global_weights is not None else weights
            if reference is None:
                reference = self.get_weights()
            params = dict(self.model.named_parameters())
            global_params = {
                name: torch.as_tensor(np.asarray(value), dtype=params[name].dtype, device=self.device)
                for name, value in reference.items() if name in params
            }
        losses: list[float] = []
        started = time.perf_counter()
        for _ in range(epochs):
            epoch_losses = []
            bar = tqdm(
                self.batches(self.epoch), total=self.plan.steps_per_epoch, file=sys.stderr, unit="step",
                desc=f"epoch {self.epoch + 1}", disable=not self.progress, leave=False,
            )
            for images, labels in bar:
                loss = self.train_step(images, labels, global_params=global_params, prox_mu=prox_mu)
                if not math.isfinite(loss):
                    raise ValueError(f"training diverged: loss is {loss} in epoch {self.epoch + 1}")
                epoch_losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
            self.epoch += 1
            losses.append(float(np.mean(epoch_losses)))
        seconds = time.perf_counter() - started
        metrics = {
            "train_loss": losses[-1],
            "train_losses": losses,
            "epochs": epochs,
            "epoch": self.epoch,
            "steps": epochs * self.plan.steps_per_epoch,
            "patches": epochs * self.plan.iterations_per_epoch,
            "seconds": seconds,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        return LocalUpdate(weights=self.get_weights(), n_cases=len(self.train_data), metrics=metrics)

    # -- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, case: PreparedCase) -> np.ndarray:
        """Probabilities on the preprocessed grid (sliding windows, Gaussian, `plan.val_overlap`).

        A batch-normalized network is window-invariant, so it runs windows as large as the node's engine does (up to
        `VAL_WINDOW` per axis, usually the whole grid): validation then scores what the node will output.
        """
        self.model.eval()
        image = torch.as_tensor(case.image[None]).to(self.device)
        roi = self.plan.patch_size
        if self.plan.network.norm is Norm.BATCH:
            divisible = self.plan.network.size_divisible
            roi = tuple(min(-(-n // divisible) * divisible, VAL_WINDOW) for n in case.image.shape[1:])
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits = sliding_window_inference(
                image, roi_size=roi, sw_batch_size=1, predictor=self.model, overlap=self.plan.val_overlap,
                mode="gaussian",
            )
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        return torch.sigmoid(logits.float())[0, 0].cpu().numpy()

    def evaluate(self, weights: Mapping[str, np.ndarray] | None = None, *,
                 thresholds: Sequence[float] = ()) -> dict[str, Any]:
        """Mean ISLES'22 metrics over the validation cases ({} without any) at the plan's threshold, and with
        `thresholds` the mean Dice at each of them ("dice_by_threshold", from the same predictions); per-case rows
        under "cases"."""
        if weights is not None:
            self.set_weights(weights)
        if not self.val_data:
            return {}
        rows, dice_rows = [], []
        for case in self.val_data:
            probabilities = to_source(self.predict(case), case.preprocessed)
            metrics = compute_metrics(probabilities >= self.plan.threshold, case.source_mask, case.voxel_ml)
            rows.append({"case_id": case.case_id, **{name: float(getattr(metrics, name)) for name in VAL_METRICS}})
            dice_rows.append(dice_at_thresholds(probabilities, case.source_mask, thresholds))
        out: dict[str, Any] = {f"val_{name}": float(np.mean([row[name] for row in rows])) for name in VAL_METRICS}
        out["n_val_cases"] = len(rows)
        if thresholds:
            out["dice_by_threshold"] = dict(zip(map(float, thresholds), np.mean(dice_rows, axis=0).tolist()))
        out["cases"] = rows
        return out

    def calibrate_threshold(
        self, candidates: Sequence[float] = THRESHOLD_CANDIDATES
    ) -> tuple[float, dict[float, dict[str, float]]]:
        """The threshold with the best mean validation Dice on the source grids (`calibration.best_threshold`: ties
        go to the candidate nearest the plan's), and the mean validation metrics at every candidate."""
        if not self.val_data:
            raise ValueError("calibrating a threshold needs validation cases")
        if not candidates or not all(0.0 < t < 1.0 for t in candidates):
            raise ValueError(f"threshold candidates must lie in (0, 1), got {list(candidates)}")
        cases = [(to_source(self.predict(case), case.preprocessed), case) for case in self.val_data]
        metrics: dict[float, dict[str, float]] = {}
        for threshold in candidates:
            scored = [compute_metrics(p >= threshold, case.source_mask, case.voxel_ml) for p, case in cases]
            metrics[float(threshold)] = {
                name: float(np.mean([getattr(m, name) for m in scored])) for name in VAL_METRICS
            }
        best = best_threshold({t: values["dice"] for t, values in metrics.items()}, self.plan.threshold)
        return best, metrics

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(
        self, path: str | Path, *, federated_round: int | None = None, strategy: str | None = None,
        threshold: float | None = None,
    ) -> Path:
        return save_checkpoint(
            path, plan=self.plan, epoch=self.epoch, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), history=self.history,
            best_val_dice=self.best_val_dice, federated_round=federated_round, strategy=strategy,
            threshold=threshold,
        )

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, epoch counter, history, best Dice."""
        saved = checkpoint_plan(state)
        if _without_epochs(saved) != _without_epochs(self.plan):
            raise ValueError("the checkpoint was trained with a different plan (only --epochs may change on resume)")
        self.model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [dict(row) for row in state["history"]]
        self.best_val_dice = state["best_val_dice"]


def _without_epochs(plan: TrainingPlan) -> dict[str, Any]:
    data = plan.to_dict()
    data.pop("epochs")
    return data


CSV_FIELDS = ("epoch", "train_loss", "val_dice", "val_avd_ml", "val_lf1", "lr", "seconds")


def write_metrics_csv(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in CSV_FIELDS})


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(8, 3.5))
    loss_axes, dice_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="train loss (Dice + CE)", title="loss")
    val = [(row["epoch"], row["val_dice"]) for row in history if row.get("val_dice") is not None]
    if val:
        dice_axes.plot(*zip(*val), marker="o", color="tab:green")
    dice_axes.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice", ylim=(0, 1))
    for axes in (loss_axes, dice_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def train_model(
    plan: TrainingPlan,
    train_cases: Iterable[CaseLike] | CaseStream,
    val_cases: Iterable[CaseLike] | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Train `plan.epochs` epochs on one site; checkpoint every epoch. Returns best.pt (by validation Dice) when
    there are validation cases, else last.pt. `out_dir` also gets metrics.csv and curves.png. At the end best.pt
    gets the threshold calibrated on the validation cases (`LocalTrainer.calibrate_threshold`), which export puts in
    the manifest, and threshold.csv the validation Dice at every candidate."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best = out / "last.pt", out / "best.pt"
    trainer = LocalTrainer(plan, train_cases, val_cases, device, progress=progress)
    if resume:
        trainer.restore(load_checkpoint(last))
        if best.exists() and trainer.val_data:
            trainer.best_val_dice = _rescore(trainer, best)
    elif last.exists():
        raise ValueError(f"{last} exists: pass --resume to continue it, or choose another --out")
    bar = tqdm(total=plan.epochs, initial=trainer.epoch, file=sys.stderr, unit="epoch", desc="train",
               disable=not progress)
    while trainer.epoch < plan.epochs:
        update = trainer.train(None, 1)
        row: dict[str, Any] = {
            "epoch": trainer.epoch, "train_loss": update.metrics["train_loss"], "val_dice": None,
            "val_avd_ml": None, "val_lf1": None, "lr": update.metrics["lr"], "seconds": update.metrics["seconds"],
        }
        if trainer.val_data:
            started = time.perf_counter()
            val = trainer.evaluate()
            row.update({key: val[key] for key in ("val_dice", "val_avd_ml", "val_lf1")})
            row["seconds"] += time.perf_counter() - started
        trainer.history.append(row)
        improved = row["val_dice"] is not None and (
            trainer.best_val_dice is None or row["val_dice"] > trainer.best_val_dice
        )
        if improved:
            trainer.best_val_dice = row["val_dice"]
        trainer.save(last)
        if improved:
            trainer.save(best)
        write_metrics_csv(trainer.history, out / "metrics.csv")
        plot_curves(trainer.history, out / "curves.png")
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}",
                        dice="-" if row["val_dice"] is None else f"{row['val_dice']:.3f}")
    bar.close()
    if not last.exists():  # resumed a finished run with nothing left to do
        trainer.save(last)
    if not best.exists():
        return last
    calibrate_checkpoint(trainer, best, out / "threshold.csv")
    return best


def _rescore(trainer: LocalTrainer, checkpoint: Path) -> float:
    """`checkpoint`'s validation Dice on the trainer's validation cases, the trainer's weights left as they were. A
    resumed run may validate on other cases than before (a changed generator, another --val-cases), and the old
    best's Dice on the old cases must not keep it the best."""
    current = trainer.get_weights()
    score = trainer.evaluate(load_checkpoint(checkpoint)["model"])["val_dice"]
    trainer.set_weights(current)
    return float(score)


def calibrate_checkpoint(trainer: LocalTrainer, checkpoint: Path, report: Path) -> float:
    """Load `checkpoint`'s weights into `trainer`, calibrate its threshold on the validation cases and save it back
    with the threshold and a last history row of the validation metrics at it (what export puts in the manifest);
    `report` gets the validation metrics at every candidate."""
    state = load_checkpoint(checkpoint)
    trainer.model.load_state_dict(state["model"])
    threshold, metrics = trainer.calibrate_threshold()
    row = {"epoch": int(state["epoch"]), "threshold": threshold,
           **{f"val_{name}": value for name, value in metrics[threshold].items()}}
    history = [entry for entry in state["history"] if "threshold" not in entry]  # a resumed run calibrates anew
    save_checkpoint(
        checkpoint, plan=trainer.plan, epoch=int(state["epoch"]), model=state["model"], optimizer=state["optimizer"],
        scheduler=state["scheduler"], history=[*history, row], best_val_dice=state["best_val_dice"],
        federated_round=state["federated_round"], strategy=state["strategy"], threshold=threshold,
    )
    with open(report, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["threshold", *(f"val_{name}" for name in VAL_METRICS), "chosen"])
        for candidate, values in metrics.items():
            writer.writerow([candidate, *(values[name] for name in VAL_METRICS), int(candidate == threshold)])
    return threshold


__all__ = ["LocalTrainer", "LocalUpdate", "build_augmentation", "calibrate_checkpoint", "resolve_device", "train_model"]
