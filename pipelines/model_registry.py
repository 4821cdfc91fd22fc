"""The `register` stage: the pipeline's best classifier goes to the MLflow Model Registry, and
the alias (`champion`) moves to it only when it beats the current holder on the same split.

Candidates are this pipeline's classifier stages, the int8 (`quantize`) and distilled
(`distill`) models included: a smaller model that scores as well is a fair champion. For
each, the model is the one logged by the stage run that made the stage's current output
(tag `sparkloom.output_fingerprint`, not skipped), so a stage skipped as up to date still
offers the model an earlier run logged. The best candidate on `register.metric` becomes a
version of `register.name` (an existing version from the same run is reused). The alias
moves when there is no holder, or the holder was evaluated on the same data and split
(`sparkloom.data`) and the candidate is strictly better; otherwise it stays, and the run
says why. Every candidate and the decision are logged to the register stage's run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import Config, stage_output
from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.stages import CLASSIFIERS
from sparkloom.pipelines.tracking import making_run

log = logging.getLogger(__name__)


@dataclass
class RegisterResult:
    name: str
    metric: str
    candidates: list[dict[str, Any]]
    version: str | None  # the version registered (or reused) for the best candidate
    promoted: bool
    champion_before: dict[str, Any] | None
    reason: str
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        best = self.candidates[0]
        return (
            f"{self.name} v{self.version} ({best['stage']}, {self.metric} {best['value']:.4f}): "
            f"{self.reason}"
        )


def _better(metric: str, a: float, b: float) -> bool:
    return a < b if metric.endswith("loss") else a > b


def find_candidates(cfg: Config, catalog: Catalog, client: MlflowClient) -> list[dict[str, Any]]:
    """Per classifier stage: the run that logged its current model, and its metric value."""
    rc = cfg.register
    stages = rc.candidates or [s for s in cfg.pipeline.stages if s in CLASSIFIERS]
    if not stages:
        raise DataError(
            f"no classifier stage to register in pipeline.stages {list(cfg.pipeline.stages)}; "
            f"add one of {list(CLASSIFIERS)} or set register.candidates"
        )
    experiment = client.get_experiment_by_name(cfg.experiment)
    made = {s: catalog.manifest(stage_output(cfg, s)) for s in stages}
    missing = [s for s in stages if made[s] is None]
    if missing and (rc.candidates or len(missing) == len(stages)):
        raise DataError(f"register: no {_quoted(missing)} model yet; run "
                        f"{'that stage' if len(missing) == 1 else 'those stages'} first")  # fmt: skip
    if missing:  # the default candidates: the classifiers of pipeline.stages that have run
        log.warning("register: no %s model yet, so it is not a candidate (register.candidates "
                    "names the stages that must be)", _quoted(missing))  # fmt: skip
    found = []
    for stage in [s for s in stages if made[s] is not None]:
        run = making_run(experiment.experiment_id, stage, made[stage]["fingerprint"])
        if run is None:
            raise DataError(
                f"register: the current '{stage}' model was logged by no finished run in "
                f"experiment '{cfg.experiment}'; rerun it with --force so MLflow has it"
            )
        value = run.data.metrics.get(rc.metric)
        if value is None:
            raise DataError(f"register: the '{stage}' run {run.info.run_id} has no {rc.metric}")
        found.append({"stage": stage, "run_id": run.info.run_id, "value": float(value),
                      "data": run.data.tags.get("sparkloom.data", "")})  # fmt: skip
    found.sort(key=lambda c: c["value"], reverse=not rc.metric.endswith("loss"))
    return found


def _quoted(stages: list[str]) -> str:
    return " or ".join(f"'{s}'" for s in stages)


def register(cfg: Config, catalog: Catalog) -> RegisterResult:
    rc = cfg.register
    name = rc.name or cfg.pipeline.name
    client = MlflowClient()
    candidates = find_candidates(cfg, catalog, client)
    best = candidates[0]
    source = f"runs:/{best['run_id']}/model"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"sparkloom pipeline {cfg.pipeline.name}")
    same = client.search_model_versions(f"name = '{name}' and run_id = '{best['run_id']}'")
    if same:
        version = str(same[0].version)
    else:
        version = str(mlflow.register_model(source, name).version)
        for key, value in {"sparkloom.stage": best["stage"], "sparkloom.data": best["data"],
                           f"sparkloom.{rc.metric}": str(best["value"])}.items():  # fmt: skip
            client.set_model_version_tag(name, version, key, value)

    try:
        holder = client.get_model_version_by_alias(name, rc.alias)
    except MlflowException:
        holder = None
    before = None
    if holder is None:
        promoted, reason = True, f"no {rc.alias} yet: v{version} becomes {rc.alias}"
    else:
        held = holder.tags.get(f"sparkloom.{rc.metric}")
        before = {"version": str(holder.version), "value": float(held) if held else None,
                  "data": holder.tags.get("sparkloom.data", "")}  # fmt: skip
        if str(holder.version) == str(version):
            promoted, reason = False, f"v{version} is already {rc.alias}"
        elif before["data"] != best["data"]:
            promoted, reason = (
                False,
                (
                    f"{rc.alias} v{holder.version} was evaluated on other data or another split; "
                    f"kept (point the alias by hand to change it)"
                ),
            )
        elif before["value"] is None or _better(rc.metric, best["value"], before["value"]):
            promoted, reason = (
                True,
                (
                    f"v{version} {rc.metric} {best['value']:.4f} beats {rc.alias} v{holder.version}"
                    f" ({before['value'] if before['value'] is not None else 'no value'})"
                ),
            )
        else:
            promoted, reason = (
                False,
                (
                    f"v{version} {rc.metric} {best['value']:.4f} does not beat {rc.alias} "
                    f"v{holder.version} ({before['value']:.4f}); kept"
                ),
            )
    if promoted:
        client.set_registered_model_alias(name, rc.alias, version)
    log.info("register: %s", reason)
    return RegisterResult(name, rc.metric, candidates, str(version), promoted, before, reason)
