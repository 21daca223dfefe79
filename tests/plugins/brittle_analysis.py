"""A test-only analysis that fails: its error is the analysis's, not the trial's. `stop: true`
makes it raise a stop request instead, which must end the trial as any stop does."""

from common.config import Frozen
from methods.analysis import Column, register_analysis
from methods.training import Interrupted


class BrittleConfig(Frozen):
    stop: bool = False


@register_analysis("brittle", columns={"brittle_value": Column()}, config=BrittleConfig, description="test: raises")
def brittle(ctx, model, config) -> dict[str, float]:
    if config.stop:
        raise Interrupted("stop requested inside an analysis")
    raise RuntimeError("deliberate analysis failure")
