"""Frees the workers' CPUs of Ray Train runs whose Tune trial was stopped (ASHA) or failed.

A trial's Train controller is an actor owned by the trial's driver function: when Tune stops the
trial, the controller and its workers die with it, but the workers' placement group lives on
until the job ends (a placement group made by an actor outlives it). Ray Train's own
PlacementGroupCleaner asks the State API whether the controller lives, which needs the dashboard
and a single Ray instance per machine; without them (tests, busy shared machines) every stopped
trial leaked its workers' CPUs and the next trials waited forever. Here, instead:

- `RegisterRun` (a Train callback in each trial's RunConfig) sends the controller's handle and
  each worker group's placement group to a registry actor, keyed by trial id;
- `ReapRuns` (a Tune callback in the Tune driver) kills the controller of a finished, stopped or
  failed trial (so it cannot start another worker group) and removes its placement groups.

Uses Ray Train V2's worker-group callback hook (the one its PlacementGroupCleanerCallback uses;
`RunConfig.callbacks` passes non-user callbacks through for such workarounds): pinned Ray 2.60.
"""

from __future__ import annotations

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.util.placement_group import placement_group_table, remove_placement_group


@ray.remote(num_cpus=0)
class RunRegistry:
    """(controller, placement group) pairs of the trials' Train runs, by trial id."""

    def __init__(self) -> None:
        self.runs: dict[str, list] = {}
        self.ended: set[str] = set()

    def add(self, trial_id: str, controller, pg) -> None:
        self.runs.setdefault(trial_id, []).append((controller, pg))

    def pop(self, trial_id: str) -> list:
        """The trial's runs, forgotten; the trial counts as reaped from now on."""
        self.ended.add(trial_id)
        return self.runs.pop(trial_id, [])

    def reaped(self, trial_id: str) -> bool:
        """Whether `pop` ended this trial (its controller's death is then no failure)."""
        return trial_id in self.ended


class RegisterRun(WorkerGroupCallback):
    """Runs in the Train controller: registers each new worker group's placement group."""

    def __init__(self, registry, trial_id: str) -> None:
        self.registry, self.trial_id = registry, trial_id

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        ray.get(self.registry.add.remote(self.trial_id, controller, pg))


class ReapRuns(Callback):
    """Runs in the Tune driver: ends the Train run of every trial that ends."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def reap(self, trial_id: str) -> int:
        """Kill the trial's controllers, remove its live placement groups; return how many."""
        removed = 0
        for controller, pg in ray.get(self.registry.pop.remote(trial_id)):
            ray.kill(controller)  # no restart: a dying controller could start a new group
            if placement_group_table(pg).get("state") != "REMOVED":
                remove_placement_group(pg)
                removed += 1
        return removed

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.reap(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.reap(trial.trial_id)
