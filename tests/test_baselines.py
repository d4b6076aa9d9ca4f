"""Specification of tina.baselines: the methods Tina is compared with."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tina.backbones import ParamLayout, build_model
from tina.baselines import (
    fit_ridge,
    nearest_name_rows,
    retrieval_index,
    retrieval_rows,
    ridge_rows,
    vote_names,
    zoo_row_table,
)


def test_retrieval_picks_the_zoo_task_with_the_largest_class_overlap():
    zoo_ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 5, 6]])
    acc = torch.tensor([0.99, 0.5, 0.1])
    assert retrieval_index((5, 6, 0, 9), zoo_ids, acc) == 2  # overlap 3 beats a better model's 1
    assert retrieval_index((4, 5, 6, 7), zoo_ids, acc) == 1  # the same class set in any order


def test_retrieval_breaks_overlap_ties_by_val_accuracy_then_by_index():
    zoo_ids = torch.tensor([[0, 1, 8, 9], [0, 1, 6, 7], [1, 0, 4, 5], [2, 3, 4, 5]])
    # overlaps with (0, 1, 5, 6): 2, 3, 3, 1; the better of the two with 3 wins
    assert retrieval_index((0, 1, 5, 6), zoo_ids, torch.tensor([0.95, 0.6, 0.8, 0.99])) == 2
    assert retrieval_index((0, 1, 2, 3), zoo_ids, torch.tensor([0.7, 0.9, 0.8, 0.1])) == 1
    assert retrieval_index((0, 1, 8, 7), zoo_ids, torch.tensor([0.9, 0.9, 0.5, 0.5])) == 0
    with pytest.raises(ValueError, match="non-empty zoo"):
        retrieval_index((0, 1), torch.empty(0, 4, dtype=torch.long), torch.empty(0))


def test_retrieval_rows_follow_the_task_order_and_fill_missing_classes_with_generic_rows():
    generic_rows = torch.arange(10.0)[:, None].repeat(1, 3)  # row c = [c, c, c]
    generic_rows[9] = 0  # class 9 is held out: the generic model has a zero row for it
    zoo_task = [3, 1, 4, 2]
    zoo_rows = 100 + torch.arange(4.0)[:, None].repeat(1, 3)  # zoo row j = 100 + j
    rows = retrieval_rows((4, 7, 3, 9), zoo_task, zoo_rows, generic_rows)
    assert rows[:, 0].tolist() == [102.0, 7.0, 100.0, 0.0]


def test_ridge_recovers_an_exact_linear_map_with_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g)
    w_true, b_true = torch.randn(12, 5, generator=g), torch.randn(5, generator=g)
    w, b = fit_ridge(x, x @ w_true + b_true, lam=1e-8)
    torch.testing.assert_close(w, w_true, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, b_true, atol=1e-4, rtol=1e-4)
    new = torch.randn(3, 12, generator=g)
    torch.testing.assert_close(ridge_rows(new, w, b), new @ w_true + b_true, atol=1e-4,
                               rtol=1e-4)


def test_ridge_penalty_shrinks_the_map_but_not_the_bias():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g) + 3.0
    w_small, _ = fit_ridge(x, y, 1e-3)
    w_big, b_big = fit_ridge(x, y, 1e6)
    assert w_big.norm() < 0.01 * w_small.norm()
    torch.testing.assert_close(b_big, y.mean(0), atol=1e-2, rtol=1e-3)  # predicts the mean row


def test_zoo_row_table_pairs_every_real_zoo_row_with_its_class():
    layout = ParamLayout(build_model("cnn-400", 1, 3))
    flats = torch.randn(2, layout.n_params)
    ids = torch.tensor([[5, 2, 7], [1, 5, -1]])
    cls, rows = zoo_row_table(layout, flats, ids)
    assert cls.tolist() == [5, 2, 7, 1, 5]
    torch.testing.assert_close(rows[4], flats[1, layout.row_index()[1]])


def test_nearest_name_rows_give_held_out_classes_the_row_of_the_most_similar_seen_name():
    emb = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.2, 0.9, 0.1]]), dim=1)
    has_row = torch.tensor([True, True, True, False])
    generic_rows = torch.tensor([[1.0, 1], [2.0, 2], [3.0, 3], [0.0, 0]])
    rows = nearest_name_rows((3, 0, 2), emb, has_row, generic_rows)
    assert rows[:, 0].tolist() == [2.0, 1.0, 3.0]  # class 3 reads closest to class 1


def _logits_for(predictions: list[list[int]], n_cls: int, second: int | None = None):
    """(K, n, N) logits whose argmax per image is predictions[k][i] (second choice: `second`)."""
    k, n = len(predictions), len(predictions[0])
    logits = torch.zeros(k, n, n_cls)
    for a in range(k):
        for i, c in enumerate(predictions[a]):
            logits[a, i, c] = 5.0
            if second is not None and second != c:
                logits[a, i, second] = 2.0
    return logits


def test_vote_names_take_the_majority_prediction_of_each_class():
    logits = _logits_for([[2, 2, 0], [1, 3, 3]], n_cls=5)
    assert vote_names(logits, torch.ones(5, dtype=torch.bool)) == [2, 3]


def test_vote_names_give_a_later_class_its_next_most_likely_name_instead_of_a_duplicate():
    logits = _logits_for([[2, 2, 2], [2, 2, 4]], n_cls=5, second=1)
    names = vote_names(logits, torch.ones(5, dtype=torch.bool))
    assert names[0] == 2
    assert names[1] == 4  # its own majority (2) is taken; 4 got one vote, 1 only second places
    assert len(set(names)) == len(names)


def test_vote_names_never_name_a_class_without_a_generic_row():
    logits = _logits_for([[3, 3], [3, 0]], n_cls=4)
    allowed = torch.tensor([True, True, True, False])
    names = vote_names(logits, allowed)
    assert 3 not in names and len(set(names)) == 2
    with pytest.raises(ValueError, match="nameable"):
        vote_names(torch.zeros(4, 1, 4), allowed)
