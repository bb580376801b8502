"""The PBT engine behind the one engine interface (:mod:`dact_lib.engines`): ``PBTConfig.backend`` picks where the
members train — "threads" (:func:`dact_lib.tuning.pbt.run_pbt`, this process, resumable) or "ray"
(:func:`dact_lib.tuning.pbt_ray.run_pbt_ray`, Ray Tune; not resumable: Ray keeps its checkpoints only while it
runs). Its own module, so neither backend imports the other."""
from __future__ import annotations

from ..config import RunConfig
from ..errors import DactLabError
from .pbt import PBTConfig, PBTResult, run_pbt

__all__ = ["PBTConfig", "run_engine"]


def run_engine(cfg: RunConfig, settings: PBTConfig, ctx) -> PBTResult:
    """Run PBT of ``cfg`` with ``settings`` on its backend, in the engine context ``ctx``."""
    if settings.backend == "ray":
        if ctx.resume:
            raise DactLabError("a PBT run on Ray cannot be resumed (Ray keeps its checkpoints only while it runs): "
                               "start it again.")
        from .pbt_ray import run_pbt_ray

        return run_pbt_ray(cfg, pbt=settings, home=ctx.home, tracker=ctx.tracker, scheduler=settings.ray_scheduler,
                           callbacks=ctx.callbacks, cancel=ctx.cancel, run_id=ctx.run_id)
    return run_pbt(cfg, pbt=settings, home=ctx.home, tracker=ctx.tracker, cancel=ctx.cancel,
                   callbacks=ctx.callbacks, run_id=ctx.run_id, resume=ctx.resume)
