"""Set-up run by every Ray worker process of the local cluster `jobs.common.init_ray` starts
(its `worker_process_setup_hook`); stdlib only, as every worker pays for its imports."""

from __future__ import annotations

import logging


def quiet_placement_group_cleaner() -> None:
    """Silence Ray Train's PlacementGroupCleaner on a cluster without a dashboard.

    The cleaner asks the State API (served by the dashboard) every second whether its run's
    controller still lives, and without one logs a warning each time (hundreds per pipeline).
    It only frees the placement group of a controller that crashed, which the local cluster's
    shutdown frees anyway. Errors still show.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)
