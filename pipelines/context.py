"""What every catalog stage shares, written once.

A stage declares its inputs in `pipelines/stages.py`. `run_stage` requires them from the
catalog, builds the stage's fingerprint from its config section and theirs (plus anything
outside the catalog it reads, such as ingest's files), and skips the stage when its output
was made from exactly that fingerprint. The stage's own code gets a `StageContext` and only
does its work. The runner adds the MLflow child run, the start/done lines and the errors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyspark.sql import SparkSession

from sparkloom.pipelines.catalog import Catalog, fingerprint
from sparkloom.pipelines.config import Config, stage_output
from sparkloom.pipelines.stages import SPECS, maker

log = logging.getLogger(__name__)

R = TypeVar("R")
# joins every fingerprint: raised when outputs written by older code cannot be read back by
# this one (2: the package became sparkloom.*, and a saved Spark model names its Python
# transformers' classes by module, pipelines.images.PixelVectorizer before)
OUTPUT_FORMAT = 2
Extra = Callable[[SparkSession, Config, Catalog], Sequence[Any]]


@dataclass(frozen=True)
class StageContext:
    spark: SparkSession
    cfg: Config
    catalog: Catalog
    stage: str
    force: bool
    inputs: dict[str, dict]  # dataset -> its manifest, in the order the stage declares them
    fingerprint: str
    output: str | None  # the dataset it writes
    # what `extra` returned for the fingerprint (a model's content hash...): the body reuses
    # it instead of computing it again
    parts: tuple[Any, ...] = ()

    @property
    def upstream(self) -> dict:
        """The first declared input's manifest: the rows the stage reads."""
        return next(iter(self.inputs.values()))

    @property
    def config_hash(self) -> str:
        return self.cfg.stage_hash(self.stage)

    def common(self, **more: Any) -> dict:
        """The manifest keys every output carries: what made it."""
        return {"fingerprint": self.fingerprint, "config_hash": self.config_hash, **more}


def context(
    spark: SparkSession, cfg: Config, catalog: Catalog, stage: str, force: bool = False,
    extra: Extra | None = None,
) -> StageContext:  # fmt: skip
    """The stage's inputs (each must be in the catalog: the error names the stage to run) and
    its fingerprint: its config section, its inputs' fingerprints, then `extra`'s parts."""
    inputs = {d: catalog.require(d, maker(d)) for d in SPECS[stage].inputs_for(cfg)}
    parts = tuple(extra(spark, cfg, catalog)) if extra else ()
    # an incremental dataset names its rows by their batches, apart from its file listing
    made_from = (m.get("data_fingerprint", m["fingerprint"]) for m in inputs.values())
    fp = fingerprint(OUTPUT_FORMAT, cfg.stage_hash(stage), *made_from, *parts)
    return StageContext(spark, cfg, catalog, stage, force, inputs, fp, stage_output(cfg, stage),
                        parts)  # fmt: skip


def run_stage(ctx: StageContext, result: Callable[..., R], body: Callable[[StageContext], R]) -> R:
    """`body(ctx)`, or, when the output was made from this fingerprint and `force` is off,
    the result it recorded then, marked skipped."""
    done = None if ctx.force or not ctx.output else ctx.catalog.current(ctx.output, ctx.fingerprint)
    if done is not None:
        log.info("%s: output is current (same inputs and config); skipped", ctx.stage)
        return result(**{**done["result"], "skipped": True})
    return body(ctx)


def stage(name: str, result: Callable[..., R], extra: Extra | None = None):
    """Decorates a stage's body `f(ctx) -> R` into `run(spark, cfg, catalog, force=False) -> R`,
    which skips it when its output is current."""

    def wrap(body: Callable[[StageContext], R]) -> Callable[..., R]:
        @functools.wraps(body)
        def run(spark: SparkSession, cfg: Config, catalog: Catalog, force: bool = False) -> R:
            return run_stage(context(spark, cfg, catalog, name, force, extra), result, body)

        return run

    return wrap
