"""The main job: generic model -> zoo -> image encoder -> generator -> evaluation -> report.

    tina pipeline --config configs/demo.yaml --out runs/demo [--seed 1] [--set train.steps=500]

Every stage writes its artifact under `--out` (safetensors + JSON) and is skipped on a re-run when
its artifact exists, so an interrupted run resumes; the zoo resumes p-model by p-model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tina.backbones import ParamLayout, SmallCNN, build_model
from tina.config import PipelineConfig
from tina.data import PREPROCESSING, ImageSet, dataset_info, load_split, to_float
from tina.encoders import PromptEncoder, build_encoder
from tina.evaluate import EvalContext, evaluate, select_on_val, time_generation
from tina.generate import Generator
from tina.image_prompts import ImagePromptEncoder, train_devise
from tina.report import write_report
from tina.stamps import check_stamp, stamp_of
from tina.tasks import LabelSpace, Splits, make_splits
from tina.tracking import PipelineRun
from tina.train import GeneratorInputs, train_generator
from tina.zoo import REFERENCE, ZOO, StoreKind, ZooStore, build_zoo, train_generic


def git_commit() -> str:
    """HEAD of the checkout this code runs from, with '+dirty' when files are modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """nproc and CPU model, recorded with every figure."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch_threads": torch.get_num_threads()}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_model(model: SmallCNN, path: Path, meta: dict) -> None:
    """A classifier as path (safetensors state_dict) + path.with_suffix('.json') (meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def stage_generic(cfg: PipelineConfig, out: Path, train: ImageSet, val: ImageSet,
                  space: LabelSpace) -> tuple[SmallCNN, torch.Tensor]:
    """Train (or load) the generic model; returns it and has_row (N,) bool."""
    path = out / "generic" / "model.safetensors"
    model = build_model(cfg.arch.name, train.images.shape[1], len(space.classes))
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
    else:
        model, meta = train_generic(cfg.arch.name, train, val, space.seen_ids, cfg.generic)
        meta |= {"arch": cfg.arch.name, "classes": space.classes}
        save_model(model, path, meta)
    return model.eval(), torch.tensor(meta["has_row"])


def stage_zoo(cfg: PipelineConfig, out: Path, splits: Splits, generic: SmallCNN,
              train: ImageSet, val: ImageSet) -> tuple[list, torch.Tensor]:
    """Build (or finish) the zoo in this process; returns its entries and (M, P) parameters."""
    return _build_store(cfg, out, splits.zoo, generic, train, val, ZOO)


def stage_references(cfg: PipelineConfig, out: Path, splits: Splits, generic: SmallCNN,
                     train: ImageSet, val: ImageSet) -> tuple[list, torch.Tensor]:
    """Fine-tune (or finish) the evaluation's `finetuned` references in this process: the zoo's
    recipe on `splits.reference_tasks()`, stored in out/finetuned; returns entries and params."""
    return _build_store(cfg, out, splits.reference_tasks(), generic, train, val, REFERENCE)


def _build_store(cfg: PipelineConfig, out: Path, tasks: list, generic: SmallCNN,
                 train: ImageSet, val: ImageSet, kind: StoreKind) -> tuple[list, torch.Tensor]:
    store = ZooStore(out / kind.folder)
    build_zoo(store, tasks, generic, cfg.arch.name, train, val, cfg.zoo, cfg.data.dataset,
              head_only=cfg.arch.head_only, kind=kind)
    store.merge()
    return store.load()


def reference_models(entries: list, flats: torch.Tensor, arch: str,
                     in_channels: int) -> dict[tuple[int, ...], dict[str, torch.Tensor]]:
    """Stored reference p-models by task (ordered class ids) as named parameters."""
    out = {}
    for e, flat in zip(entries, flats, strict=True):
        layout = ParamLayout(build_model(arch, in_channels, len(e.class_ids)))
        out[tuple(e.class_ids)] = layout.unflatten(flat)
    return out


def stage_image_encoder(cfg: PipelineConfig, out: Path, encoder: PromptEncoder,
                        generic: SmallCNN, has_row: torch.Tensor, train: ImageSet,
                        space: LabelSpace) -> Any:
    """CLIP's own image tower, or a DeViSE map from generic features trained on seen classes."""
    if cfg.encoder.name == "clip":
        return encoder

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = to_float(images)
            f = generic.features(x)
            return torch.cat([f, generic.fc(f)[:, has_row]], dim=1)

    path = out / "image_encoder"
    if (path / "image_encoder.json").is_file():
        return ImagePromptEncoder.load(path, features, text_encoder_version=encoder.version)
    seen = train.task(space.seen_ids)
    feats = torch.cat([features(seen.images[i: i + 4096]) for i in range(0, len(seen), 4096)])
    class_emb = encoder.encode_text([space.classes[c] for c in space.seen_ids])
    devise = train_devise(feats, seen.labels, class_emb, cfg.encoder.image_encoder_epochs,
                          cfg.encoder.image_encoder_lr, cfg.seed)
    enc = ImagePromptEncoder(features, devise, text_encoder_version=encoder.version)
    enc.save(path)
    return enc


def generator_inputs(cfg: PipelineConfig, space: LabelSpace, generic: SmallCNN,
                     has_row: torch.Tensor, encoder: PromptEncoder, zoo_entries: list,
                     zoo_flats: torch.Tensor, in_channels: int) -> GeneratorInputs:
    """Everything the generator trains on: layouts, generic model, class embeddings, the zoo
    (only its heads for a head-only generator), and the checkpoint's metadata."""
    template = build_model(cfg.arch.name, in_channels, cfg.zoo.k)
    names = ["fc.weight", "fc.bias"] if cfg.arch.head_only else None
    layout = ParamLayout(template, names)
    generic_layout = ParamLayout(generic)
    generic_flat = generic_layout.flatten({k: v.detach() for k, v in generic.named_parameters()})
    zoo_ids = torch.tensor([e.class_ids for e in zoo_entries])
    if cfg.arch.head_only:
        zoo_flats = zoo_flats[:, -layout.n_params:]  # the head is last in parameter order
    meta = {
        "arch": {"name": cfg.arch.name, "in_channels": in_channels, "k_max": cfg.zoo.k,
                 "n_params": layout.n_params, "head_only": cfg.arch.head_only,
                 "layout": layout.to_json()},
        "label_space": {"dataset": cfg.data.dataset, "classes": space.classes,
                        "held_out": space.held_out, "has_row": has_row.tolist()},
        "encoder": {"name": encoder.name, "version": encoder.version, "dim": encoder.dim},
        "preprocessing": PREPROCESSING, "n_zoo": len(zoo_entries),
        "git_commit": git_commit(), "config_sha256": cfg.sha256(), "config": cfg.to_dict(),
    }
    return GeneratorInputs(layout, generic_flat, generic_layout, has_row,
                           encoder.encode_text(space.classes), zoo_flats, zoo_ids, meta)


def train_here(cfg: PipelineConfig, inputs: GeneratorInputs,
               splits: Splits | None) -> tuple[Generator, dict]:
    """The plain-process generator trainer (no Ray): `train_generator` in this process."""
    return train_generator(cfg, **vars(inputs))


# (cfg, inputs, splits or None) -> (trained Generator, history); splits give the val tasks
GeneratorTrainer = Callable[[PipelineConfig, GeneratorInputs, Splits | None],
                            tuple[Generator, dict]]


def stage_generator(cfg: PipelineConfig, out: Path, space: LabelSpace, generic: SmallCNN,
                    has_row: torch.Tensor, encoder: PromptEncoder, zoo_entries: list,
                    zoo_flats: torch.Tensor, in_channels: int, splits: Splits | None = None,
                    trainer: GeneratorTrainer = train_here) -> tuple[Generator, dict]:
    """Train (or load) the generator with `trainer` and save it in out/generator."""
    path = out / "generator"
    if (path / "tina.json").is_file():
        return Generator.from_checkpoint(path, encoder), json.loads(
            (path / "train_history.json").read_text())
    inputs = generator_inputs(cfg, space, generic, has_row, encoder, zoo_entries, zoo_flats,
                              in_channels)
    gen, hist = trainer(cfg, inputs, splits)
    gen.encoder = encoder
    gen.save(path)
    (path / "train_history.json").write_text(json.dumps(hist))
    return gen, hist


@dataclass
class Stages:
    """The training stages, swappable: plain functions here, Ray Train runs in jobs/pipeline.py.

    Signatures as `stage_generic`, `stage_zoo` (also `references`) and `train_here` (the
    generator's trainer).
    """

    generic: Callable[..., tuple[SmallCNN, torch.Tensor]] = stage_generic
    zoo: Callable[..., tuple[list, torch.Tensor]] = stage_zoo
    references: Callable[..., tuple[list, torch.Tensor]] = stage_references
    generator: GeneratorTrainer = train_here


def run_pipeline(cfg: PipelineConfig, out: str | Path, command: str = "",
                 stages: Stages | None = None, config_path: str | Path | None = None) -> dict:
    """Run every stage and write report.json, report.md and plots under `out`; return the report.

    `stages` chooses how the generic model, the zoo and the generator are trained (default: in
    this process); everything else, and the report, is the same either way. The run is recorded
    in MLflow (tina.tracking; the config's `tracking:` section, experiment named after
    `config_path`'s stem): params, the generator's per-step loss (and val scores when the
    trainer reports them), the report's numbers, the artifacts, and the generator registered in
    the Model Registry. Only this driver process writes to MLflow.
    """
    with PipelineRun.from_config(cfg, config_path=config_path, run_name=Path(out).name,
                                 tags={"command": command}) as track:
        track.log_config(cfg)
        report = _run_stages(cfg, Path(out), command, stages or Stages(), track)
        track.log_report(report)
        track.log_outputs(out)
        track.register_generator(Path(out) / "generator")
    return report


def _run_stages(cfg: PipelineConfig, out: Path, command: str, stages: Stages,
                track: PipelineRun) -> dict:
    # The generic model, the zoo and the image encoder run many tiny ops: one thread is nearly as
    # fast as two and does not collapse when another process shares the cores (two OpenMP threads
    # then wait on each other, measured 10-40x slower). The denoiser's matmuls, and the
    # evaluation (sampling, and B models' convolutions over whole test sets, with nothing else
    # running: 190 s at 2 threads vs 240 s at 1 for the demo), get train.threads.
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t_start, stage_s = time.perf_counter(), {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        stage_s[name] = round(time.perf_counter() - t0, 2)
        return result

    info = dataset_info(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    load = dict(root=cfg.data.root, download=cfg.data.download, image_size=cfg.data.image_size)
    train, val, test = (timed(f"data_{s}", load_split, cfg.data.dataset, s, **load)
                        for s in ("train", "val", "test"))
    space = LabelSpace(info.classes, cfg.data.held_out)
    splits = make_splits(space, cfg.data.forbidden_pairs, cfg.zoo.k, cfg.zoo.n_pmodels, cfg.eval,
                         cfg.seed)
    (out / "splits.json").write_text(json.dumps(splits.to_json()))
    # a stage folder built with other settings is refused, never silently reused (tina.stamps)
    for stage, tasks in (("generic", None), ("zoo", splits.zoo),
                         (REFERENCE.folder, splits.reference_tasks()), ("image_encoder", None),
                         ("generator", splits.zoo)):
        if stage != "image_encoder" or cfg.encoder.name != "clip":  # CLIP: its own image tower
            check_stamp(out / stage, stamp_of(cfg, stage, tasks))
    generic, has_row = timed("generic", stages.generic, cfg, out, train, val, space)
    zoo_entries, zoo_flats = timed("zoo", stages.zoo, cfg, out, splits, generic, train, val)
    references = reference_models(*timed("finetuned", stages.references, cfg, out, splits,
                                         generic, train, val), cfg.arch.name, info.in_channels)
    encoder = timed("encoder", build_encoder, cfg.encoder)
    image_encoder = timed("image_encoder", stage_image_encoder, cfg, out, encoder, generic,
                          has_row, train, space)
    torch.set_num_threads(cfg.train.threads)
    gen, hist = timed("generator", stage_generator, cfg, out, space, generic, has_row, encoder,
                      zoo_entries, zoo_flats, info.in_channels, splits, stages.generator)
    track.log_series("generator.loss", hist["loss"])
    track.log_history(hist.get("val", {}).get("history", []), prefix="generator.val")
    ctx = EvalContext(cfg=cfg, generator=gen, generic=generic, has_row=has_row,
                      zoo_entries=zoo_entries, zoo_flats=zoo_flats, train=train, val=val,
                      test=test, encoder=encoder, image_encoder=image_encoder, splits=splits,
                      references=references)
    choice = timed("select_on_val", select_on_val, ctx)
    # the val-selected sampler settings become the checkpoint's defaults (serving uses them)
    gen.meta["sample"] |= {"steps": choice["steps"], "guidance": choice["guidance"],
                           "residual_scale": choice["residual_scale"],
                           "use_ema": choice["use_ema"]}
    (out / "generator" / "tina.json").write_text(json.dumps(gen.meta, indent=2))
    split_results = timed("evaluate", evaluate, ctx, choice)
    gen_timing = timed("timing", time_generation, ctx, choice)
    # what the zoo's recipe cost per p-model where it ran: its share of a stacked batch of
    # zoo.pmodels_per_batch p-models on one core (tina.stacked)
    ft_s = statistics.median(e.finetune_s for e in zoo_entries)
    report = {
        "dataset": cfg.data.dataset, "encoder": f"{encoder.name} ({encoder.version})",
        "arch": cfg.arch.name, "n_params": gen.layout.n_params, "k_max": cfg.zoo.k,
        "n_zoo": len(zoo_entries), "held_out_classes": cfg.data.held_out,
        "forbidden_pairs": cfg.data.forbidden_pairs, "sampler": cfg.sample.sampler,
        "steps": choice["steps"], "guidance": choice["guidance"], "use_ema": choice["use_ema"],
        "residual_scale": choice["residual_scale"],
        "val_selection": choice, "seeds": cfg.eval.seeds, "seed": cfg.seed,
        "git_commit": git_commit(), "command": command, "machine": machine(),
        "sha256": {"config": cfg.sha256(),
                   "zoo_manifest": sha256_file(out / "zoo" / "manifest.jsonl"),
                   "finetuned_manifest": sha256_file(out / REFERENCE.folder / "manifest.jsonl"),
                   "checkpoint": sha256_file(out / "generator" / "tina.safetensors")},
        "generator": {"dit_params": gen.meta["dit"]["n_params"], "train_s": hist["train_s"],
                      "final_loss": sum(hist["loss"][-50:]) / max(1, len(hist["loss"][-50:]))},
        "splits": split_results,
        "timing": {"generate_s_per_model": gen_timing, "finetune_s_per_model": ft_s,
                   "pmodels_per_batch": cfg.zoo.pmodels_per_batch,
                   "stages_s": stage_s, "pipeline_wall_s": round(time.perf_counter() - t_start, 2)},
    }
    write_report(report, out)
    return report
