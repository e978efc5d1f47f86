"""The ONNX Runtime engine: one session per verified model package, probabilities on the source grid.

Torch-free. The package's bytes (read and hashed once by `models.package`) go straight into the session. Inputs go
through the one preprocessing (`models.preprocessing`) and the preprocessed grid is padded to a multiple of
`size_divisible`. Which windows a model may run depends on its normalization layers, which the manifest records:
- batch normalization (a fixed affine map at inference): any window gives the model's own output, so a volume that
  fits the voxel budget runs in one pass and a larger one in the fewest windows within the budget;
- instance normalization, or a package that does not say: a window's statistics shape the output (Dice 0.934
  between a whole-volume pass and MONAI's windows on the ISLES case, 0.34 between two window sizes on the MS test
  case), so it runs the manifest's patch, what it was trained and validated on. `window_voxels` opts such a model
  into larger windows where it is known to tolerate them.
Windows overlap and are blended with a Gaussian importance map (nnU-Net/MONAI style). Optional flip TTA averages the
probabilities of all eight mirrorings, each flipped back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.package import LoadedPackage
from models.preprocessing import Channel, PreprocessedCase, preprocess, to_source

LOG = logging.getLogger(__name__)

# Execution providers in order of preference; the first available wins, CPU always closes the list.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
# The largest grid that runs in one pass (and the most voxels a batched run takes). A 5.7 M-parameter DynUNet on an
# ISLES grid (112×112×80) peaks at 0.9 GB RSS on the CPU; a 3.2 M-voxel window of the MS default at 2.3 GB.
WHOLE_VOLUME_VOXELS = 160 * 160 * 128
# Flip TTA: every subset of the three axes, the identity first (nnU-Net's mirroring).
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    axes for count in range(4) for axes in itertools.combinations((0, 1, 2), count)
)


def choose_providers(available: Sequence[str]) -> list[str]:
    """The preferred providers among `available` (onnxruntime.get_available_providers()), CPU always last."""
    chosen = [name for name in PROVIDER_PREFERENCE if name in available and name != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def provider_options(provider: str, *, device_id: int = 0) -> dict[str, str]:
    """ONNX Runtime options for one provider.

    cuDNN's exhaustive algorithm search reruns for every new input shape, and a node sees a new grid per study, so
    CUDA uses the heuristic; its arena grows by what is asked, not by doubling, so a whole-volume pass does not
    reserve twice its size. TensorRT stays fp32: no manifest field allows half precision, and a package is run
    as it was parity-checked.
    """
    if provider == "CUDAExecutionProvider":
        return {
            "device_id": str(device_id),
            "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested",
        }
    if provider == "TensorrtExecutionProvider":
        return {"device_id": str(device_id), "trt_fp16_enable": "False"}
    return {}


def physical_cores() -> int:
    """Cores (not SMT siblings) this process may run on: convolutions gain nothing from a core's second thread."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def session_options(threads: int | None) -> Any:
    """CPU tuning: `threads` intra-op threads (0 or None: the physical cores), one inter-op thread and sequential
    execution (a U-Net is a chain: parallel branches would only compete for the same cores), every graph
    optimization (Conv+activation fusion, constant folding, layout) and the memory pattern planner (windows repeat
    one shape, so one planned block serves run after run). No CPU memory arena: it grows by doubling and never
    returns memory, so after one whole-volume pass each session held several hundred MiB it no longer used (node
    tree peak PSS 1525 → 848 MiB with both models, benchmarks/turnaround.py), and the allocator is not where the
    time goes (stroke turnaround unchanged)."""
    import onnxruntime

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be an integer ≥ 0, got {threads!r}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = True
    return options


# glibc's mallopt(M_MMAP_THRESHOLD): allocations of at least this many bytes get their own mapping, unmapped on free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 << 20


def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 16 MiB for this process; True where it took effect (glibc only).

    By default glibc raises the threshold up to 32 MiB each time a mapped block is freed, so after the first study
    a job's volumes, probability maps and ORT buffers come from the heaps of the threads that allocated them and
    stay there as free but resident memory, which the next job's threads do not reuse: the node tree's peak PSS in
    benchmarks/turnaround.py went from 949 to 865 MiB with two receiver processes, turnaround unchanged.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # no C library found, or one without mallopt (musl)
        return False


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Weights that trust a window's centre more than its edges; never zero, so every voxel gets a value."""
    axes = []
    for n in patch_size:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window origins along one axis: stride patch·(1 − overlap), the last window flush with the end."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, stride))
    return [*starts, size - patch]


def window_size(
    grid: Sequence[int], patch: Sequence[int], divisible: int, budget: int, overlap: float
) -> tuple[int, int, int]:
    """The window that covers `grid` with the fewest voxel-passes (windows × window voxels) within `budget` voxels.

    Never smaller than the manifest's patch (what the network was trained on) nor larger than the grid; sides are
    multiples of `divisible` so the network's strides fit. The whole grid when it fits the budget.
    """
    grid = tuple(int(n) for n in grid)
    if math.prod(grid) <= budget:
        return grid  # type: ignore[return-value]
    floor = tuple(min(p, g) for p, g in zip(patch, grid))
    sides = [sorted({*range(f, g + 1, divisible), f}) for f, g in zip(floor, grid)]

    def cost(size: tuple[int, ...]) -> tuple[int, int]:
        windows = math.prod(len(window_starts(g, s, overlap)) for g, s in zip(grid, size))
        return windows * math.prod(size), windows

    fitting = [size for size in itertools.product(*sides) if math.prod(size) <= budget]
    return min(fitting, key=cost) if fitting else floor  # type: ignore[return-value]


@dataclass(frozen=True)
class Prediction:
    """Probabilities on the source grid (first channel's voxel order and affine) and the case they came from.

    `windows` is how many windows covered the grid (1: a whole-volume pass); each ran `flips` times (TTA).
    """

    probabilities: np.ndarray
    case: PreprocessedCase
    windows: int
    flips: int = 1

    @property
    def passes(self) -> int:
        return self.windows * self.flips


@dataclass(frozen=True)
class GridPrediction:
    """Probabilities on the preprocessed grid, and how they were computed."""

    probabilities: np.ndarray
    window: tuple[int, int, int]
    windows: int
    flips: int
    runs: int  # session.run calls (windows × flips ÷ batch, rounded up)


class Engine:
    """A loaded package ready to segment: `predict(channels)` → probabilities on the source grid."""

    def __init__(
        self,
        package: LoadedPackage,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        overlap: float = 0.5,
        whole_volume_voxels: int = WHOLE_VOLUME_VOXELS,
        window_voxels: int | None = None,
        flip_tta: bool = False,
    ) -> None:
        import onnxruntime

        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if isinstance(whole_volume_voxels, bool) or not isinstance(whole_volume_voxels, int) or whole_volume_voxels < 0:
            raise ValueError(f"whole_volume_voxels must be an integer ≥ 0, got {whole_volume_voxels!r}")
        if window_voxels is not None and (
            isinstance(window_voxels, bool) or not isinstance(window_voxels, int) or window_voxels < 1
        ):
            raise ValueError(f"window_voxels must be None or an integer ≥ 1, got {window_voxels!r}")
        self.package = package
        self.manifest = package.manifest
        self.overlap = overlap
        self.whole_volume_voxels = whole_volume_voxels
        self.window_voxels = window_voxels
        self.flip_tta = bool(flip_tta)
        self.session_options = session_options(threads)
        chosen = list(providers) if providers else choose_providers(onnxruntime.get_available_providers())
        self.session = onnxruntime.InferenceSession(
            package.onnx_bytes,
            self.session_options,
            providers=[(name, provider_options(name)) for name in chosen],
        )
        self.providers: list[str] = self.session.get_providers()
        # IO binding keeps the output on the device until one copy back; only where a GPU provider leads.
        self.io_binding = self.providers[0] in GPU_PROVIDERS
        # The exporter fixes the batch at 1; a graph with a symbolic batch axis takes several windows per run.
        self.batched = not isinstance(self.session.get_inputs()[0].shape[0], int)
        LOG.info("model %s v%d: %s", self.manifest.task.value, self.manifest.version, self._summary())

    @property
    def window_budget(self) -> int:
        """The most voxels one window may have: explicit, else the whole-volume budget for a window-invariant model
        and 0 (the manifest's patch) for one whose output depends on the window."""
        if self.window_voxels is not None:
            return self.window_voxels
        return self.whole_volume_voxels if self.manifest.window_invariant else 0

    def _summary(self) -> str:
        return (
            f"{', '.join(self.providers)}; {self.session_options.intra_op_num_threads} intra-op threads; "
            f"{'batched windows' if self.batched else 'one window per run'}"
            f"{'; IO binding' if self.io_binding else ''}{'; flip TTA' if self.flip_tta else ''}"
        )

    def describe(self) -> dict[str, Any]:
        """What the web page and /metrics show about how this model runs."""
        return {
            "task": self.manifest.task.value,
            "version": self.manifest.version,
            "providers": list(self.providers),
            "threads": self.session_options.intra_op_num_threads,
            "window_invariant": self.manifest.window_invariant,
            "window_budget_voxels": self.window_budget,
            "overlap": self.overlap,
            "batched_windows": self.batched,
            "io_binding": self.io_binding,
            "flip_tta": self.flip_tta,
        }

    def predict(self, channels: Sequence[Channel]) -> Prediction:
        expected = [channel.name for channel in self.manifest.inputs]
        if [channel.name for channel in channels] != expected:
            raise ValueError(f"model expects channels {expected}, got {[channel.name for channel in channels]}")
        case = preprocess(channels, self.manifest.preprocessing)
        grid = self.predict_grid(case.image)
        return Prediction(to_source(grid.probabilities, case), case, grid.windows, grid.flips)

    def predict_grid(self, image: np.ndarray) -> GridPrediction:
        """Probabilities for a preprocessed (C, X, Y, Z) image on its own grid."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4:
            raise ValueError(f"image must be (channels, x, y, z), got shape {image.shape}")
        spatial = image.shape[1:]
        pre = self.manifest.preprocessing
        window = window_size(spatial, pre.patch_size, pre.size_divisible, self.window_budget, self.overlap)
        budget = max(self.window_budget, math.prod(window))
        flips = FLIPS if self.flip_tta else FLIPS[:1]
        batch = max(1, budget // math.prod(window)) if self.batched else 1
        origins = list(itertools.product(*(window_starts(n, w, self.overlap) for n, w in zip(spatial, window))))
        regions = [tuple(slice(o, o + w) for o, w in zip(origin, window)) for origin in origins]
        if len(regions) == 1:  # whole volume (or a window the size of the grid): no blending needed
            total, runs = self._flip_mean(image[None], flips, batch)
            return GridPrediction(total[0], window, 1, len(flips), runs)
        importance = gaussian_importance(window)
        total = np.zeros(spatial, np.float32)
        weight = np.zeros(spatial, np.float32)
        runs = 0
        for group in _chunks(regions, batch):
            tiles = np.stack([image[(slice(None), *region)] for region in group])
            probabilities, count = self._flip_mean(tiles, flips, batch)
            runs += count
            for region, tile in zip(group, probabilities):
                tile *= importance
                total[region] += tile
                weight[region] += importance
        total /= weight
        return GridPrediction(total, window, len(regions), len(flips), runs)

    def _flip_mean(
        self, tiles: np.ndarray, flips: Sequence[tuple[int, ...]], batch: int
    ) -> tuple[np.ndarray, int]:
        """Mean probabilities of `tiles` (N, C, X, Y, Z) over `flips` (spatial axes), each flipped back.

        Flipped copies are made a batch at a time, so TTA costs no more memory than one run.
        """
        total = np.zeros((len(tiles), *tiles.shape[2:]), np.float32)
        pairs = [(axes, index) for axes in flips for index in range(len(tiles))]
        runs = 0
        for group in _chunks(pairs, batch):
            inputs = [np.flip(tiles[index], [a + 1 for a in axes]) for axes, index in group]
            outputs = self._run(np.stack(inputs) if len(inputs) > 1 else inputs[0][None])
            runs += 1
            for (axes, index), output in zip(group, outputs):
                total[index] += np.flip(output, axes)
        if len(flips) > 1:
            total /= len(flips)
        return total, runs

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, X, Y, Z) → (N, X, Y, Z) probabilities of the first output channel."""
        spec = self.manifest.onnx
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(spec.input_name, np.ascontiguousarray(batch))
            binding.bind_output(spec.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            (output,) = binding.copy_outputs_to_cpu()
        else:
            (output,) = self.session.run([spec.output_name], {spec.input_name: np.ascontiguousarray(batch)})
        return output[:, 0]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
