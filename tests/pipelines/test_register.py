"""The register stage on real stages and a real MLflow registry (sqlite): the champion alias
moves only when a new model beats it on the same test split."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config

GOOD = {"grid": {"reg_param": [0.01], "max_iter": [50]}}
BAD = {"grid": {"reg_param": [1000.0], "max_iter": [1]}}  # near-zero weights: a poor model


def test_champion_moves_only_on_improvement(spark, tmp_path, text_dirs):
    def run(baseline: dict, force: bool = False):
        cfg = make_config(
            tmp_path,
            pipeline={"stages": ["ingest", "features", "baseline", "register", "compare"]},
            ingest={"format": "text_dirs", "path": str(text_dirs)},
            baseline=baseline,
            register={"name": "tiny-text", "metric": "test_f1"},
        )
        return run_pipeline(spark, cfg, list(cfg.pipeline.stages), force=force)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def champion() -> tuple[str, float]:
        v = client.get_model_version_by_alias("tiny-text", "champion")
        return str(v.version), float(v.tags["sparkloom.test_f1"])

    bad = run(BAD).results["register"]
    assert bad.promoted and bad.version == "1" and champion()[0] == "1"
    bad_f1 = champion()[1]
    assert bad_f1 == bad.candidates[0]["value"]

    good = run(GOOD).results["register"]  # baseline redone: its config changed
    assert good.promoted and good.version == "2" and champion()[0] == "2"
    assert good.candidates[0]["value"] > bad_f1
    assert good.champion_before == {"version": "1", "value": bad_f1,
                                    "data": good.candidates[0]["data"]}  # fmt: skip

    again = run(GOOD).results["register"]  # baseline up to date, v2 still champion: skipped
    assert again.skipped and again.version == "2" and champion()[0] == "2"
    client.set_registered_model_alias("tiny-text", "champion", "1")  # moved by hand: decided again
    again = run(GOOD).results["register"]
    assert not again.skipped and again.promoted and champion()[0] == "2"
    assert outcome_stage_skipped(client, "baseline")

    last = run(BAD)
    worse = last.results["register"]  # a new, worse model: registered, not promoted
    assert worse.version == "3" and not worse.promoted and "does not beat" in worse.reason
    assert champion()[0] == "2"
    assert len(client.search_model_versions("name = 'tiny-text'")) == 3

    # the compare stage ranked every baseline run that trained a model (the skipped one not)
    report = last.results["compare"].report
    assert sorted(r.run_id for r in report.rows) == sorted(c for c in trained(client))
    assert report.rows[0].metrics["f1"] == good.candidates[0]["value"]
    assert "best baseline (test accuracy" in last.results["compare"].summary()

    # the decision is in the register run
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`sparkloom.stage` = 'register'",
        order_by=["attributes.start_time DESC"],
    )
    assert len(runs) == 5  # one skipped, one after the alias was moved by hand
    assert runs[0].data.metrics["promoted"] == 0.0
    assert "does not beat" in runs[0].data.tags["sparkloom.register_decision"]


def outcome_stage_skipped(client: MlflowClient, stage: str) -> bool:
    last = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`sparkloom.stage` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    return last.data.tags["sparkloom.skipped"] == "true"


def trained(client: MlflowClient) -> list[str]:
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`sparkloom.stage` = 'baseline' and tags.`sparkloom.skipped` = 'false'",
    )
    return [r.info.run_id for r in runs]


def test_register_takes_the_classifiers_that_have_run_unless_candidates_are_named(
    spark, tmp_path, text_dirs, caplog
):
    """`--only register` after some of the pipeline's classifiers: those that ran are the
    candidates (the rest are named in a warning); named candidates must all have run."""
    import pytest

    from sparkloom.pipelines.runner import StageFailed

    def cfg(**register):
        return make_config(
            tmp_path,
            pipeline={"stages": ["ingest", "features", "baseline", "lstm", "register"]},
            ingest={"format": "text_dirs", "path": str(text_dirs)},
            baseline=GOOD, register={"name": "partly", **register},
        )  # fmt: skip

    out = run_pipeline(spark, cfg(), ["ingest", "features", "baseline", "register"])
    registered = out.results["register"]
    assert [c["stage"] for c in registered.candidates] == ["baseline"]
    assert registered.version == "1" and registered.promoted
    assert "register: no 'lstm' model yet, so it is not a candidate" in caplog.text

    with pytest.raises(StageFailed) as e:
        run_pipeline(spark, cfg(candidates=["baseline", "lstm"]), ["register"])
    assert "register: no 'lstm' model yet; run that stage first" in str(e.value)
