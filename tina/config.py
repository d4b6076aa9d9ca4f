"""Every stage's configuration, in one place.

Each stage has a dataclass with a comment on every field; `PipelineConfig` gathers them. YAML files
in `configs/` hold the same nested keys (`data:`, `arch:`, `zoo:` ...); unknown keys are an error so
that a typo never silently falls back to a default. CLI flags override single fields with dotted
paths, e.g. `--set zoo.n_pmodels=40 --set train.steps=200`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tina.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist+mnist"  # registry name in tina.data
    root: str | None = None  # data root; None -> $TINA_DATA_DIR, else ./data
    download: bool = False  # only an explicit flag ever downloads
    # square image side in pixels; None: native (28 MNIST-likes, 32 CIFAR), 32 for folder datasets
    image_size: int | None = None
    # classes held out of everything (generic, zoo, image encoder); named, never indices
    held_out: list[str] = field(
        default_factory=lambda: ["Shirt", "Sandal", "digit 3", "digit 7"]
    )
    # class pairs that never appear together in one zoo task; ood tasks hold at least one
    forbidden_pairs: list[list[str]] = field(
        default_factory=lambda: [
            ["Pullover", "T-shirt/top"],
            ["Pullover", "Coat"],
            ["Pullover", "Dress"],
            ["digit 4", "digit 1"],
            ["digit 4", "digit 9"],
            ["digit 4", "digit 6"],
        ]
    )


@dataclass
class ArchConfig:
    name: str = "cnn-400"  # registry name in tina.backbones (cnn-400, cnn-1k, cnn-5k, ...)
    head_only: bool = False  # True: generate only the linear head; the body is the generic body


@dataclass
class GenericConfig:
    max_epochs: int = 30  # upper bound; training stops when val accuracy stops improving
    # epochs without val improvement before stopping. 2 stopped seed 1 of the demo at epoch 10
    # (val 0.650, still rising; seeds 0 and 2 ran 16 epochs to 0.707 and 0.714), and that
    # under-trained generic model left p-model residuals no generator fit (val: tina - generic
    # -0.016 at the best residual scale)
    patience: int = 4
    batch_size: int = 256
    lr: float = 3e-3  # Adam
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class ZooConfig:
    n_pmodels: int = 300  # p-models in the zoo
    k: int = 10  # classes per zoo task (K_max of the generator)
    epochs: float = 3.0  # fine-tuning epochs over the task's training images
    batch_size: int = 128
    lr: float = 1e-2  # Adam from the generic model's weights, decayed linearly to 0
    max_train_images: int | None = 20000  # cap on a task's training images per p-model
    # p-models trained together as one stacked network (tina.stacked): the same p-models as one
    # at a time, faster per p-model until the stacked activations leave the cache
    pmodels_per_batch: int = 8
    # the first N convs keep the generic model's weights (low-level features transfer between
    # class sets): their output is computed once per image, so a step costs far less
    frozen_convs: int = 0
    seed: int = 0


@dataclass
class EncoderConfig:
    name: str = "minilm"  # minilm | clip
    clip_model: str = "ViT-B-32"  # open_clip architecture name, or an open_clip JSON config path
    clip_pretrained: str | None = None  # a pretrained tag in the local cache, or a weights file
    device: str = "cpu"
    clip_cache_dir: str | None = None  # cache holding pretrained tags; None -> HF/open_clip default
    batch_size: int = 64  # texts or images per forward pass of the encoder
    cache_dir: str | None = None  # on-disk embedding cache per encoder version; None: memory only
    # image prompts without CLIP image weights: a DeViSE map from generic features to text space
    image_encoder_epochs: int = 5
    image_encoder_lr: float = 1e-3


@dataclass
class TokenConfig:
    chunk_size: int = 576  # at most this many values per parameter token; never crosses a layer
    # what is diffused: "raw" p-model parameters, or the "residual" p-model minus the generic
    # model with head rows gathered in prompt order (G.pt diffuses relative to start parameters)
    parametrization: str = "residual"
    normalization: str = "layer"  # "layer": per-layer standardization; "global": one scale
    # "rows": one token per head row, so class token i and head-row token i line up (ours);
    # "chunks": the head is chunked like any other layer (the paper)
    head_tokens: str = "rows"


@dataclass
class DiTConfig:
    preset: str | None = "tina-s"  # named size in tina.dit.PRESETS; overrides width/depth/heads
    width: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    conditioning: str = "tokens"  # "tokens" (G.pt: timestep as a token) or "adaln" (adaLN-Zero)
    dropout: float = 0.0


@dataclass
class DiffusionConfig:
    steps: int = 1000  # DDPM training steps (T)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear"
    prediction: str = "x0"  # the network predicts the clean parameters


@dataclass
class TrainConfig:
    steps: int = 2500  # optimizer steps
    batch_size: int = 64
    lr: float = 4e-4  # AdamW
    weight_decay: float = 0.1
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    grad_clip: float = 0.1
    ema_decay: float = 0.9999  # ramped as min(decay, (1+n)/(10+n))
    null_prompt_p: float = 0.1  # probability of the null prompt (unconditional / guidance)
    sub_prompt_p: float = 0.3  # probability of training on a random sub-prompt of K < K_max
    unseen_row_p: float = 0.5  # probability of pretending one class is unseen (base row swapped)
    augment: bool = True  # classifier augmentation: shuffle the prompt, permute head rows
    seed: int = 0
    threads: int = 2  # torch intra-op threads for this process
    # resumable training state (weights, EMA, optimizer, step, RNG, loss history) every N steps,
    # handed to the checkpoint hook (jobs/train_dit.py: a Ray Train checkpoint); 0: at the end only
    checkpoint_every: int = 0
    # score generated models (raw and EMA weights) on `val` every N steps, at checkpoint steps
    # only (a multiple of checkpoint_every); 0: at the end only. The best becomes the checkpoint
    val_every: int = 0
    val_tasks: int = 4  # the first N val tasks are scored (one seed, eval.seeds[0])
    val_sample_steps: int = 10  # DDIM steps of the in-training val scoring


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50  # sampler steps (DDPM always uses all diffusion steps)
    guidance: float = 1.0  # classifier-free guidance scale; 1 = none
    # residual scale a: generic + a * generated residual, weight-space interpolation toward the
    # model every p-model started from (WiSE-FT, Wortsman et al. 2022); 1 = the sample itself.
    # Rows of classes without a generic row keep a = 1 (their base is only a neighbour's row)
    residual_scale: float = 1.0
    use_ema: bool = True


@dataclass
class EvalConfig:
    n_val: int = 20
    n_id: int = 30
    n_ood: int = 50
    n_unseen: int = 50
    n_variable_k: int = 20  # tasks for each K in variable_ks
    variable_ks: list[int] = field(default_factory=lambda: [2, 5, 10])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    image_draws: int = 3
    n_ddpm_tasks: int = 30  # ood tasks also scored with 1000-step DDPM
    guidance_grid: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])
    # how much of the generated residual to add to the generic rows (1 = the method as written);
    # val chose 0.25, the lowest of [1, 0.75, 0.5, 0.25], on every demo seed, so 0.1 was added
    residual_scale_grid: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1])
    # 1 DDIM step is the denoiser's x0-prediction from pure noise, about the mean p-model for
    # the prompt; on the demo it beat 20-50 steps at scale 1 (val, seed 2: 0.788 vs 0.755)
    steps_grid: list[int] = field(default_factory=lambda: [1, 5, 20, 50])
    bootstrap: int = 2000
    seed: int = 0


@dataclass
class TrackingConfig:
    enabled: bool = True  # log the run to MLflow (tina.tracking); false: no store is touched
    experiment: str | None = None  # MLflow experiment; None: the config file's stem
    system_metrics: bool = True  # CPU/memory/disk/network samples (psutil) as system/* metrics
    system_metrics_interval_s: float = 10.0  # seconds between system metric samples
    register: bool = True  # register the generator in the Model Registry after the run
    model_name: str | None = None  # registered model name; None: "tina-<experiment>"


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0  # master seed; `--seed N` sets every stage's seed to N
    note: str = ""  # free text, e.g. "not run at scale here"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """SHA-256 of the resolved config as canonical JSON."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown key; known keys: {sorted(fields)}")
        ftype = fields[key].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
            kwargs[key] = _from_dict(sub, value, f"{where}{key}.")
        elif ftype == "float" and isinstance(value, int | str) and not isinstance(value, bool):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string and `2` as an int: both mean a float here
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise ConfigError(f"{where}{key}: expected a number, got {value!r}") from None
        elif ftype in ("int", "int | None") and not (
                (value is None and "None" in ftype)
                or (isinstance(value, int) and not isinstance(value, bool))):
            raise ConfigError(f"{where}{key}: expected a whole number, got {value!r}")
        elif ftype == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


_DATACLASSES: dict[str, type] = {
    c.__name__: c
    for c in (DataConfig, ArchConfig, GenericConfig, ZooConfig, EncoderConfig, TokenConfig,
              DiTConfig, DiffusionConfig, TrainConfig, SampleConfig, EvalConfig, TrackingConfig)
}


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Build a PipelineConfig from nested dicts.

    Raises:
        ConfigError: unknown key, mistyped value, or zoo.pmodels_per_batch below 1.
    """
    cfg = _from_dict(PipelineConfig, data or {}, "")
    if cfg.zoo.pmodels_per_batch < 1:
        raise ConfigError(f"zoo.pmodels_per_batch: {cfg.zoo.pmodels_per_batch}; use 1 or more "
                          "(p-models fine-tuned together)")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                seed: int | None = None) -> PipelineConfig:
    """Load a YAML config, apply `key.sub=value` overrides (values parsed as YAML) and a seed shift.

    Raises:
        ConfigError: missing file, unknown key or malformed override.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; see configs/ for examples")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections, got {data!r}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    cfg = from_dict(data)
    if seed is not None:
        shift_seed(cfg, seed)
    return cfg


def shift_seed(cfg: PipelineConfig, seed: int) -> None:
    """Set the master seed and derive every stage's seed from it (in place)."""
    cfg.seed = seed
    cfg.generic.seed = seed
    cfg.zoo.seed = seed
    cfg.train.seed = seed
    cfg.eval.seed = seed


@dataclass
class ServeConfig:
    """Settings of the Ray Serve application (`tina.serve.build_app`, `tina serve`)."""

    checkpoint: str = ""  # generator directory (tina.json + tina.safetensors); required
    # DeViSE image-prompt encoder directory; None: <checkpoint>/../image_encoder when it exists
    image_encoder: str | None = None
    # --- batching: concurrent requests become one sampler call (@serve.batch)
    max_batch_size: int = 16  # 1 turns batching off (the bench's "unbatched")
    batch_wait_timeout_s: float = 0.05  # wait this long for a batch to fill after its first item
    # --- generator replicas
    autoscaling: bool = True  # False: a fixed num_replicas
    num_replicas: int = 1  # replicas when autoscaling is off
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # per replica; the autoscaler's set point
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0  # Serve's default is 600 s
    num_cpus: float = 0.5  # per generator replica (fractional: a 2-CPU machine fits several)
    num_gpus: float = 0.0  # per generator replica
    threads: int = 1  # torch intra-op threads per generator replica
    # per replica; None: 2 x max_batch_size (Serve's default of 5 would cap the batch size)
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64  # per caller, waiting for a generator; beyond -> 503
    retry_after_s: int = 1  # the Retry-After header of a 503 for overload
    ingress_num_cpus: float = 0.25
    ingress_num_replicas: int = 1
    ingress_max_ongoing_requests: int = 256  # per ingress replica (Serve's default is 5)
    # --- limits
    # a request still unanswered after this gets a JSON 504; below serve_config.yaml's proxy
    # http_options.request_timeout_s (30 s), so the client sees this answer, not the proxy's
    request_timeout_s: float = 25.0
    cache_size: int = 256  # generated models kept per generator replica (LRU)
    max_body_bytes: int = 8 * 2**20  # whole request body
    max_images: int = 64  # images per /v1/classify request
    max_examples_per_class: int = 16  # example images per class of an image prompt
    max_image_bytes: int = 2 * 2**20  # one decoded image file
    max_image_pixels: int = 4096 * 4096  # width x height of one image (decompression bombs)

    def replica_max_ongoing(self) -> int:
        """max_ongoing_requests of a generator replica (at least max_batch_size)."""
        return self.max_ongoing_requests or 2 * self.max_batch_size


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """ServeConfig from `serve run tina.serve:build_app key=value ...` or serve_config.yaml args.

    Values may be strings (the `serve run` command line): they are parsed as YAML scalars.
    Raises:
        ConfigError: unknown key, mistyped value, or no checkpoint.
    """
    types = {f.name: f.type for f in dataclasses.fields(ServeConfig)}
    parsed = {k: (yaml.safe_load(v) if isinstance(v, str) and types.get(k) not in
                  ("str", "str | None") else v) for k, v in (args or {}).items()}
    cfg = _from_dict(ServeConfig, parsed, "serve.")
    if not cfg.checkpoint:
        raise ConfigError("serve.checkpoint: required; pass the generator directory, e.g. "
                          "checkpoint=runs/demo/generator")
    if cfg.max_batch_size < 1 or cfg.batch_wait_timeout_s < 0:
        raise ConfigError("serve.max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
    if cfg.replica_max_ongoing() < cfg.max_batch_size:
        raise ConfigError(f"serve.max_ongoing_requests {cfg.max_ongoing_requests} < "
                          f"max_batch_size {cfg.max_batch_size}: batches could never fill")
    return cfg
