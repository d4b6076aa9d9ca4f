"""The label space, prompt validation, task sampling, and the fixed evaluation splits.

A *task* is an ordered tuple of class ids (the prompt order: head row i means class i). The splits
follow the paper's generalization studies (Tina, arXiv 2405.14132, Sec. 4): the zoo's p-models are
trained on seen classes only and never on a *forbidden pair* of classes together, so that

- `id`  reuses zoo class sets in a new order (in-distribution prompts),
- `val` and `ood` hold at least one forbidden pair: class combinations no zoo task ever showed,
- `unseen_1` / `unseen_2` hold exactly one / two held-out classes (never in any zoo task),
- `variable_k` has seen-only tasks of fewer classes than K_max (classification-sequence padding).

No class set appears in two splits, except that `id` reuses zoo sets by design.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tina.config import EvalConfig
from tina.data import ImageSet, _gather
from tina.errors import ConfigError, PromptError

MAX_NAME_CHARS = 200  # longer prompt entries are rejected (descriptions fit well within this)
_ENUMERATE_LIMIT = 200_000  # below this many candidate sets, enumerate them: exact feasibility


def normalize_name(name: str) -> str:
    """Lower-case, strip, underscores as spaces, collapse whitespace: " DIGIT  3" -> "digit 3".

    Underscores count as spaces because dataset files spell names both ways ("maple_tree" in
    CIFAR-100's meta file, "maple tree" as shown).
    """
    return " ".join(name.replace("_", " ").split()).lower()


@dataclass
class LabelSpace:
    """A dataset's classes (label order) and the classes held out of every zoo and training task.

    seen_ids / held_out_ids are derived; an unknown held-out name raises PromptError.
    """

    classes: list[str]
    held_out: list[str] = field(default_factory=list)
    seen_ids: list[int] = field(init=False)
    held_out_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self._lookup: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            key = normalize_name(c)
            if key in self._lookup:
                raise ConfigError(f"classes {self.classes[self._lookup[key]]!r} and {c!r} are the "
                                  f"same after case/space normalization; rename one")
            self._lookup[key] = i
        self.held_out_ids = sorted({self.index(h) for h in self.held_out})
        held = set(self.held_out_ids)
        self.seen_ids = [i for i in range(len(self.classes)) if i not in held]

    def index(self, name: str) -> int:
        """Class id of `name`, case- and whitespace-insensitive.

        Raises PromptError naming the closest known classes (difflib) when `name` is unknown.
        """
        key = normalize_name(name) if isinstance(name, str) else None
        if key is not None and key in self._lookup:
            return self._lookup[key]
        close = difflib.get_close_matches(key or "", list(self._lookup), n=3, cutoff=0.5)
        if close:
            hint = " or ".join(repr(self.classes[self._lookup[c]]) for c in close)
            raise PromptError(f"unknown class {name!r}; did you mean {hint}?")
        more = " ..." if len(self.classes) > 30 else ""
        raise PromptError(f"unknown class {name!r}; known classes: "
                          f"{', '.join(self.classes[:30])}{more}")

    def canonical(self, name: str) -> str:
        """The class's name as the dataset spells it. Raises PromptError when unknown."""
        return self.classes[self.index(name)]


def validate_prompt(names: Sequence[str], k_max: int) -> list[str]:
    """Check a prompt (class names or free-text descriptions) and return the stripped names.

    Names need not be in the label space (unseen classes and descriptions are allowed). Raises
    PromptError: not a list of strings, empty prompt, an empty or over-200-character name, more
    than `k_max` names, or a duplicate after case/space normalization (positions are 1-based).
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise PromptError(f"prompt must be a list of class names, got {type(names).__name__}")
    if len(names) == 0:
        raise PromptError("prompt is empty")
    out = []
    for pos, name in enumerate(names, 1):
        if not isinstance(name, str):
            raise PromptError(f"class at position {pos} is {type(name).__name__}, not a string")
        if not name.strip():
            raise PromptError(f"class at position {pos} is empty")
        if len(name.strip()) > MAX_NAME_CHARS:
            raise PromptError(f"class at position {pos} has {len(name.strip())} characters "
                              f"> {MAX_NAME_CHARS}")
        out.append(name.strip())
    if len(out) > k_max:
        raise PromptError(f"classes: {len(out)} > K_max {k_max}")
    first: dict[str, int] = {}
    for pos, name in enumerate(out, 1):
        key = normalize_name(name)
        if key in first:
            raise PromptError(f"duplicate class {key!r} (positions {first[key]} and {pos}, after "
                              f"case/space normalization)")
        first[key] = pos
    return out


Task = tuple[int, ...]


@dataclass
class Splits:
    """The fixed task lists (ordered class-id tuples) every stage and evaluation uses.

    zoo: seen-only, K = k, no forbidden pair, distinct class sets. val / ood: seen-only, at least
    one forbidden pair, sets disjoint from the zoo and from each other. id: zoo sets in a new
    order. unseen_1 / unseen_2: exactly 1 / 2 held-out classes. variable_k: K -> seen-only tasks.
    """

    zoo: list[Task]
    val: list[Task]
    id: list[Task]
    ood: list[Task]
    unseen_1: list[Task]
    unseen_2: list[Task]
    variable_k: dict[int, list[Task]]

    def reference_tasks(self) -> list[Task]:
        """The tasks the protocol fine-tunes a `finetuned` reference for (val, ood, unseen_1,
        unseen_2), each once, in that order."""
        return list(dict.fromkeys(self.val + self.ood + self.unseen_1 + self.unseen_2))

    def to_json(self) -> dict:
        """JSON-able dict (lists of lists; variable_k keys as strings)."""
        out: dict = {name: [list(t) for t in getattr(self, name)]
                     for name in ("zoo", "val", "id", "ood", "unseen_1", "unseen_2")}
        out["variable_k"] = {str(k): [list(t) for t in v] for k, v in self.variable_k.items()}
        return out

    @classmethod
    def from_json(cls, d: dict) -> Splits:
        """Inverse of `to_json`. Raises ConfigError on missing keys."""
        try:
            lists = {name: [tuple(int(c) for c in t) for t in d[name]]
                     for name in ("zoo", "val", "id", "ood", "unseen_1", "unseen_2")}
            var = {int(k): [tuple(int(c) for c in t) for t in v]
                   for k, v in d["variable_k"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed splits JSON: {e!r}") from e
        return cls(**lists, variable_k=var)


def max_overlap(task: Sequence[int], zoo: Sequence[Sequence[int]]) -> int:
    """Largest |set(task) & set(z)| over the zoo tasks z (0 for an empty zoo)."""
    s = set(task)
    return max((len(s & set(z)) for z in zoo), default=0)


def _choose_sets(rng: random.Random, n: int, held: list[int], m: int, seen: list[int], size: int,
                 ok: Callable[[frozenset[int]], bool], used: set[frozenset[int]], what: str,
                 fix: str) -> list[frozenset[int]]:
    """n distinct class sets of m held-out + (size - m) seen classes with ok(set), not in `used`.

    Uniform over the allowed sets: drawn by rejection; when that stalls and the candidates are
    few enough, they are enumerated, so "not enough sets" is exact. Adds the chosen sets to
    `used`. Raises ConfigError (ending with `fix`) when fewer than n sets exist.
    """
    if n <= 0:
        return []
    if m > len(held) or size - m > len(seen) or size - m < 0:
        raise ConfigError(f"{what}: needs {m} held-out and {size - m} seen classes per task, but "
                          f"there are {len(held)} held-out and {len(seen)} seen; {fix}")
    exact = math.comb(len(held), m) * math.comb(len(seen), size - m) <= _ENUMERATE_LIMIT
    budget = 50 * n + 1_000 if exact else 200 * n + 20_000
    chosen: list[frozenset[int]] = []
    taken: set[frozenset[int]] = set()
    for _ in range(budget):
        if len(chosen) == n:
            break
        s = frozenset(rng.sample(held, m) + rng.sample(seen, size - m))
        if s not in used and s not in taken and ok(s):
            taken.add(s)
            chosen.append(s)
    if len(chosen) < n and not exact:
        raise ConfigError(f"{what}: found only {len(chosen)} of {n} class sets meeting the "
                          f"constraints in {budget} draws; {fix}")
    if len(chosen) < n:  # rare sets (e.g. a zoo near its limit): enumerate them all
        cands = [s for a in itertools.combinations(held, m)
                 for b in itertools.combinations(seen, size - m)
                 if (s := frozenset(a + b)) not in used and ok(s)]
        if len(cands) < n:
            raise ConfigError(f"{what}: asked for {n} distinct class sets, but only {len(cands)} "
                              f"meet the constraints; {fix}")
        chosen = rng.sample(cands, n)
    used.update(chosen)
    return chosen


def _ordered(rng: random.Random, s: frozenset[int]) -> Task:
    order = sorted(s)  # sorted first: the order depends on the seed only, not on set iteration
    rng.shuffle(order)
    return tuple(order)


def make_splits(space: LabelSpace, forbidden_pairs: list[list[str]], k: int, n_zoo: int,
                eval_cfg: EvalConfig, seed: int) -> Splits:
    """Sample every task list deterministically from `seed` (random.Random).

    Sizes: n_zoo zoo tasks of k classes; eval_cfg.n_val, n_id, n_ood, n_unseen (each of unseen_1
    and unseen_2; empty when fewer than 1 / 2 classes are held out), n_variable_k per K in
    variable_ks (each K <= k). Forbidden pairs that touch a held-out class constrain nothing.
    Raises PromptError (unknown class in a forbidden pair) and ConfigError (malformed pair, or
    constraints that cannot be met, with what to change).
    """
    rng = random.Random(seed)
    partners: dict[int, set[int]] = {}
    for pair in forbidden_pairs:
        if len(pair) != 2:
            raise ConfigError(f"forbidden pair {pair!r}: expected two class names")
        a, b = (space.index(c) for c in pair)
        if a == b:
            raise ConfigError(f"forbidden pair {pair!r} names one class twice")
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)

    def has_pair(s: frozenset[int]) -> bool:
        return any(partners.get(c, set()) & s for c in s)

    seen, held = space.seen_ids, space.held_out_ids
    seen_pairs = sum(1 for a in seen for b in partners.get(a, ()) if a < b and b in seen)
    if k < 2 or k > len(seen):
        raise ConfigError(f"zoo.k = {k}: need 2 <= k <= {len(seen)} (the seen classes)")
    used: set[frozenset[int]] = set()
    zoo = _choose_sets(rng, n_zoo, held, 0, seen, k, lambda s: not has_pair(s), used, "zoo",
                       "lower zoo.n_pmodels or zoo.k, or drop data.forbidden_pairs / held_out")
    need_pair_fix = ("add data.forbidden_pairs between seen classes, or lower eval.n_val / "
                     "eval.n_ood")
    if seen_pairs == 0 and (eval_cfg.n_val or eval_cfg.n_ood):
        raise ConfigError(f"val/ood tasks need a forbidden pair of seen classes, and there is "
                          f"none; {need_pair_fix}")
    val = _choose_sets(rng, eval_cfg.n_val, held, 0, seen, k, has_pair, used, "val",
                       need_pair_fix)
    ood = _choose_sets(rng, eval_cfg.n_ood, held, 0, seen, k, has_pair, used, "ood",
                       need_pair_fix)
    zoo_tasks = [_ordered(rng, s) for s in zoo]
    if eval_cfg.n_id > len(zoo_tasks):
        raise ConfigError(f"eval.n_id = {eval_cfg.n_id} > {len(zoo_tasks)} zoo tasks; lower "
                          f"eval.n_id or raise zoo.n_pmodels")
    id_tasks = []
    for t in rng.sample(zoo_tasks, eval_cfg.n_id):
        new = t
        while new == t:  # k >= 2, so another order exists
            new = _ordered(rng, frozenset(t))
        id_tasks.append(new)
    unseen = {}
    for m in (1, 2):
        n = eval_cfg.n_unseen if len(held) >= m else 0
        sets = _choose_sets(rng, n, held, m, seen, k, lambda s: True, used, f"unseen_{m}",
                            "lower eval.n_unseen")
        unseen[m] = [_ordered(rng, s) for s in sets]
    variable_k = {}
    if len(set(eval_cfg.variable_ks)) != len(eval_cfg.variable_ks):
        raise ConfigError(f"eval.variable_ks {eval_cfg.variable_ks} repeats a K; list each once")
    for kk in eval_cfg.variable_ks:
        if not 1 <= kk <= k:
            raise ConfigError(f"eval.variable_ks holds {kk}: each K must be in [1, zoo.k = {k}]")
        sets = _choose_sets(rng, eval_cfg.n_variable_k, held, 0, seen, kk, lambda s: True, used,
                            f"variable_k[{kk}]", "lower eval.n_variable_k or change variable_ks")
        variable_k[kk] = [_ordered(rng, s) for s in sets]
    return Splits(zoo=zoo_tasks, val=[_ordered(rng, s) for s in val], id=id_tasks,
                  ood=[_ordered(rng, s) for s in ood], unseen_1=unseen[1], unseen_2=unseen[2],
                  variable_k=variable_k)


def sample_prompt_images(train: ImageSet, class_ids: Sequence[int], n_per_class: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, n, C, H, W) uint8: n_per_class distinct training images of each class, prompt order.

    For image prompts (CLIP image embeddings replace text; Tina Sec. 4.4). Raises ValueError when
    a class has fewer than n_per_class images.
    """
    picks = []
    for c in class_ids:
        rows = train.class_indices(int(c))
        if len(rows) < n_per_class:
            raise ValueError(f"class {train.classes[int(c)]!r} has {len(rows)} training images "
                             f"< {n_per_class} requested")
        picks.append(rows[torch.randperm(len(rows), generator=generator)[:n_per_class]])
    rows = torch.cat(picks) if picks else torch.empty(0, dtype=torch.int64)
    images = _gather(train.images, rows)
    return images.reshape(len(picks), n_per_class, *train.images.shape[1:])
