"""The stage registry is the one list: config, runner and CLI agree with it."""

from __future__ import annotations

import typing
from pathlib import Path

from sparkloom.jobs.cli import parse_args
from sparkloom.pipelines import runner
from sparkloom.pipelines.config import Config, Stage, load_config, stage_output
from sparkloom.pipelines.stages import REGISTRY, SPECS, names

ROOT = Path(__file__).resolve().parents[2]


def test_every_declared_stage_runs_validates_and_names_real_sections():
    assert list(runner._STAGES) == list(SPECS)  # a runner for each, in pipeline order
    assert typing.get_args(Stage) == tuple(SPECS)  # pipeline.stages takes exactly these
    sections = set(Config.model_fields)
    for spec in REGISTRY:  # a section, or one key of a section ("evaluation.calibrate")
        for dep in spec.depends:
            section, _, key = dep.partition(".")
            assert section in sections, spec.name
            assert not key or key in Config.model_fields[section].annotation.model_fields, dep
        if spec.name != "compare":  # compare reads MLflow, not a section
            assert spec.name in sections, spec.name


def test_derived_lists_follow_the_declarations():
    assert names(kind="classifier") == (
        "baseline", "embed_baseline", "lstm", "textcnn", "cnn", "alexnet", "bert", "distill",
        "quantize",
    )  # fmt: skip
    assert names(torch=True, modality="image") == ("cnn", "alexnet")
    assert names(token_ids=True) == ("lstm", "textcnn", "distill")
    cfg = load_config(ROOT / "conf" / "text_classification.yaml", ["quantize.source=textcnn"])
    assert [stage_output(cfg, s) for s in ("ingest", "lstm", "quantize", "compare")] == [
        "ingested", "lstm_model", "textcnn_int8", None,
    ]  # fmt: skip


def test_every_stage_and_command_is_a_subcommand_that_help_lists(capsys):
    """`sparkloom --help` lists every command; every stage runs alone as `stage NAME`, the
    ones with a command of their own also as `NAME`; `score` and `compare` are the model
    commands, which want a model or an experiment, not just a pipeline file."""
    import pytest

    from sparkloom.jobs.cli import MODEL_COMMANDS

    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    listed = capsys.readouterr().out
    assert done.value.code == 0
    for command in ("run", "preflight", "stage", *names(cli=True), *MODEL_COMMANDS):
        assert f"\n    {command} " in listed or f"\n    {command}\n" in listed, command
    for spec in REGISTRY:
        args = parse_args(["stage", spec.name, "--conf", "x.yaml", "a.b=1"])
        assert (args.command, args.name, args.conf, args.overrides) == (
            "stage", spec.name, ["x.yaml"], ["a.b=1"],
        )  # fmt: skip
        if spec.cli:
            assert parse_args([spec.name, "--conf", "x.yaml"]).command == spec.name
    with pytest.raises(SystemExit):  # `score` is batch scoring: it wants a model
        parse_args(["score", "--conf", "x.yaml"])
    scoring = parse_args(["score", "--model", "m", "--input", "i", "--output", "o"])
    compare = parse_args(["compare", "--conf", "x.yaml"])  # the config's experiment
    assert not hasattr(scoring, "overrides") and not hasattr(compare, "overrides")
    assert [s.name for s in REGISTRY if not s.cli] == ["score", "compare"]


def test_a_stage_fingerprint_follows_its_declared_inputs_and_a_missing_one_names_its_maker(
    spark, tmp_path
):
    """sparkloom.pipelines.context builds every stage's fingerprint from the inputs stages.py declares:
    the distilled student changes with its teacher's model, a BERT fine-tune with the
    pretrained model only when it starts from it, and an absent input names the stage that
    writes it."""
    import pytest

    from sparkloom.pipelines.catalog import Catalog
    from sparkloom.pipelines.context import context
    from sparkloom.pipelines.errors import DataError
    from tests.conftest import make_config

    cfg = make_config(tmp_path, distill={"teacher": "lstm"})
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)

    def made(name: str, fp: str) -> None:
        catalog.write(name, lambda tmp: Path(tmp).mkdir(parents=True), {"fingerprint": fp})

    with pytest.raises(DataError, match="dataset 'features' not found .* run the 'features'"):
        context(spark, cfg, catalog, "distill")
    made("features", "f1")
    with pytest.raises(DataError, match="dataset 'lstm_model' not found .* run the 'lstm'"):
        context(spark, cfg, catalog, "distill")
    made("lstm_model", "t1")
    first = context(spark, cfg, catalog, "distill")
    assert (
        list(first.inputs) == ["features", "lstm_model"] and first.upstream["fingerprint"] == "f1"
    )
    assert context(spark, cfg, catalog, "distill").fingerprint == first.fingerprint
    made("lstm_model", "t2")  # a retrained teacher: the student is not current any more
    assert context(spark, cfg, catalog, "distill").fingerprint != first.fingerprint
    lstm = context(spark, cfg, catalog, "lstm")  # the teacher itself reads the features only
    assert list(lstm.inputs) == ["features"] and lstm.fingerprint != first.fingerprint
    made("ingested", "i1")

    def bert(init_from: str):
        return cfg.model_copy(update={"bert": cfg.bert.model_copy(update={"init_from": init_from})})

    assert list(context(spark, bert(str(tmp_path / "hf")), catalog, "bert").inputs) == ["ingested"]
    with pytest.raises(DataError, match="run the 'bert_pretrain'"):
        context(spark, bert("bert_pretrain"), catalog, "bert")
    made("bert_pretrain_model", "p1")
    assert list(context(spark, bert("bert_pretrain"), catalog, "bert").inputs) == [
        "ingested", "bert_pretrain_model",
    ]  # fmt: skip
