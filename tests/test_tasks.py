"""Specification of tina.tasks: label space, prompt validation, evaluation splits."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tina.config import DataConfig, EvalConfig
from tina.data import FASHION_CLASSES, MNIST_CLASSES, ImageSet
from tina.errors import ConfigError, PromptError
from tina.tasks import (
    LabelSpace,
    Splits,
    make_splits,
    max_overlap,
    normalize_name,
    sample_prompt_images,
    validate_prompt,
)

torch.set_num_threads(2)

CLASSES = FASHION_CLASSES + MNIST_CLASSES
DEFAULT = DataConfig()
# three disjoint forbidden pairs among the 16 seen classes leave 1,561 admissible zoo sets
PAIRS = [["T-shirt/top", "Pullover"], ["Sneaker", "Ankle boot"], ["digit 1", "digit 4"]]
EVAL = EvalConfig(n_val=10, n_id=10, n_ood=20, n_unseen=15, n_variable_k=8, variable_ks=[2, 5, 10])


def default_space() -> LabelSpace:
    return LabelSpace(list(CLASSES), list(DEFAULT.held_out))


def forbidden_ids(space: LabelSpace, pairs: list[list[str]]) -> set[frozenset[int]]:
    return {frozenset(space.index(c) for c in p) for p in pairs}


def holds_pair(task: tuple[int, ...], forbidden: set[frozenset[int]]) -> bool:
    return any(p <= set(task) for p in forbidden)


def check_splits(s: Splits, space: LabelSpace, pairs: list[list[str]], k: int, n_zoo: int,
                 cfg: EvalConfig) -> None:
    """Every invariant the splits promise."""
    forbidden = forbidden_ids(space, pairs)
    held = set(space.held_out_ids)
    zoo_sets = [frozenset(t) for t in s.zoo]
    assert len(s.zoo) == n_zoo and len(set(zoo_sets)) == n_zoo
    for t in s.zoo + s.val + s.id + s.ood:
        assert len(t) == k and len(set(t)) == k
    for t in s.zoo + s.val + s.id + s.ood + [t for v in s.variable_k.values() for t in v]:
        assert not held & set(t), "held-out class in a seen-only split"
    assert not any(holds_pair(t, forbidden) for t in s.zoo)
    assert all(holds_pair(t, forbidden) for t in s.val + s.ood)
    others = {name: [frozenset(t) for t in getattr(s, name)] for name in
              ("val", "ood", "unseen_1", "unseen_2")}
    others.update({f"k{kk}": [frozenset(t) for t in v] for kk, v in s.variable_k.items()})
    every = zoo_sets + [x for v in others.values() for x in v]
    assert len(set(every)) == len(every), "a class set appears twice across splits"
    zoo_order = {frozenset(t): t for t in s.zoo}
    assert len(s.id) == cfg.n_id
    for t in s.id:
        assert frozenset(t) in zoo_order and zoo_order[frozenset(t)] != t
    for m, tasks in ((1, s.unseen_1), (2, s.unseen_2)):
        assert len(tasks) == (cfg.n_unseen if len(held) >= m else 0)
        assert all(len(set(t) & held) == m and len(t) == k for t in tasks)
    assert sorted(s.variable_k) == sorted(cfg.variable_ks)
    for kk, tasks in s.variable_k.items():
        assert len(tasks) == cfg.n_variable_k and all(len(set(t)) == kk for t in tasks)


# ------------------------------------------------------------------------------------------------
# label space and prompts
# ------------------------------------------------------------------------------------------------

def test_index_ignores_case_and_whitespace():
    space = default_space()
    assert space.index("t-shirt/top ") == 0
    assert space.index("DIGIT  3") == 13
    assert space.canonical("  ankle   BOOT") == "Ankle boot"
    assert normalize_name("  Ankle \t Boot ") == "ankle boot"


def test_unknown_class_raises_prompt_error_with_a_close_suggestion():
    with pytest.raises(PromptError, match="did you mean 'digit 3'"):
        default_space().index("digit3")
    with pytest.raises(PromptError, match="'Sneaker'"):
        default_space().index("sneakers")


def test_held_out_names_derive_ids_and_an_unknown_held_out_name_is_rejected():
    space = default_space()
    assert space.held_out_ids == [5, 6, 13, 17]
    assert space.seen_ids == [i for i in range(20) if i not in (5, 6, 13, 17)]
    with pytest.raises(PromptError, match="unknown class 'Shrit'"):
        LabelSpace(list(CLASSES), ["Shrit"])


@pytest.mark.parametrize("names, k_max, message", [
    ([], 10, "prompt is empty"),
    ([f"c{i}" for i in range(12)], 10, "classes: 12 > K_max 10"),
    (["Sneaker", "Bag", " sneaker"], 10,
     "duplicate class 'sneaker' (positions 1 and 3, after case/space normalization)"),
    (["digit  3", "DIGIT 3"], 10, "duplicate class 'digit 3'"),
    (["Bag", 3], 10, "position 2 is int"),
    (["Bag", "   "], 10, "position 2 is empty"),
    (["x" * 201], 10, "201 characters > 200"),
    ("Bag", 10, "list of class names"),
])
def test_validate_prompt_rejects_bad_prompts_with_a_clear_message(names, k_max, message):
    with pytest.raises(PromptError) as e:
        validate_prompt(names, k_max)
    assert message in str(e.value)


def test_validate_prompt_allows_free_text_and_returns_stripped_names():
    names = [" a small striped cat ", "Sneaker", "quokka"]
    assert validate_prompt(names, 3) == ["a small striped cat", "Sneaker", "quokka"]


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------

def test_splits_on_the_default_label_space_meet_every_constraint():
    space = default_space()
    s = make_splits(space, PAIRS, k=10, n_zoo=60, eval_cfg=EVAL, seed=0)
    check_splits(s, space, PAIRS, 10, 60, EVAL)
    assert all(max_overlap(t, s.zoo) < 10 for t in s.ood)  # ood sets are never zoo sets


def test_splits_are_deterministic_by_seed_and_round_trip_through_json():
    space = default_space()
    a = make_splits(space, PAIRS, 10, 40, EVAL, seed=3)
    b = make_splits(space, PAIRS, 10, 40, EVAL, seed=3)
    c = make_splits(space, PAIRS, 10, 40, EVAL, seed=4)
    assert a == b and a != c
    back = Splits.from_json(json.loads(json.dumps(a.to_json())))
    assert back == a


DISJOINT_PAIRS = [["T-shirt/top", "Pullover"], ["Coat", "Dress"], ["Sneaker", "Ankle boot"],
                  ["digit 1", "digit 4"], ["digit 5", "digit 6"], ["digit 8", "digit 9"]]


def test_too_many_zoo_tasks_is_a_config_error_saying_what_to_change():
    # 6 disjoint pairs over 12 of 16 seen classes allow only 2**6 = 64 ten-class sets
    with pytest.raises(ConfigError, match="only 64 .* zoo.n_pmodels"):
        make_splits(default_space(), DISJOINT_PAIRS, 10, 300, EVAL, seed=0)


def test_the_default_forbidden_pairs_admit_the_default_zoo():
    splits = make_splits(default_space(), DEFAULT.forbidden_pairs, 10, 300, EVAL, seed=0)
    assert len(splits.zoo) == 300 and len({frozenset(t) for t in splits.zoo}) == 300


@pytest.mark.parametrize("change, message", [
    ({"n_id": 50}, "eval.n_id"),
    ({"variable_ks": [2, 12]}, "variable_ks"),
    ({"n_variable_k": 200}, "variable_k\\[2\\].*only 120"),
    ({"variable_ks": [2, 5, 2]}, "repeats"),
])
def test_unmeetable_eval_sizes_are_config_errors(change, message):
    cfg = EvalConfig(**{**EVAL.__dict__, **change})
    with pytest.raises(ConfigError, match=message):
        make_splits(default_space(), PAIRS, 10, 40, cfg, seed=0)


def test_val_and_ood_need_a_forbidden_pair_between_seen_classes():
    with pytest.raises(ConfigError, match="forbidden pair"):
        make_splits(default_space(), [["Shirt", "Bag"]], 10, 20, EVAL, seed=0)  # Shirt held out
    with pytest.raises(PromptError, match="Sneaker"):
        make_splits(default_space(), [["Sneakers", "Bag"]], 10, 20, EVAL, seed=0)


def test_a_large_label_space_uses_sampling_and_keeps_every_constraint():
    classes = [f"class {i}" for i in range(100)]
    held = [f"class {i}" for i in range(0, 100, 10)]
    rng = random.Random(0)
    pairs = [[f"class {a}", f"class {b}"] for a, b in
             (rng.sample(range(1, 100), 2) for _ in range(60))
             if a % 10 and b % 10]
    space = LabelSpace(classes, held)
    cfg = EvalConfig(n_val=10, n_id=20, n_ood=30, n_unseen=20, n_variable_k=10,
                     variable_ks=[2, 5, 10])
    s = make_splits(space, pairs, 10, 300, cfg, seed=1)
    check_splits(s, space, pairs, 10, 300, cfg)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(6, 14), n_held=st.integers(0, 3), k=st.integers(2, 5),
       n_zoo=st.integers(1, 12), seed=st.integers(0, 2**31), data=st.data())
def test_splits_keep_every_constraint_or_raise_config_error(n, n_held, k, n_zoo, seed, data):
    classes = [f"c{i}" for i in range(n)]
    held = classes[n - n_held:]
    pair = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] != p[1])
    seen_pair = st.tuples(st.integers(0, n - n_held - 1), st.integers(0, n - n_held - 1)).filter(
        lambda p: p[0] != p[1])
    pair_ids = [data.draw(seen_pair)] + data.draw(st.lists(pair, max_size=5))
    pairs = [[classes[a], classes[b]] for a, b in pair_ids]
    cfg = EvalConfig(n_val=data.draw(st.integers(0, 4)), n_id=min(n_zoo, 3),
                     n_ood=data.draw(st.integers(0, 4)), n_unseen=2, n_variable_k=2,
                     variable_ks=sorted({2, k}))
    space = LabelSpace(classes, held)
    try:
        s = make_splits(space, pairs, k, n_zoo, cfg, seed)
    except ConfigError as e:
        if str(e).startswith("zoo:"):  # refused only when the zoo really cannot be filled
            forbidden = forbidden_ids(space, pairs)
            admissible = sum(not holds_pair(t, forbidden)
                             for t in itertools.combinations(space.seen_ids, k))
            assert admissible < n_zoo
        return
    check_splits(s, space, pairs, k, n_zoo, cfg)
    assert make_splits(space, pairs, k, n_zoo, cfg, seed) == s


@given(task=st.sets(st.integers(0, 20), min_size=1, max_size=8),
       zoo=st.lists(st.sets(st.integers(0, 20), min_size=1, max_size=8), max_size=5))
def test_max_overlap_is_the_largest_shared_class_count(task, zoo):
    got = max_overlap(tuple(task), [tuple(z) for z in zoo])
    assert got == max([len(task & z) for z in zoo] + [0])
    if task in zoo:
        assert got == len(task)


# ------------------------------------------------------------------------------------------------
# image prompts
# ------------------------------------------------------------------------------------------------

def test_sample_prompt_images_gives_distinct_training_images_per_class_in_prompt_order():
    labels = torch.arange(30) % 3
    images = torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 1, 4, 4).contiguous()
    train = ImageSet(images, labels, ["a", "b", "c"])
    out = sample_prompt_images(train, [2, 0], 4, torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 1, 4, 4) and out.dtype == torch.uint8
    ids = out[:, :, 0, 0, 0]
    assert (ids[0] % 3 == 2).all() and (ids[1] % 3 == 0).all()
    assert len(set(ids.flatten().tolist())) == 8
    with pytest.raises(ValueError, match="has 10 training images < 11"):
        sample_prompt_images(train, [1], 11)
