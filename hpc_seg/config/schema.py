"""Config schema: one dataclass per YAML section.

A YAML file may start with ``base: other.yaml`` (path relative to the file, or a name inside
``configs/``); the file's own keys are laid over the base, section by section. Every stage reads the same
``Config``. A section's ``RENAMED`` maps a key's former name to its name; the loader reads the
former name for one version with a warning (``hpc_seg.config.loader``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional


@dataclass
class AugmentConfig:
    """On-the-fly CPU augmentation of training samples (validation is never augmented)."""

    enabled: bool = True
    flip: bool = True  # random left-right and up-down flips
    rotate_deg: float = 10.0  # uniform in [-rotate_deg, rotate_deg]
    scale: float = 0.1  # zoom factor uniform in [1 - scale, 1 + scale]
    intensity: float = 0.1  # brightness/contrast jitter on the normalised image
    p: float = 0.5  # probability of applying the spatial transform

    def check(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment.p must be in [0, 1], got {self.p}")
        if self.rotate_deg < 0 or self.scale < 0 or self.intensity < 0:
            raise ValueError("augment.rotate_deg, scale and intensity must be >= 0")


@dataclass
class SourceConfig:
    """Another source prepared into the same store (``data.extra_sources``): a dataset kind of the
    same task whose classes are a subset of the store's (e.g. ``totalseg`` liver-only CTs in a
    LiTS store); its cases record the classes they annotate (``hpc_seg.preprocessing.labels``)."""

    RENAMED: ClassVar[dict] = {"dataset": "kind"}

    kind: str
    path: str


@dataclass
class DataConfig:
    """Where the data lives and how samples are cut from it.

    ``mode``: ``2d`` (one slice), ``2.5d`` (``slices`` adjacent slices as channels) or ``3d``
    (patches of ``patch_depth`` slices). ``window`` is the HU window [low, high] applied before
    normalisation (CT only; RGB images are scaled by ``rgb_mean``/``rgb_std``). ``window``,
    ``normalize`` and ``rgb_mean``/``rgb_std`` left unset take the dataset kind's defaults; the
    values in force are recorded in the run's preprocessing plan (``RUN_DIR/plan.json``).
    ``store`` may be ``s3://…`` (credentials and endpoint from the AWS environment variables,
    ``hpc_seg.storage.location``); ``cache`` then keeps fetched shards on local disk.
    """

    RENAMED: ClassVar[dict] = {"dataset": "kind"}

    store: str = "outputs/phantom.zarr"  # a local path or an object-store URL (s3://bucket/path.zarr)
    cache: Optional[str] = None  # object stores: local directory caching whole shards (one GET per shard)
    kind: str = "phantom"  # a registered dataset kind (hpc-seg prepare --help lists them)
    source: Optional[str] = None  # raw data that 'hpc-seg train' prepares when ``store`` is absent
    extra_sources: list[SourceConfig] = field(default_factory=list)  # more sources into the same store
    split_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    mode: Literal["2d", "2.5d", "3d"] = "2.5d"
    slices: int = 3
    patch_depth: int = 32
    size: list[int] = field(default_factory=lambda: [256, 256])
    window: Optional[list[float]] = None  # None: the kind's default (lits/phantom [-100, 400])
    normalize: Optional[Literal["minmax", "zscore", "rgb"]] = None  # None: the kind's default
    rgb_mean: Optional[list[float]] = None  # None: the kind's default (Kvasir: ImageNet)
    rgb_std: Optional[list[float]] = None
    oversample: float = 0.33  # probability that a sample is redrawn from a foreground slice
    oversample_class: str | int = "tumour"  # class whose slices are preferred (a name); not in the store: any fg
    batch_size: int = 8
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Samples cut around these classes' 3D box (a cascade's stage 2); empty: whole slices
    crop_around: list[str] = field(default_factory=list)
    crop_margin: float = 0.15  # added on each side, as a fraction of the box's extent per axis (no mm: spacing-free)
    crop_jitter: float = 0.1  # training: each box edge moved by up to this fraction of the extent

    def check(self) -> None:
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"data.size must be [H, W] with H, W >= 8, got {self.size}")
        if self.window is not None and (len(self.window) != 2 or self.window[0] >= self.window[1]):
            raise ValueError(f"data.window must be [low, high] with low < high, got {self.window}")
        if self.mode == "2.5d" and (self.slices < 1 or self.slices % 2 == 0):
            raise ValueError(f"data.slices must be odd and >= 1 for 2.5d, got {self.slices}")
        if not 0.0 <= self.oversample <= 1.0:
            raise ValueError(f"data.oversample must be in [0, 1], got {self.oversample}")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1 and both >= 0")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")
        if self.crop_margin < 0 or self.crop_jitter < 0:
            raise ValueError("data.crop_margin and data.crop_jitter must be >= 0")
        if self.crop_around and self.mode == "3d":
            raise ValueError("data.crop_around cuts 2d/2.5d samples; data.mode 3d has no crop")


@dataclass
class ModelConfig:
    """Which architecture (``hpc_seg.models`` registry name) at which size, plus overrides."""

    name: Literal["unetpp", "unet_aspp", "transunet"] = "unet_aspp"
    size: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 12, attention: true}
    pretrained: Optional[str] = None  # local weights file (npz/pt); never downloaded


@dataclass
class LossConfig:
    """``dice_weight * soft Dice + ce_weight * CE`` (paper: 0.3 / 0.7)."""

    kind: Literal["dice_ce", "jaccard_ce", "bce_dice"] = "dice_ce"
    dice_weight: float = 0.3
    ce_weight: float = 0.7
    smooth: float = 1e-5
    class_weights: Optional[list[float]] = None

    def check(self) -> None:
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")


@dataclass
class TrainConfig:
    """Optimisation and the training loop. ``max_steps`` counts optimizer steps (after gradient
    accumulation); the per-rank micro-batch is ``data.batch_size``."""

    max_steps: int = 200
    max_minutes: Optional[float] = None  # also stop after this much training wall-clock; the schedule ends on it
    seed: int = 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "warmup_poly", "warmup_cosine"] = "warmup_cosine"
    warmup_steps: int = 10
    poly_power: float = 0.9
    min_lr_ratio: float = 0.01
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables
    activation_checkpointing: bool = False
    processes: int = 1  # ranks `hpc-seg train` starts on this machine (torchrun/srun launches ignore it)
    channels_last: bool = False  # 2D inputs in NHWC memory order: ~1.25x faster convolutions on CPU (oneDNN)
    val_every_steps: int = 0  # 0: validate once per epoch and at the end
    val_max_cases: Optional[int] = None
    log_every_steps: int = 10
    deterministic: bool = False  # torch deterministic algorithms (docs/gpu.md: what stays nondeterministic on CUDA)
    tf32: bool = True  # fp32 matmuls/convolutions in TF32 on Ampere+ GPUs (float32_matmul_precision "high")
    max_bad_steps: int = 5  # fp32/bf16: stop after this many consecutive non-finite losses
    tensorboard: bool = False

    def check(self) -> None:
        if self.processes < 1:
            raise ValueError(f"train.processes must be >= 1, got {self.processes}")
        if self.max_steps < 1 or self.grad_accum < 1 or self.lr <= 0:
            raise ValueError("train.max_steps and train.grad_accum must be >= 1 and train.lr > 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"train.max_minutes must be > 0 (or null: no time budget), got {self.max_minutes}")
        if len(self.betas) != 2:
            raise ValueError("train.betas must have two values")


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints under ``RUN_DIR/checkpoints/step<N>``."""

    every_steps: int = 100  # 0: only at the end, at epoch ends and on signals
    at_epoch_end: bool = False
    keep_last: int = 2  # plus the best one (validation mean IoU)
    verify: Literal["size", "sha256"] = "sha256"  # how resume checks a checkpoint's files

    def check(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed JSON is generated from these keys (``hpc-seg train --print-ds-config``)."""

    zero_stage: int = 0
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    offload_optimizer: bool = False  # ZeRO-Offload (CUDA + DeepSpeedCPUAdam)
    offload_param: bool = False  # ZeRO-3 parameter offload
    loss_scale: float = 0.0  # fp16: 0 = dynamic loss scaling
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    reduce_bucket_size: int = 50_000_000
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default for the stage (True for ZeRO-3, else False)
    comm_timeout_s: int = 1800  # a collective waiting longer (dead or hung peer) fails the step instead of hanging
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated JSON last

    def check(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs zero_stage 3")
        if self.comm_timeout_s < 1:
            raise ValueError(f"deepspeed.comm_timeout_s must be >= 1, got {self.comm_timeout_s}")


@dataclass
class SlurmConfig:
    """The cluster request (``launch/submit.py``); site defaults come from the site profile (``hpc-seg submit --help``).

    One task per GPU: ``tasks_per_node`` equals ``gpus_per_node`` on GPU partitions.
    """

    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 2
    mem: Optional[str] = None  # e.g. "64G"
    time: str = "01:00:00"  # [D-]HH:MM:SS
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (modules, venv)
    extra: dict[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {reservation: x}
    max_requeues: int = 3  # preemptions/timeouts survived before the job gives up
    signal_delay_s: int = 90  # USR2 this many seconds before the time limit
    array_parallelism: int = 32
    node_local_paths: list[str] = field(default_factory=lambda: ["/tmp", "/dev/shm", "/var/tmp"])

    def check(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1 or self.cpus_per_task < 1 or self.gpus_per_node < 0:
            raise ValueError("slurm.nodes, tasks_per_node, cpus_per_task must be >= 1, gpus_per_node >= 0")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"slurm.tasks_per_node ({self.tasks_per_node}) must equal slurm.gpus_per_node "
                             f"({self.gpus_per_node}): one task per GPU")
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", self.time):
            raise ValueError(f"slurm.time must look like HH:MM:SS or D-HH:MM:SS, got {self.time!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def timeout_min(self) -> int:
        days, _, hms = self.time.rpartition("-")
        h, m, sec = (int(v) for v in hms.split(":"))
        return (int(days or 0) * 24 + h) * 60 + m + (1 if sec else 0)


@dataclass
class InferenceConfig:
    """How ``evaluate`` and ``predict`` run this model unless told otherwise (``--tta/--no-tta``,
    ``--postprocess/--no-postprocess``); travels with the run directory and the exported model.
    Choose it on the validation split, never on test data."""

    tta: bool = False  # average the probabilities over all in-plane mirrorings (4 forward passes)
    postprocess: bool = False  # CT: keep the largest liver(+tumour) component, tumour inside it


@dataclass
class TrackingConfig:
    """MLflow experiment tracking from rank 0 (docs/tracking.md): the config as params, train and
    validation metrics with their step, the final metrics; one MLflow run per run directory, kept
    across requeues and resumes. A config key set here wins over MLflow's environment variables."""

    mlflow: bool = False
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the cwd)
    experiment: Optional[str] = None  # None: $MLFLOW_EXPERIMENT_NAME, else tracking.grid, else the config's name
    run_name: Optional[str] = None  # None: the config's name (grid points: their point name, set by submit)
    grid: Optional[str] = None  # set by `hpc-seg submit` on grid points: the grid's name
    retry_s: float = 60.0  # an unreachable tracking store is tried again at most this often
    close_timeout_s: float = 30.0  # at the end of a run, what waits is sent within this long, then given up

    def check(self) -> None:
        for key in ("retry_s", "close_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"tracking.{key} must be > 0, got {getattr(self, key)}")
        for key in ("uri", "experiment", "run_name", "grid"):
            if getattr(self, key) == "":
                raise ValueError(f"tracking.{key} must not be empty (leave it unset for the default)")


@dataclass
class CascadeConfig:
    """A liver → tumour cascade trained, exported and run as one model (docs/cascade.md).

    Stage 1 is this config without the section (it finds the organ); stage 2 is this config with
    ``data.crop_around: organ`` and then ``stage2``'s overrides (dotted keys, as ``--set``: e.g.
    ``data.size: [192, 192]``, ``model.name: unet_aspp``, ``train.max_steps: 600``)."""

    enabled: bool = False
    organ: list[str] = field(default_factory=lambda: ["liver", "tumour"])  # stage 1's classes stage 2 crops around
    stage2: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    """Top-level config; ``name`` labels runs and reports."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def check(self) -> None:
        """Constraints across sections."""
        ds = self.deepspeed
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-Offload)")
        if ds.offload_optimizer and self.train.optimizer != "adamw":
            raise ValueError("deepspeed.offload_optimizer runs DeepSpeed's CPU Adam (AdamW): DeepSpeed refuses "
                             f"other optimizers with ZeRO-Offload; set train.optimizer adamw, not {self.train.optimizer}")
