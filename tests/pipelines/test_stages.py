"""The stage registry is the one list: config, runner and CLI agree with it."""

from __future__ import annotations

import typing
from pathlib import Path

from jobs.cli import parse_args
from pipelines import runner
from pipelines.config import Config, Stage, load_config, stage_output
from pipelines.stages import REGISTRY, SPECS, names

ROOT = Path(__file__).resolve().parents[2]


def test_every_declared_stage_runs_validates_and_names_real_sections():
    assert list(runner._STAGES) == list(SPECS)  # a runner for each, in pipeline order
    assert typing.get_args(Stage) == tuple(SPECS)  # pipeline.stages takes exactly these
    sections = set(Config.model_fields)
    for spec in REGISTRY:
        assert set(spec.depends) <= sections, spec.name
        if spec.name != "compare":  # compare reads MLflow, not a section
            assert spec.name in sections, spec.name


def test_derived_lists_follow_the_declarations():
    assert names(kind="classifier") == (
        "baseline", "lstm", "textcnn", "cnn", "alexnet", "bert", "distill", "quantize",
    )  # fmt: skip
    assert names(torch=True, modality="image") == ("cnn", "alexnet")
    assert names(token_ids=True) == ("lstm", "textcnn", "distill")
    cfg = load_config(ROOT / "conf" / "text_classification.yaml", ["quantize.source=textcnn"])
    assert [stage_output(cfg, s) for s in ("ingest", "lstm", "quantize", "register")] == [
        "ingested", "lstm_model", "textcnn_int8", None,
    ]  # fmt: skip


def test_the_cli_offers_each_stage_with_a_command_of_its_own():
    for spec in REGISTRY:
        if spec.cli:
            assert parse_args([spec.name, "--conf", "x.yaml"]).command == spec.name
    assert not SPECS["score"].cli  # `sparkloom score` takes a model URI: jobs/score.py
