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


def _holder(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def decision_fingerprint(cfg: Config) -> list:
    """What a decision is made from: the register section and the candidates' current models."""
    stages = cfg.register.candidates or [s for s in cfg.pipeline.stages if s in CLASSIFIERS]
    return [cfg.stage_hash("register"), sorted(stages)]


def register(cfg: Config, catalog: Catalog, force: bool = False) -> RegisterResult:
    """Register the best candidate and decide on the alias; skipped (the recorded decision)
    when the candidates' models, the section and the alias's holder are those it left."""
    from dataclasses import asdict

    from sparkloom.pipelines.catalog import fingerprint
    from sparkloom.pipelines.context import OUTPUT_FORMAT

    rc = cfg.register
    name = rc.name or cfg.pipeline.name
    client = MlflowClient()
    section, stages = decision_fingerprint(cfg)
    made = {s: (catalog.manifest(stage_output(cfg, s)) or {}).get("fingerprint") for s in stages}
    fp = fingerprint(OUTPUT_FORMAT, [section, stages], made)
    done = None if force else catalog.current("register_decision", fp)
    if done is not None and done.get("alias_version") == _holder(client, name, rc.alias):
        log.info("register: the candidates' models and the %s are as the last decision left "
                 "them; skipped", rc.alias)  # fmt: skip
        return RegisterResult(**{**done["result"], "skipped": True})
    result = _decide(cfg, catalog, client, name)
    catalog.write("register_decision", lambda tmp: None,
                  {"fingerprint": fp, "config_hash": cfg.stage_hash("register"),
                   "result": asdict(result), "alias_version": _holder(client, name, rc.alias)})  # fmt: skip
    return result


def _decide(cfg: Config, catalog: Catalog, client: MlflowClient, name: str) -> RegisterResult:
    rc = cfg.register
    candidates = find_candidates(cfg, catalog, client)
    frozen = None
    if (catalog.manifest("ingested") or {}).get("incremental"):
        frozen = FrozenEval(catalog, rc)
        for c in candidates:
            c["frozen"] = frozen.value(c["run_id"])
        candidates.sort(key=lambda c: c["frozen"], reverse=not rc.metric.endswith("loss"))
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
    if frozen is not None:
        promoted, reason, before = frozen.decide(client, name, version, best)
        if promoted:
            client.set_registered_model_alias(name, rc.alias, version)
        log.info("register: %s", reason)
        extra = {"eval_set": frozen.info}
        return RegisterResult(name, rc.metric, candidates, str(version), promoted, before, reason,
                              extra=extra)  # fmt: skip

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


# --- a frozen yardstick for incremental data -----------------------------------------------------

FROZEN_METRIC = {"test_accuracy": "accuracy", "test_f1": "f1", "test_macro_f1": "macro_f1",
                 "test_loss": "loss"}  # fmt: skip


class FrozenEval:
    """The test rows of batches up to `register.eval_batch`, recorded by id (dataset
    `eval_set`) the first time: every later register scores candidate and holder on these
    same rows, whatever batches came since. Rows whose file was since changed or dropped
    leave the set, and are counted."""

    def __init__(self, catalog: Catalog, rc):
        from pyspark.sql import functions as F

        self.rc, self.catalog = rc, catalog
        spark = catalog.spark
        made = catalog.manifest("eval_set")
        if made is None or made.get("batch") != rc.eval_batch:
            rows = catalog.read("ingested", "ingest").filter(
                (F.col("split") == "test") & (F.col("batch") <= rc.eval_batch)
            )
            ids = rows.select("id")
            n = ids.count()
            if not n:
                raise DataError(
                    f"register: no test rows in batches up to {rc.eval_batch} to evaluate on; "
                    "set register.eval_batch to a batch that has test rows"
                )
            catalog.write_parquet("eval_set", ids, {"batch": rc.eval_batch, "rows": n})
            made = catalog.manifest("eval_set")
        ids = spark.read.parquet(catalog.path("eval_set"))
        data = catalog.read("ingested", "ingest")
        self.image = "image" in data.columns
        col = "image" if self.image else "text"
        self.rows = data.join(ids, "id").select("id", col, "label").localCheckpoint()
        found = self.rows.count()
        self.info = {"batch": rc.eval_batch, "rows": found, "recorded": made["rows"],
                     "gone": made["rows"] - found, "created_at": made["created_at"],
                     "metric": FROZEN_METRIC[rc.metric]}  # fmt: skip
        if found < made["rows"]:
            log.warning("register: %d of the %d frozen evaluation rows are gone (their files "
                        "changed or were dropped); evaluating on the %d left",
                        made["rows"] - found, made["rows"], found)  # fmt: skip
        self._values: dict[str, float] = {}

    def value(self, run_id: str) -> float:
        """The metric of the model run `run_id` logged, on the frozen rows."""
        if run_id not in self._values:
            self._values[run_id] = self._evaluate(run_id)
        return self._values[run_id]

    def _evaluate(self, run_id: str) -> float:
        import numpy as np
        from pyspark.sql import functions as F

        from sparkloom.pipelines.report import classification_metrics
        from sparkloom.pipelines.scoring import resolve, score

        ref = resolve(f"runs:/{run_id}/model")
        col = "image" if self.image else "text"
        scored, _, _ = score(self.rows, ref, col, "id", prepared=self.image)
        scored = scored.join(self.rows.select("id", "label"), "id")
        if self.rc.metric == "test_loss":
            labels = F.array(*[F.lit(x) for x in ref.labels])
            p = F.element_at("probabilities", F.array_position(labels, F.col("label")).cast("int"))
            nll = F.avg(-F.log(F.greatest(F.coalesce(p, F.lit(0.0)), F.lit(1e-12))))
            return float(scored.agg(nll).first()[0] or 0.0)
        pairs = scored.groupBy("label", "predicted_label").count().collect()
        names = sorted({r["label"] for r in pairs} | {r["predicted_label"] for r in pairs})
        cm = np.zeros((len(names), len(names)))
        for r in pairs:
            cm[names.index(r["label"]), names.index(r["predicted_label"])] += r["count"]
        # classes the model predicts but the rows never hold count as errors only
        true = [i for i, x in enumerate(names) if cm[i].sum() > 0]
        m = classification_metrics(cm, names)
        if self.rc.metric == "test_macro_f1":  # over the classes the rows hold
            f1 = [m[f"f1_{k}"] for k in m if k.startswith("f1_")]
            return float(np.mean([f1[i] for i in true]))
        return m[FROZEN_METRIC[self.rc.metric]]

    def decide(self, client: MlflowClient, name: str, version: str,
               best: dict) -> tuple[bool, str, dict | None]:  # fmt: skip
        """Promote `version` when there is no holder, or it beats the holder's value on the
        frozen rows by more than register.min_delta; the reason names both figures."""
        rc, what = self.rc, f"{FROZEN_METRIC[self.rc.metric]} on the frozen set"
        client.set_model_version_tag(name, version, f"sparkloom.frozen_{rc.metric}",
                                     str(best["frozen"]))  # fmt: skip
        try:
            holder = client.get_model_version_by_alias(name, rc.alias)
        except MlflowException:
            holder = None
        cand = best["frozen"]
        if holder is None:
            return (
                True,
                f"no {rc.alias} yet: v{version} ({what} {cand:.4f}) becomes {rc.alias}",
                None,
            )
        try:
            held = self.value(holder.run_id)
        except Exception as e:  # the holder's run lost its model: it cannot be compared
            log.warning("register: %s v%s cannot be scored (%s)", rc.alias, holder.version,
                        str(e).splitlines()[0])  # fmt: skip
            held = None
        before = {"version": str(holder.version), "value": held,
                  "data": holder.tags.get("sparkloom.data", ""), "frozen": held}  # fmt: skip
        if str(holder.version) == str(version):
            return False, f"v{version} is already {rc.alias} ({what} {cand:.4f})", before
        if held is None:
            return True, f"v{version} ({what} {cand:.4f}) replaces an unscorable {rc.alias}", before
        gain = held - cand if rc.metric.endswith("loss") else cand - held
        figures = (f"v{version} {what} {cand:.4f} vs {rc.alias} v{holder.version} "
                   f"{held:.4f} ({len(self._values)} models scored on {self.info['rows']} rows)")  # fmt: skip
        if gain > rc.min_delta:
            return (
                True,
                f"{figures}: better by {gain:.4f} > min_delta {rc.min_delta:g}; promoted",
                before,
            )
        return False, f"{figures}: not better by more than min_delta {rc.min_delta:g}; kept", before
