"""Specification of the resumable training state (tina.train_state) and the checkpoint hook of
tina.train.train_generator: a plain process resumed from a saved state ends where an
uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import make_world

from tina.errors import CheckpointError, ConfigError
from tina.train import Placement, train_generator
from tina.train_state import TrainState


def _train(w, **kwargs):
    return train_generator(w.cfg, w.layout, w.generic_flat, w.generic_layout, w.has_row,
                           w.class_emb, w.zoo_flats, w.zoo_ids, w.meta, progress=False, **kwargs)


def _weights(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_a_run_resumed_from_a_saved_state_ends_with_the_same_weights(tmp_path: Path) -> None:
    w = make_world(steps=12, checkpoint_every=4)
    seen: list[int] = []

    def keep(state: TrainState, make_generator) -> None:
        seen.append(state.step)
        state.save(tmp_path / f"step{state.step}")
        assert make_generator().layout.n_params == w.layout.n_params

    full, hist = _train(w, on_checkpoint=keep)
    assert seen == [4, 8, 12]
    state = TrainState.load(tmp_path / "step4")
    assert state.step == 4 and len(state.loss) == 4
    assert set(state.optimizer["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed, rhist = _train(w, resume=state)
    assert rhist["start_step"] == 4
    assert rhist["loss"] == pytest.approx(hist["loss"])
    assert torch.equal(_weights(resumed.parts.dit), _weights(full.parts.dit))
    assert torch.equal(_weights(resumed.parts.ema), _weights(full.parts.ema))


def test_ranks_split_the_global_batch_and_draw_their_own_batches() -> None:
    ranks = [Placement(rank=r, world_size=3) for r in range(3)]
    assert [p.batch_size(16) for p in ranks] == [6, 5, 5]
    assert ranks[0].batch_seed(7) == 7  # rank 0 of a fresh run: the plain process's stream
    assert len({p.batch_seed(7) for p in ranks} | {ranks[0].batch_seed(7, resumed_at=4)}) == 4


def test_val_every_must_fall_on_checkpoints() -> None:
    w = make_world(steps=4, checkpoint_every=3, val_every=4)
    with pytest.raises(ConfigError, match="multiple"):
        _train(w)


def test_loading_a_missing_state_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="state.json"):
        TrainState.load(tmp_path)
