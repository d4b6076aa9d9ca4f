"""Specification of tina.conditioning: class tokens in prompt order, padded to K_max."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tina.backbones import ParamLayout, build_model
from tina.conditioning import Conditioner
from tina.tokens import ResidualBase

N, K_MAX, D = 7, 4, 12
UNSEEN = 3  # the generic model lacks this class


@pytest.fixture(scope="module")
def conditioner() -> Conditioner:
    torch.manual_seed(0)
    generic = build_model("cnn-400", 1, N)
    has_row = torch.ones(N, dtype=torch.bool)
    has_row[UNSEEN] = False
    with torch.no_grad():
        generic.fc.weight[UNSEEN] = 0
        generic.fc.bias[UNSEEN] = 0
    glayout = ParamLayout(generic)
    gflat = glayout.flatten({k: v.detach() for k, v in generic.named_parameters()})
    layout = ParamLayout(build_model("cnn-400", 1, K_MAX))
    base = ResidualBase(layout, gflat, glayout, has_row)
    class_emb = F.normalize(torch.randn(N, D), dim=-1)
    return Conditioner(class_emb, has_row, base, K_MAX)


def split(c: Conditioner, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cond (..., E) -> (embedding, flag, standardized base row)."""
    return cond[..., :D], cond[..., D], cond[..., D + 1:]


def std_row(c: Conditioner, class_id: int) -> torch.Tensor:
    return (c.base.rows[class_id] - c.row_mean) / c.row_std


def test_class_token_width_is_embedding_plus_flag_plus_row(conditioner: Conditioner) -> None:
    assert conditioner.dim == D + 1 + (8 + 1)  # cnn-400 head rows: 8 weights + bias


def test_padded_slots_have_zero_features_mask_false_and_no_row_source(
        conditioner: Conditioner) -> None:
    emb = torch.randn(2, K_MAX, D)  # garbage in the padding must not leak through
    known = torch.tensor([[0, 1, 2, 4], [5, 6, 0, 1]])
    c = conditioner.build(emb, known, torch.tensor([2, 3]))
    assert c.cond.shape == (2, K_MAX, conditioner.dim)
    assert c.class_mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert not bool(c.cond[0, 2:].any()) and not bool(c.cond[1, 3:].any())
    assert c.row_source[0, 2:].tolist() == [-1, -1] and c.row_source[1, 3] == -1
    assert c.k.tolist() == [2, 3]


def test_a_known_seen_class_uses_its_own_generic_row_and_flag_0(conditioner: Conditioner) -> None:
    known = torch.tensor([[6, 0, 4, 1]])
    emb = conditioner.class_emb[known.clamp_min(0)]
    c = conditioner.build(emb, known, torch.tensor([4]))
    assert c.row_source.tolist() == known.tolist()
    e, flag, rows = split(conditioner, c.cond[0])
    assert torch.equal(e, emb[0])
    assert flag.tolist() == [0.0] * 4
    for i, cid in enumerate(known[0].tolist()):
        torch.testing.assert_close(rows[i], std_row(conditioner, cid))


def test_an_unknown_class_takes_the_nearest_seen_names_row_by_cosine_and_flag_1(
        conditioner: Conditioner) -> None:
    torch.manual_seed(1)
    target = 5
    free_text = F.normalize(conditioner.class_emb[target] + 0.3 * torch.randn(D), dim=-1)
    sims = conditioner.class_emb @ free_text
    sims[UNSEEN] = -2.0
    assert int(sims.argmax()) == target  # the construction is what the test means
    emb = torch.zeros(1, K_MAX, D)
    emb[0, 0], emb[0, 1] = conditioner.class_emb[1], free_text
    c = conditioner.build(emb, torch.tensor([[1, -1, -1, -1]]), torch.tensor([2]))
    assert c.row_source[0, :2].tolist() == [1, target]
    _, flag, rows = split(conditioner, c.cond[0])
    assert flag[:2].tolist() == [0.0, 1.0]
    torch.testing.assert_close(rows[1], std_row(conditioner, target))


def test_nearest_seen_matches_brute_force_cosine_over_classes_with_a_row(
        conditioner: Conditioner) -> None:
    torch.manual_seed(2)
    emb = F.normalize(torch.randn(50, D), dim=-1)
    got = conditioner.nearest_seen(emb)
    sims = emb @ conditioner.class_emb.T
    sims[:, UNSEEN] = float("-inf")
    assert torch.equal(got, sims.argmax(-1))
    assert UNSEEN not in got.tolist()


def test_a_class_without_a_generic_row_is_never_its_own_base(conditioner: Conditioner) -> None:
    emb = conditioner.class_emb[UNSEEN].expand(1, K_MAX, D).clone()
    c = conditioner.build(emb, torch.full((1, K_MAX), -1), torch.tensor([1]))
    assert c.row_source[0, 0] != UNSEEN and c.row_source[0, 0] >= 0
    assert c.cond[0, 0, D] == 1.0


def test_exclude_keeps_a_class_from_choosing_itself(conditioner: Conditioner) -> None:
    emb = conditioner.class_emb[[4, 0]][None]  # (1, 2, D): exactly class 4's and class 0's names
    assert conditioner.nearest_seen(emb).tolist() == [[4, 0]]
    out = conditioner.nearest_seen(emb, exclude=torch.tensor([[4, -1]]))
    sims = conditioner.class_emb @ conditioner.class_emb[4]
    sims[[4, UNSEEN]] = float("-inf")
    assert out.tolist() == [[int(sims.argmax()), 0]]  # -1 excludes nothing


def test_build_with_exclude_simulates_an_unseen_class(conditioner: Conditioner) -> None:
    ids = torch.tensor([[2, 4, 0, 6]])
    known = ids.clone()
    known[0, 1] = -1  # pretend class 4 is unseen
    exclude = torch.tensor([[-1, 4, -1, -1]])
    c = conditioner.build(conditioner.class_emb[ids], known, torch.tensor([4]), exclude)
    assert c.row_source[0, 1] != 4
    assert c.row_source[0, [0, 2, 3]].tolist() == [2, 0, 6]
    assert c.cond[0, :, D].tolist() == [0.0, 1.0, 0.0, 0.0]
