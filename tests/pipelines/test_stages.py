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


def test_stages_without_a_command_are_refused_by_the_stage_parser():
    """score and compare take a model URI or an experiment, not a pipeline file: main()
    routes them to jobs/score.py and jobs/compare.py, and the stage parser refuses them."""
    import pytest

    for spec in REGISTRY:
        if not spec.cli:
            with pytest.raises(SystemExit):
                parse_args([spec.name, "--conf", "x.yaml"])
    assert [s.name for s in REGISTRY if not s.cli] == ["score", "compare"]
