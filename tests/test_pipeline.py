"""End to end: the tiny config through every stage on the real offline data, then the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tina.backbones import ParamLayout, build_model
from tina.cli import main
from tina.config import load_config
from tina.data import data_root, load_split
from tina.pipeline import run_pipeline
from tina.scoring import accuracy, logits_of

TINY = Path(__file__).parent / "tiny.yaml"
REAL = data_root() / "fashion-mnist" / "train-images-idx3-ubyte.gz"
pytestmark = pytest.mark.skipif(not REAL.is_file(), reason="run `make data` first")

REPORT_KEYS = {"dataset", "encoder", "arch", "n_params", "k_max", "n_zoo", "held_out_classes",
               "forbidden_pairs", "sampler", "steps", "guidance", "seeds", "git_commit", "sha256",
               "splits", "timing"}
SPLITS = {"val", "id", "ood", "unseen_1", "unseen_2", "variable_k_2", "variable_k_5",
          "variable_k_10", "image_1img", "image_5img"}


@pytest.fixture(scope="module")
def run(tiny_run: Path) -> Path:
    return tiny_run


def test_pipeline_writes_report_with_the_issue_schema(run: Path):
    report = json.loads((run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert SPLITS <= set(report["splits"])
    assert report["n_zoo"] == 12 and report["k_max"] == 10
    assert report["n_params"] == 414
    ood = report["splits"]["ood"]
    for method in ("tina", "generic", "finetuned", "retrieval", "ridge", "unconditional"):
        m = ood[method]
        assert 0.0 <= m["mean"] <= 1.0
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
        assert len(m["per_task"]) == len(ood["tasks"])
    assert ood["tina"]["paired_vs_generic"]["mean"] == pytest.approx(
        ood["tina"]["mean"] - ood["generic"]["mean"], abs=1e-9)
    assert ood.get("classify_then_text") is None  # an image-prompt baseline only
    assert report["timing"]["generate_s_per_model"]["batch_1"] > 0
    assert (run / "report.md").read_text().strip()
    assert list(run.glob("*.png"))


def test_finetuned_method_scores_the_stored_references(run: Path):
    """The `finetuned` reference p-models are fine-tuned before evaluation (the zoo's recipe, in
    run/finetuned) for exactly the val, ood and unseen tasks, and the report scores those."""
    report = json.loads((run / "report.json").read_text())
    lines = (run / "finetuned" / "manifest.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    sp = report["splits"]
    want = list(dict.fromkeys(tuple(t) for s in ("val", "ood", "unseen_1", "unseen_2")
                              for t in sp[s]["tasks"]))
    assert [tuple(e["classes"]) for e in entries] == want
    assert all(e["id"].startswith("ft-") for e in entries)
    test = load_split("fashion-mnist+mnist", "test")
    e = next(e for e in entries if tuple(e["classes"]) == tuple(sp["ood"]["tasks"][0]))
    params = load_file(str(run / "finetuned" / e["file"]))["params"]
    model = build_model(report["arch"], 1, len(e["class_ids"]))
    model.load_state_dict(ParamLayout(model).unflatten(params))
    d = test.task(e["class_ids"])
    acc = float(accuracy(logits_of(model, d.images), d.labels))
    assert sp["ood"]["finetuned"]["per_task"][0] == pytest.approx(acc, abs=1e-6)


def test_rerun_skips_finished_stages(run: Path):
    before = (run / "generator" / "tina.safetensors").stat().st_mtime_ns
    zoo_before = sorted(p.stat().st_mtime_ns for p in (run / "zoo" / "params").iterdir())
    report = run_pipeline(load_config(TINY), run, command="pytest tiny rerun")
    assert (run / "generator" / "tina.safetensors").stat().st_mtime_ns == before
    assert sorted(p.stat().st_mtime_ns for p in (run / "zoo" / "params").iterdir()) == zoo_before
    assert report["timing"]["stages_s"]["zoo"] < 30
    assert report["timing"]["stages_s"]["finetuned"] < 30


def test_cli_generate_works_without_the_zoo(run: Path, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "generator", ckpt)  # the zoo is not next to this copy
    out = tmp_path / "model"
    rc = main(["generate", "--checkpoint", str(ckpt), "--class", "sneaker", "--class",
               "T-shirt/top", "--class", "digit 3", "--out", str(out), "--seed", "7"])
    assert rc == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["Sneaker", "T-shirt/top", "digit 3"]
    d = meta["convs"][-1]["out"]
    assert meta["n_params"] == sum(c["in"] * c["out"] * 9 for c in meta["convs"]) + 3 * (d + 1)
    # the README's plain-PyTorch loader, verbatim in spirit: no tina import needed
    layers = []
    for c in meta["convs"]:
        layers += [torch.nn.Conv2d(c["in"], c["out"], 3, c["stride"], 1, bias=False),
                   torch.nn.ReLU()]
    model = torch.nn.ModuleDict({"body": torch.nn.Sequential(*layers),
                                 "fc": torch.nn.Linear(meta["convs"][-1]["out"], 3)})
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    test = load_split("fashion-mnist+mnist", "test").task([7, 0, 13])
    x = (test.images[:64].float() / 255 - 0.5) / 0.5
    logits = model["fc"](model["body"](x).mean(dim=(2, 3)))
    assert logits.shape == (64, 3) and torch.isfinite(logits).all()
    # same (seed, prompt) -> same parameters
    out2 = tmp_path / "model2"
    main(["generate", "--checkpoint", str(ckpt), "--class", "sneaker", "--class",
          "T-shirt/top", "--class", "digit 3", "--out", str(out2), "--seed", "7"])
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("classes, message", [
    ([" "], "empty"),
    ([f"c{i}" for i in range(11)], "K_max 10"),
    (["Sneaker", " sneaker "], "duplicate"),
])
def test_cli_generate_rejects_bad_prompts_with_a_clear_message(run, tmp_path, capsys, classes,
                                                               message):
    args = ["generate", "--checkpoint", str(run / "generator"), "--out", str(tmp_path / "m")]
    for c in classes:
        args += ["--class", c]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--class", "bag", "--out",
                 str(tmp_path / "m")]) == 2
    assert "tina.json" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_made_with_another_encoder(run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "generator", ckpt)
    meta = json.loads((ckpt / "tina.json").read_text())
    meta["encoder"]["version"] = "all-MiniLM-L6-v2@some-other-weights"
    (ckpt / "tina.json").write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(ckpt), "--class", "bag", "--out",
                 str(tmp_path / "m")]) == 2
    assert "encoder" in capsys.readouterr().err


def test_console_script_prints_help():
    r = subprocess.run([sys.executable, "-m", "tina.cli", "--help"], capture_output=True,
                       text=True, check=True)
    assert "pipeline" in r.stdout and "generate" in r.stdout


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "steps: 0 is outside"),
    (["--steps", "5000"], "steps: 5000 is outside"),
    (["--guidance", "nan"], "guidance: nan must be a finite number"),
    (["--guidance", "-1"], "guidance: -1.0 must be"),
])
def test_cli_generate_rejects_bad_sampler_settings(run, tmp_path, capsys, extra, message):
    args = ["generate", "--checkpoint", str(run / "generator"), "--class", "bag",
            "--out", str(tmp_path / "m"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_reports_an_unwritable_output_without_a_traceback(run, capsys):
    assert main(["generate", "--checkpoint", str(run / "generator"), "--class", "bag",
                 "--out", "/proc/tina-cannot-write-here"]) == 2
    assert "/proc/tina-cannot-write-here" in capsys.readouterr().err


def test_load_generator_builds_the_encoder_its_checkpoint_names(run):
    from tina.generate import load_generator

    gen = load_generator(run / "generator")
    (model,) = gen.generate([["Bag", "digit 1"]], seeds=[3])
    assert model.fc.weight.shape[0] == 2


def test_an_image_prompt_is_taken_for_its_nearest_seen_class(run):
    from tina.generate import load_generator

    gen = load_generator(run / "generator")
    emb, has_row = gen.parts.class_emb, gen.parts.has_row
    seen = has_row.nonzero().flatten().tolist()
    # a seen class's own name embedding (an image encoder's ideal output) is taken for that class
    assert gen.image_known(emb[seen]) == seen
    # a held-out class's is taken for some seen class, never for itself (it has no row)
    held = (~has_row).nonzero().flatten()
    assert all(has_row[i] for i in gen.image_known(emb[held]))
    c = gen.embedding_conditioning([emb[seen[:3]]], [gen.image_known(emb[seen[:3]])])
    assert c.row_source[0, :3].tolist() == seen[:3] and not c.flag.any()
