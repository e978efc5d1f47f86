"""Fresh domain-randomised training volumes as training goes: `--data synthetic-stream:P[:seed=S][:workers=W]`.

SynthSeg and SynthStroke train on a new random volume at every step; a CPU cannot draw a volume per step, so each
epoch gets a pool of P new volumes (`training.synthetic.randomized`), drawn and preprocessed in W worker processes
while the previous epoch trains. Volume i of epoch e comes from `derived_seed(seed, e, i)`, so a resumed run sees
what a straight run would have. Validation, checkpoint choice and threshold calibration use a fixed seeded set from
the same generator, on seeds no epoch ever draws. `synthetic:N` keeps its meaning (N fixed phantoms), since
federated case counts rely on it.

Torch-free: the workers import only numpy, scipy, nibabel and this package's torch-free modules.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

from models.manifest import Preprocessing, Task, default_inputs
from models.preprocessing import Channel
from models.processes import die_with_parent
from training.datasets import TrainingCase, parse_counted_spec
from training.patches import PreparedCase, prepare_case
from training.synthetic import derived_seed
from training.synthetic.randomized import draw_training_case

VALIDATION_STREAM = 2**31 - 1  # an "epoch" no run reaches: validation seeds never meet training seeds
_IMAGE_OF_CHANNEL = {"dwi": "dwi_b1000", "adc": "adc", "flair": "flair"}


@dataclass(frozen=True)
class SyntheticStreamSpec:
    """`synthetic-stream:P[:seed=S][:workers=W]`: P fresh volumes per epoch, drawn by W processes (default 1)."""

    pool: int
    seed: int | None = None
    workers: int = 1

    PREFIX = "synthetic-stream:"

    @classmethod
    def parse(cls, spec: str) -> SyntheticStreamSpec | None:
        """The spec's parts, None when `spec` is not a stream; ValueError naming the bad part."""
        parsed = parse_counted_spec(spec, cls.PREFIX, "P", ("seed", "workers"))
        if parsed is None:
            return None
        if parsed[1].get("workers", 1) < 1:
            raise ValueError(f"--data {spec}: workers must be at least 1")
        return cls(parsed[0], **parsed[1])


def randomized_case(task: Task | str, seed: int, spacing_mm: float) -> TrainingCase:
    """One domain-randomised volume as a training case, channels in the task's network order."""
    task = Task(task)
    case = draw_training_case("stroke" if task is Task.STROKE_DWI_ADC else "ms", seed, spacing_mm)
    channels = [Channel(case.images[_IMAGE_OF_CHANNEL[channel.name]], case.affine, channel.name)
                for channel in default_inputs(task)]
    return TrainingCase(case.case_id, channels, case.mask, None)


def validation_cases(task: Task | str, count: int, seed: int, preprocessing: Preprocessing) -> list[TrainingCase]:
    """The fixed validation set: `count` volumes on seeds no training epoch draws."""
    spacing = _isotropic(preprocessing)
    return [randomized_case(task, derived_seed(seed, VALIDATION_STREAM, index), spacing) for index in range(count)]


def _prepared(task: str, seed: int, preprocessing: Preprocessing) -> PreparedCase:
    return prepare_case(randomized_case(task, seed, _isotropic(preprocessing)), preprocessing)


def _isotropic(preprocessing: Preprocessing) -> float:
    spacing = tuple(float(v) for v in preprocessing.target_spacing_mm)
    if len(set(spacing)) != 1:
        raise ValueError(f"a synthetic stream needs an isotropic target spacing, the plan has {list(spacing)}")
    return spacing[0]


class CaseStream:
    """One pool of prepared volumes per epoch; the next epoch's pool is drawn while this one trains."""

    def __init__(self, task: Task | str, spec: SyntheticStreamSpec, seed: int, preprocessing: Preprocessing):
        self.task = Task(task)
        self.spec = spec
        self.seed = seed if spec.seed is None else spec.seed
        self.preprocessing = preprocessing
        _isotropic(preprocessing)
        # spawn: the trainer's process holds torch's thread pools, which a forked child must not inherit; the
        # workers end with the trainer, so a killed run leaves no process drawing volumes for nobody.
        self._executor = ProcessPoolExecutor(spec.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=die_with_parent)
        self._next: tuple[int, list[Future]] | None = None  # the pool being drawn ahead: (epoch, futures)
        self.drawn = 0
        self.draw_seconds = 0.0  # wall time spent waiting for pools, summed over epochs

    def pool(self, epoch: int) -> list[PreparedCase]:
        """Epoch `epoch`'s volumes (a pure function of seed, epoch and P); starts drawing the next epoch's."""
        started = time.perf_counter()
        if self._next is not None and self._next[0] == epoch:
            futures = self._next[1]
        else:  # the first epoch of a run, or an epoch out of order: what was drawn ahead is not needed
            for future in self._next[1] if self._next else []:
                future.cancel()
            futures = self._submit(epoch)
        self._next = (epoch + 1, self._submit(epoch + 1))
        cases = [future.result() for future in futures]
        self.draw_seconds += time.perf_counter() - started
        self.drawn += len(cases)
        return cases

    def _submit(self, epoch: int) -> list[Future]:
        seeds = [derived_seed(self.seed, epoch, index) for index in range(self.spec.pool)]
        return [self._executor.submit(_prepared, self.task.value, seed, self.preprocessing) for seed in seeds]

    def report(self, elapsed_s: float) -> str:
        """Volumes per second over the run and the share of it spent waiting for them (the rest overlapped)."""
        rate = self.drawn / elapsed_s if elapsed_s > 0 else 0.0
        return (f"synthetic stream: {self.drawn} volumes, {rate:.2f} volumes/s; training waited "
                f"{self.draw_seconds:.0f} s of {elapsed_s:.0f} s for them")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> CaseStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CaseStream", "SyntheticStreamSpec", "randomized_case", "validation_cases"]
