"""Specification of tina.train (and the checkpoint / generation path of tina.generate)."""

from __future__ import annotations

import copy
import itertools
import shutil
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tina.backbones import HEAD_BIAS, HEAD_WEIGHT, ParamLayout, build_model
from tina.conditioning import Conditioner
from tina.config import DiffusionConfig, DiTConfig, PipelineConfig, SampleConfig, TrainConfig
from tina.errors import CheckpointError, PromptError
from tina.generate import Generator
from tina.tokens import ParamTokenizer, ResidualBase, pad_rows
from tina.train import Batcher, ema_update, fit_targets, lr_at, train_generator
from tina.zoo import ZooEntry, ZooStore

CLASSES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
HELD_OUT = 5  # "foxtrot": the generic model has no row for it, the zoo never holds it
SEEN = [0, 1, 2, 3, 4]
ARCH, K_MAX = "cnn-400", 4


class CharCountEncoder:
    """Stand-in prompt encoder: a fixed random projection of a name's letter counts, normalized.

    A test double of the encoder *interface* (name, version, dim, encode_text), not of MiniLM or
    CLIP: it is a real deterministic function, so generation with it is reproducible, and it lets
    the checkpoint refusal logic be tested without loading encoder weights.
    """

    def __init__(self, name: str = "charcount", version: str = "v1", dim: int = 16) -> None:
        self.name, self.version, self.dim = name, version, dim
        alphabet = string.ascii_lowercase + " "
        self._pos = {c: i for i, c in enumerate(alphabet)}
        g = torch.Generator().manual_seed(1234)
        self._proj = torch.randn(len(alphabet) + 1, dim, generator=g)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        counts = torch.zeros(len(texts), self._proj.shape[0])
        for i, t in enumerate(texts):
            for ch in t.lower():
                counts[i, self._pos.get(ch, len(self._pos))] += 1
        return F.normalize(counts @ self._proj, dim=-1)


@dataclass
class World:
    """A generic model, a zoo and everything the Batcher and train_generator are built from."""

    cfg: PipelineConfig
    layout: ParamLayout
    generic_flat: torch.Tensor
    generic_layout: ParamLayout
    has_row: torch.Tensor
    class_emb: torch.Tensor
    zoo_flats: torch.Tensor
    zoo_ids: torch.Tensor
    meta: dict


def tiny_cfg(**train) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.dit = DiTConfig(preset=None, width=32, depth=1, heads=2)
    cfg.diffusion = DiffusionConfig(steps=100)
    cfg.sample = SampleConfig(sampler="ddim", steps=10)
    cfg.train = TrainConfig(**{"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5,
                               "grad_clip": 1.0, "ema_decay": 0.99, "threads": 1, **train})
    return cfg


def make_world(k_max: int = K_MAX, n_zoo: int = 8, parametrization: str = "residual",
               **train) -> World:
    """A zoo of random-but-structured p-models: generic body + noise, and head row i = the
    generic row of class ids[i] + a fixed per-class offset + a little per-model noise."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    generic = build_model(ARCH, 1, len(CLASSES))
    with torch.no_grad():
        generic.fc.weight[HELD_OUT] = 0
        generic.fc.bias[HELD_OUT] = 0
    glayout = ParamLayout(generic)
    gparams = {k: v.detach() for k, v in generic.named_parameters()}
    has_row = torch.tensor([c != HELD_OUT for c in range(len(CLASSES))])
    layout = ParamLayout(build_model(ARCH, 1, k_max))
    offset_w = torch.randn(len(CLASSES), layout.feat_dim, generator=g)
    offset_b = torch.randn(len(CLASSES), generator=g)
    tasks = list(itertools.permutations(SEEN, k_max))
    pick = torch.randperm(len(tasks), generator=g)[:n_zoo]
    flats, ids = [], []
    for j in pick.tolist():
        task = list(tasks[j])
        p = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in gparams.items()
             if not k.startswith("fc.")}
        p[HEAD_WEIGHT] = (gparams[HEAD_WEIGHT][task] + offset_w[task]
                          + 0.05 * torch.randn(k_max, layout.feat_dim, generator=g))
        p[HEAD_BIAS] = gparams[HEAD_BIAS][task] + offset_b[task] + 0.05 * torch.randn(
            k_max, generator=g)
        flats.append(layout.flatten(p))
        ids.append(task)
    cfg = tiny_cfg(**train)
    cfg.tokens.parametrization = parametrization
    enc = CharCountEncoder()
    meta = {
        "arch": {"name": ARCH, "in_channels": 1, "k_max": k_max, "n_params": layout.n_params,
                 "head_only": False, "layout": layout.to_json()},
        "label_space": {"dataset": "toy", "classes": CLASSES, "held_out": [CLASSES[HELD_OUT]],
                        "has_row": has_row.tolist()},
        "encoder": {"name": enc.name, "version": enc.version, "dim": enc.dim},
    }
    return World(cfg, layout, glayout.flatten(gparams), glayout, has_row,
                 enc.encode_text(CLASSES), torch.stack(flats), torch.tensor(ids), meta)


def make_batcher(w: World) -> Batcher:
    base = ResidualBase(w.layout, w.generic_flat, w.generic_layout, w.has_row)
    tok = ParamTokenizer(w.layout, w.cfg.tokens.chunk_size, w.cfg.tokens.head_tokens)
    cond = Conditioner(w.class_emb, w.has_row, base, w.layout.k)
    norm = fit_targets(w.cfg, w.layout, base, cond, w.zoo_flats, w.zoo_ids)
    return Batcher(w.cfg, w.layout, tok, norm, base, cond, w.zoo_flats, w.zoo_ids,
                   w.cfg.tokens.parametrization == "residual")


def recover(batcher: Batcher, x0: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo a batch: (B, P) p-model parameters and (B, K) class ids read off the class tokens."""
    c = batcher.cond
    d = c.class_emb.shape[1]
    cond, real = kwargs["cond"], kwargs["class_mask"]
    flagged = real & (cond[..., d] > 0.5)  # unknown-class rows have their own scale
    flat = batcher.norm.denormalize(batcher.tok.detokenize(x0), flagged)
    dist = torch.cdist(cond[..., :d], c.class_emb[None].expand(len(cond), -1, -1))
    ids = torch.where(real, dist.argmin(-1), -1)
    assert bool((dist.min(-1).values[real] < 1e-5).all())  # real slots embed a class name exactly
    if batcher.residual:  # add back the base: generic body + the rows the class tokens carry
        rows = (cond[..., d + 1:] * c.row_std + c.row_mean) * real[..., None]
        base = batcher.base.template.expand(len(flat), -1).clone()
        base[:, batcher.row_index.reshape(-1)] = rows.reshape(len(flat), -1)
        flat = flat + base
    return flat, ids


# ------------------------------------------------------------------------ schedule and EMA

def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero_at_the_end() -> None:
    base, total, warm = 4e-4, 1000, 100
    assert lr_at(0, total, warm, base) == pytest.approx(base / warm)
    assert lr_at(49, total, warm, base) == pytest.approx(base * 50 / warm)
    assert lr_at(warm - 1, total, warm, base) == pytest.approx(base)
    assert lr_at(warm, total, warm, base) == pytest.approx(base)
    assert lr_at(warm + (total - warm) // 2, total, warm, base) == pytest.approx(base / 2)
    assert lr_at(total, total, warm, base) == pytest.approx(0.0, abs=1e-12)
    after = [lr_at(s, total, warm, base) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert lr_at(0, 10, 0, base) == pytest.approx(base)  # no warm-up


@pytest.mark.parametrize(("step", "decay"), [(0, 0.9999), (5, 0.9999), (10_000, 0.999)])
def test_ema_update_uses_the_warmed_up_decay(step: int, decay: float) -> None:
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, step, decay)
    d = min(decay, (1 + step) / (10 + step))
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, d * b + (1 - d) * m.detach())


# ------------------------------------------------------------------------------- Batcher

@pytest.mark.parametrize("parametrization", ["raw", "residual"])
def test_augmented_samples_keep_each_class_paired_with_its_own_head_row(
        parametrization: str) -> None:
    w = make_world(parametrization=parametrization, sub_prompt_p=0.3, unseen_row_p=0.5)
    batcher = make_batcher(w)
    x0, kwargs, _ = batcher(64, torch.Generator().manual_seed(1))
    flat, ids = recover(batcher, x0, kwargs)
    rows = flat[:, batcher.row_index]  # (B, K, d+1)
    zoo_rows = w.zoo_flats[:, batcher.row_index]
    body = ~w.layout.row_mask()
    orders = set()
    for b in range(len(flat)):
        real = [i for i in range(K_MAX) if ids[b, i] >= 0]
        # one zoo p-model explains the whole sample: its body and, slot by slot, its row of ids[i]
        matches = [m for m in range(len(w.zoo_flats))
                   if torch.allclose(flat[b, body], w.zoo_flats[m, body], atol=1e-4)
                   and all(int(ids[b, i]) in w.zoo_ids[m].tolist() and torch.allclose(
                       rows[b, i], zoo_rows[m, w.zoo_ids[m].tolist().index(int(ids[b, i]))],
                       atol=1e-4) for i in real)]
        assert len(matches) == 1, b
        orders.add(tuple(ids[b, real].tolist()) == tuple(w.zoo_ids[matches[0], real].tolist()))
    assert orders == {True, False}  # some prompts were shuffled, and still paired


def test_without_augmentation_prompts_keep_the_zoo_order() -> None:
    w = make_world(parametrization="raw", augment=False, sub_prompt_p=0.0)
    batcher = make_batcher(w)
    x0, kwargs, _ = batcher(16, torch.Generator().manual_seed(2))
    flat, ids = recover(batcher, x0, kwargs)
    for b in range(16):
        m = int((w.zoo_flats - flat[b]).abs().amax(1).argmin())
        torch.testing.assert_close(flat[b], w.zoo_flats[m], atol=1e-4, rtol=0)
        assert ids[b].tolist() == w.zoo_ids[m].tolist()


@pytest.mark.parametrize("parametrization", ["raw", "residual"])
def test_sub_prompts_zero_rows_from_k_on_and_leave_them_out_of_the_loss(
        parametrization: str) -> None:
    w = make_world(parametrization=parametrization, sub_prompt_p=1.0)
    batcher = make_batcher(w)
    x0, kwargs, mask = batcher(48, torch.Generator().manual_seed(3))
    flat, _ = recover(batcher, x0, kwargs)
    k = kwargs["class_mask"].sum(1)
    assert set(k.tolist()) == {2, 3}  # 2 <= k < K_max
    assert torch.equal(kwargs["class_mask"], torch.arange(K_MAX)[None] < k[:, None])
    tok = batcher.tok
    rows = flat[:, batcher.row_index]
    assert mask.shape == x0.shape
    for b, kb in enumerate(k.tolist()):
        assert not bool(rows[b, kb:].abs().gt(1e-4).any())
        assert not bool(kwargs["cond"][b, kb:].any())
        assert torch.equal(mask[b, : tok.n_body_tokens], tok.mask[: tok.n_body_tokens])
        real_rows = slice(tok.n_body_tokens, tok.n_body_tokens + kb)
        assert torch.equal(mask[b, real_rows], tok.mask[real_rows])
        assert not bool(mask[b, tok.n_body_tokens + kb:].any())


def test_full_prompts_when_sub_prompts_are_off() -> None:
    w = make_world(sub_prompt_p=0.0)
    _, kwargs, mask = make_batcher(w)(32, torch.Generator().manual_seed(4))
    assert bool(kwargs["class_mask"].all())
    assert bool((mask == make_batcher(w).tok.mask).all())


def test_k_max_2_never_draws_a_sub_prompt() -> None:
    w = make_world(k_max=2, sub_prompt_p=1.0)
    _, kwargs, _ = make_batcher(w)(8, torch.Generator().manual_seed(5))
    assert bool(kwargs["class_mask"].all())


@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
def test_null_prompts_appear_at_about_null_prompt_p(p: float) -> None:
    w = make_world(null_prompt_p=p)
    _, kwargs, _ = make_batcher(w)(4000, torch.Generator().manual_seed(6))
    frac = float(kwargs["null"].float().mean())
    assert abs(frac - p) < 0.03  # 4 binomial standard deviations at p = 0.25


def test_unseen_simulation_flags_one_class_and_gives_it_another_classes_row() -> None:
    w = make_world(unseen_row_p=1.0, sub_prompt_p=0.0)
    batcher = make_batcher(w)
    x0, kwargs, _ = batcher(32, torch.Generator().manual_seed(7))
    _, ids = recover(batcher, x0, kwargs)
    d, c = w.class_emb.shape[1], batcher.cond
    flags = kwargs["cond"][..., d]
    assert flags.sum(1).tolist() == [1.0] * 32
    for b in range(32):
        i = int(flags[b].argmax())
        own = (c.base.rows[ids[b, i]] - c.row_mean) / c.row_std
        assert not torch.allclose(kwargs["cond"][b, i, d + 1:], own)
    w = make_world(unseen_row_p=0.0)
    _, kwargs, _ = make_batcher(w)(32, torch.Generator().manual_seed(7))
    assert not bool(kwargs["cond"][..., d].any())


# ------------------------------------------------------------------ training and checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """30 steps of a width-32, depth-1 generator on an 8-p-model zoo stored on disk."""
    root = tmp_path_factory.mktemp("tina")
    w = make_world()
    store = ZooStore(root / "zoo")
    for j, (flat, ids) in enumerate(zip(w.zoo_flats, w.zoo_ids, strict=True)):
        e = ZooEntry(id=f"pm-{j:05d}", dataset="toy", arch=ARCH,
                     classes=[CLASSES[c] for c in ids], class_ids=ids.tolist(), seed=j,
                     train_size=0, val_acc=0.0, n_params=w.layout.n_params,
                     file=f"params/pm-{j:05d}.safetensors", finetune_s=0.0)
        store.put(e, flat)
    store.merge()
    entries, flats = store.load()
    reports: list[tuple[int, dict]] = []
    cfg_before = copy.deepcopy(w.cfg)
    gen, hist = train_generator(w.cfg, w.layout, w.generic_flat, w.generic_layout, w.has_row,
                                w.class_emb, flats, torch.tensor([e.class_ids for e in entries]),
                                w.meta, report=lambda s, m: reports.append((s, m)),
                                progress=False)
    gen.encoder = CharCountEncoder()
    ckpt = gen.save(root / "generator")
    return {"gen": gen, "hist": hist, "reports": reports, "ckpt": ckpt, "zoo": root / "zoo",
            "cfg": w.cfg, "cfg_before": cfg_before}


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_training_lowers_the_loss_and_reports_progress(trained: dict) -> None:
    loss = trained["hist"]["loss"]
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5
    assert [s for s, _ in trained["reports"]] == [0, 29]
    assert set(trained["reports"][-1][1]) == {"loss", "lr"}


def test_checkpoint_meta_copies_the_config_instead_of_aliasing_it(trained: dict) -> None:
    gen = trained["gen"]
    assert gen.meta["sample"] == vars(trained["cfg"].sample)
    gen.meta["sample"]["steps"] += 1
    try:
        assert trained["cfg"] == trained["cfg_before"]
    finally:
        gen.meta["sample"]["steps"] -= 1


def test_save_then_from_checkpoint_generates_identical_models(trained: dict) -> None:
    gen = trained["gen"]
    loaded = Generator.from_checkpoint(trained["ckpt"], CharCountEncoder(),
                                       expect={"dataset": "toy", "arch": ARCH,
                                               "encoder": "charcount"})
    prompts = [["alpha", "charlie"], ["echo", "bravo", "delta", "alpha"]]
    for a, b in zip(gen.generate(prompts, seeds=[3, 4]), loaded.generate(prompts, seeds=[3, 4]),
                    strict=True):
        assert torch.equal(weights(a), weights(b))
    assert [m.fc.out_features for m in loaded.generate(prompts)] == [2, 4]
    for use_ema in (False, True):  # both weight sets were saved
        c = gen.text_conditioning(prompts[:1])
        assert torch.equal(gen.sample(c, [9], use_ema=use_ema),
                           loaded.sample(loaded.text_conditioning(prompts[:1]), [9],
                                         use_ema=use_ema))


@pytest.mark.parametrize("encoder", [CharCountEncoder(version="v2"),
                                     CharCountEncoder(name="minilm")])
def test_from_checkpoint_refuses_another_encoder(trained: dict, encoder) -> None:
    with pytest.raises(CheckpointError, match="encoder"):
        Generator.from_checkpoint(trained["ckpt"], encoder)


@pytest.mark.parametrize(("expect", "match"), [({"arch": "cnn-1k"}, "cnn-1k"),
                                               ({"dataset": "cifar100"}, "cifar100"),
                                               ({"encoder": "clip"}, "clip")])
def test_from_checkpoint_refuses_a_config_that_asks_for_something_else(
        trained: dict, expect: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        Generator.from_checkpoint(trained["ckpt"], CharCountEncoder(), expect=expect)


def test_from_checkpoint_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tina.json"):
        Generator.from_checkpoint(tmp_path / "nowhere", CharCountEncoder())


@pytest.mark.parametrize(("name", "match"), [("tina.json", "not valid JSON"),
                                             ("tina.safetensors", "not a readable safetensors")])
def test_from_checkpoint_names_a_damaged_file(trained: dict, tmp_path: Path, name: str,
                                              match: str) -> None:
    for f in ("tina.json", "tina.safetensors"):
        data = (Path(trained["ckpt"]) / f).read_bytes()
        (tmp_path / f).write_bytes(data[: len(data) // 2] if f == name else data)  # truncated
    with pytest.raises(CheckpointError, match=match):
        Generator.from_checkpoint(tmp_path, CharCountEncoder())


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_prompt_generates_the_same_model_alone_and_inside_a_batch(trained: dict,
                                                                    sampler: str) -> None:
    gen = trained["gen"]
    prompt = ["delta", "alpha", "echo"]
    alone = gen.generate([prompt], seeds=[11], sampler=sampler)[0]
    batch = gen.generate([["bravo", "charlie"], prompt, ["echo", "foxtrot", "bravo", "alpha"]],
                         seeds=[5, 11, 6], sampler=sampler)
    torch.testing.assert_close(weights(batch[1]), weights(alone), atol=1e-5, rtol=0)
    assert not torch.allclose(weights(batch[0])[:300], weights(alone)[:300])
    other_seed = gen.generate([prompt], seeds=[12], sampler=sampler)[0]
    assert not torch.allclose(weights(other_seed), weights(alone))


def test_generation_never_reads_the_zoo(trained: dict) -> None:
    assert (trained["zoo"] / "manifest.jsonl").is_file()
    shutil.rmtree(trained["zoo"])
    gen = Generator.from_checkpoint(trained["ckpt"], CharCountEncoder())
    # a seen prompt, a held-out class and free text outside the label space
    models = gen.generate([["alpha", "bravo"], ["foxtrot", "charlie", "zulu"]], seeds=[0, 1])
    x = torch.rand(5, 1, 28, 28)
    assert [tuple(m(x).shape) for m in models] == [(5, 2), (5, 3)]
    assert all(bool(torch.isfinite(weights(m)).all()) for m in models)


def test_residual_scale_interpolates_toward_the_generic_model_except_unseen_rows(
        trained: dict) -> None:
    gen = trained["gen"]
    c = gen.text_conditioning([["alpha", "bravo"], ["foxtrot", "charlie", "zulu"]])
    full, none, half = (gen.sample(c, [0, 1], residual_scale=a) for a in (1.0, 0.0, 0.5))
    base = pad_rows(gen.layout, gen.base(c.row_source), c.k)
    rows = gen.layout.row_index()  # (K_max, d + 1)
    body = torch.ones(full.shape[1], dtype=torch.bool)
    body[rows.reshape(-1)] = False
    assert torch.equal(none[:, body], base[:, body])  # the generic body exactly
    for b, i in itertools.product(range(2), range(gen.k_max)):
        want = full if bool(c.flag[b, i]) else base  # unseen rows keep their generated row
        assert torch.equal(none[b, rows[i]], want[b, rows[i]])
    assert c.flag.sum() == 2  # foxtrot (held out) and zulu (free text)
    torch.testing.assert_close(half, (full + none) / 2)  # linear in the scale
    with pytest.raises(PromptError, match="residual_scale"):
        gen.sample(c, [0, 1], residual_scale=1.5)
