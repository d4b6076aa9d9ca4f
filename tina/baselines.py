"""The methods Tina is compared with, as head rows or whole parameter vectors (issue 2).

Every function here is pure tensor code so that each baseline can be tested on its own:
- `retrieval_index` / `retrieval_rows`: the zoo p-model with the largest class overlap (ties by its
  validation accuracy), its rows moved to the task's positions, generic rows for what it lacks;
- `fit_ridge` / `ridge_rows`: a linear map (ridge regression with an unpenalized bias) from
  class-name embeddings to head rows, fit over every zoo row: the simplest "text -> classifier"
  generator, which Tina must beat;
- `nearest_name_rows`: a class without a generic row borrows the generic row of the seen class
  whose name embedding is the most similar (cosine), as Tina's conditioning does for its base row;
- `vote_names`: classify-then-text, the generic model names each class from its example images
  (majority vote), names kept distinct so that the result is a valid prompt.
A head row is the class's weight row followed by its bias: (d + 1,) float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tina.backbones import ParamLayout


def retrieval_index(task: Sequence[int], zoo_ids: torch.Tensor, zoo_val_acc: torch.Tensor) -> int:
    """Index of the zoo p-model whose classes overlap `task` the most.

    Args:
        task: the task's label-space class ids.
        zoo_ids: (M, K) int64 each zoo p-model's class ids (-1 = no class).
        zoo_val_acc: (M,) float validation accuracy of each p-model.
    Returns:
        m in [0, M): largest |task & zoo_ids[m]|, ties by the highest validation accuracy, then by
        the lowest index.
    Raises:
        ValueError: empty zoo.
    """
    if len(zoo_ids) == 0:
        raise ValueError("retrieval needs a non-empty zoo")
    t = torch.tensor(list(task), dtype=torch.long)
    overlap = (zoo_ids[:, :, None] == t[None, None, :]).any(-1).sum(-1)  # (M,)
    best = overlap == overlap.max()
    acc = torch.where(best, zoo_val_acc.double(), torch.full_like(zoo_val_acc.double(), -1e9))
    return int(torch.argmax(acc))  # argmax returns the first maximum: lowest index on ties


def retrieval_rows(task: Sequence[int], zoo_task: Sequence[int], zoo_rows: torch.Tensor,
                   generic_rows: torch.Tensor) -> torch.Tensor:
    """Head rows of the retrieved p-model, reordered to the task.

    Args:
        zoo_task: the retrieved p-model's class ids, row order; zoo_rows: (K_zoo, d+1) its rows.
        generic_rows: (N, d+1) generic rows (zero for classes the generic model lacks).
    Returns:
        (len(task), d+1): row i is the p-model's row of task[i] if it has that class, else the
        generic row of task[i].
    """
    pos = {int(c): j for j, c in enumerate(zoo_task)}
    return torch.stack([zoo_rows[pos[int(c)]] if int(c) in pos else generic_rows[int(c)]
                        for c in task])


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalized bias: min ||x w + b - y||^2 + lam ||w||^2.

    Args:
        x: (n, D) float inputs (class-name embeddings); y: (n, m) float targets (head rows).
        lam: L2 penalty (>= 0).
    Returns:
        (w (D, m), b (m,)) float32; solved in float64 on centred data (Hastie et al., ESL 3.4.1).
    """
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc + lam * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.lstsq(gram, xc.T @ yc).solution  # lstsq: stable when lam ~ 0 and D > n
    b = my - mx @ w
    return w.float(), b.float()


def ridge_rows(emb: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """emb (k, D) class-name embeddings -> predicted head rows (k, d+1) = emb w + b."""
    return emb @ w + b


def zoo_row_table(layout: ParamLayout, zoo_flats: torch.Tensor,
                  zoo_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real zoo row with its class: ((R,) int64 class ids, (R, d+1) rows)."""
    rows = zoo_flats[:, layout.row_index()]  # (M, K, d+1)
    real = zoo_ids >= 0
    return zoo_ids[real], rows[real]


def nearest_name_rows(task: Sequence[int], class_emb: torch.Tensor, has_row: torch.Tensor,
                      generic_rows: torch.Tensor) -> torch.Tensor:
    """Generic rows for a task, with classes lacking a row mapped to the nearest seen name.

    Args:
        class_emb: (N, D) unit name embeddings; has_row: (N,) bool; generic_rows: (N, d+1).
    Returns:
        (len(task), d+1): generic row of task[i] when it has one, else the generic row of the
        seen class (any seen class, as in `tina.conditioning.Conditioner.nearest_seen`) with the
        highest cosine similarity of names.
    """
    sim = class_emb @ class_emb.T
    sim = sim.masked_fill(~has_row[None, :], float("-inf"))
    src = [int(c) if bool(has_row[int(c)]) else int(sim[int(c)].argmax()) for c in task]
    return generic_rows[src]


def vote_names(logits: torch.Tensor, allowed: torch.Tensor) -> list[int]:
    """Name each prompt class from the generic model's logits on its example images.

    Args:
        logits: (K, n, N) float32 generic logits of n example images of each of K classes.
        allowed: (N,) bool classes the generic model can name (those with a row).
    Returns:
        K distinct label-space ids. Class i gets the id most of its images are classified as
        (ties by the mean softmax probability); when an earlier class already took that name, the
        next most likely one, so that the names form a valid prompt (no duplicates).
    Raises:
        ValueError: more classes than nameable ids.
    """
    k, _, n_cls = logits.shape
    if k > int(allowed.sum()):
        raise ValueError(f"{k} classes but only {int(allowed.sum())} nameable classes")
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    votes = torch.nn.functional.one_hot(probs.argmax(-1), n_cls).sum(1).double()  # (K, N)
    score = votes + probs.double().mean(1) * 0.5  # mean prob < 1: only breaks ties in votes
    score = score.masked_fill(~allowed, float("-inf"))
    taken: set[int] = set()
    out = []
    for i in range(k):
        for c in torch.argsort(score[i], descending=True).tolist():
            if c not in taken:
                taken.add(c)
                out.append(c)
                break
    return out
