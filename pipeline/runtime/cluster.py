"""Connecting a job's driver to Ray.

``ray.init()`` without an address attaches to a Ray already running on this
machine (``ray start``) when there is one, and starts a private local Ray
otherwise; ``ray.address`` or ``RAY_ADDRESS`` names a cluster. Only the jobs
that run on Ray Data (prepare, score) pay for importing it.
"""

from __future__ import annotations

import logging
import os

from pipeline.config import Config
from pipeline.errors import UsageError
from pipeline.runtime import native_logs

log = logging.getLogger("jobs")


def ray_target(cfg: Config) -> str:
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        return f"the Ray cluster at {address}"
    return "the Ray already running on this machine (ray start), else a local Ray started by this process"


def start_ray(cfg: Config, data: bool = False) -> None:
    """Connect to the configured cluster, to RAY_ADDRESS, to a Ray running on
    this machine, or start a local Ray; ``data``: the job uses Ray Data (its
    progress bars are turned off). Reuses a Ray already initialised in this
    process (tests share one)."""
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
        env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        kwargs: dict = {"address": address, "logging_level": logging.WARNING}
        if address is None:
            kwargs.update(runtime_env={"env_vars": env}, include_dashboard=False)
            if not native_logs.verbose():
                # A private Ray on this machine: Ray's notice about its default
                # authentication mode says nothing to act on.
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise UsageError(f"cannot connect to Ray at {address}: {exc}") from None
        native_logs.filter_ray_worker_logs()
        log.info("ray: %s", ray.get_runtime_context().gcs_address)
    if data:
        native_logs.quiet_ray_data()
