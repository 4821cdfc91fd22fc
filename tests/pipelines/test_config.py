import json
from pathlib import Path

import pytest

from sparkloom.pipelines.config import Config, flatten, load_config
from sparkloom.pipelines.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_pipeline_config_loads_and_extends_defaults():
    cfg = load_config(ROOT / "conf" / "text_classification.yaml")
    assert cfg.pipeline.name == "text_classification"
    assert cfg.ingest.format == "text_dirs"
    assert cfg.spark.conf["spark.ui.enabled"] is False  # from defaults.yaml
    assert cfg.mlflow.tracking_uri == "sqlite:///mlflow.db"
    assert cfg.features.tokenizer.pattern == r"\W+"


def test_overrides_are_typed_and_nested(tmp_path):
    base = write(tmp_path, "p.yaml", "pipeline: {name: p}\ningest: {format: csv, path: x.csv}\n")
    cfg = load_config(
        base,
        [
            "ingest.split.train=0.7",
            "ingest.split.validation=0.2",
            "baseline.grid.reg_param=[0.1, 1.0]",
            "features.stopwords.enabled=false",
            "spark.conf.spark.sql.shuffle.partitions=3",
        ],
    )
    assert cfg.ingest.split.train == 0.7
    assert cfg.baseline.grid.reg_param == [0.1, 1.0]
    assert cfg.features.stopwords.enabled is False
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": 3}


def test_later_files_win(tmp_path):
    a = write(tmp_path, "a.yaml", "pipeline: {name: a}\nbaseline: {num_folds: 4}\n")
    b = write(tmp_path, "b.yaml", "pipeline: {name: b}\n")
    cfg = load_config([a, b])
    assert (cfg.pipeline.name, cfg.baseline.num_folds) == ("b", 4)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("ingest.splt.train=0.5", "unknown key 'ingest.splt'; did you mean 'ingest.split'?"),
        ("pipline.name=x", "unknown key 'pipline'; did you mean 'pipeline'?"),
        ("ingest.split.train=abc", "ingest.split.train: input should be a valid number"),
        ("ingest.split.train=0.5", "add up to 0.7, not 1"),
        (
            "ingest.format=xls",
            "ingest.format: input should be 'csv', 'tsv', 'json', 'parquet', 'text_dirs', 'image_dirs', 'idx', 'image_parquet', 'table' or 'sql'",
        ),
        (
            "baseline.grid.elastic_net_param=[2]",
            "baseline.grid.elastic_net_param values must be in [0, 1]",
        ),
        ("baseline.num_folds=1", "baseline.num_folds: input should be greater than or equal to 2"),
        (
            "features.tokenizer.pattern=([",
            "features.tokenizer.pattern: not a valid regular expression",
        ),
        ("features.stopwords.language=klingon", "unknown language 'klingon'"),
        ("baseline.features_col=word2vec", "needs features.word2vec.enabled=true"),
        ("novalue", "is not key=value"),
        (
            "pipeline.stages=[ingest,cnn]",
            "stages ['cnn'] do not fit ingest.format=csv (text data); use ['lstm', 'textcnn', 'bert_pretrain', 'bert', 'distill', 'gpt2']",
        ),
        ("ingest.image.channels=2", "ingest.image.channels: input should be 1 or 3"),
        ("alexnet.model.stem=huge", "alexnet.model.stem: input should be 'auto', 'imagenet' or"),
        (
            "bert_pretrain.static_copies=4",
            "applies to static masking only; set bert_pretrain.masking=static",
        ),
        (
            "bert_pretrain.masking=both",
            "bert_pretrain.masking: input should be 'dynamic' or 'static'",
        ),
        # the model sections are the models' own dataclasses: their checks name the YAML key
        ("lstm.model.embed_dim=0", "lstm.model.embed_dim must be >= 1, got 0"),
        ("lstm.model.embedd_dim=3", "unknown key 'lstm.model.embedd_dim'; did you mean 'lstm."),
        ("textcnn.model=3", "textcnn.model: must be a mapping (got 3)"),
        (
            "bert_pretrain.model.num_attention_heads=3",
            "bert_pretrain.model: hidden_size 256 must be divisible by num_attention_heads 3",
        ),
    ],
)
def test_bad_config_names_the_key_and_the_fix(tmp_path, override, expected):
    base = write(tmp_path, "p.yaml", "pipeline: {name: p}\ningest: {format: csv, path: x.csv}\n")
    with pytest.raises(ConfigError) as e:
        load_config(base, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; check the --conf path"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "bad.yaml", "pipeline: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_flatten_and_stage_hash():
    cfg = Config.model_validate(
        {"pipeline": {"name": "p"}, "ingest": {"format": "csv", "path": "x"}}
    )
    flat = flatten(cfg)
    assert flat["ingest.split.train"] == "0.8"
    assert flat["baseline.grid.reg_param"] == "[1e-06, 1e-05, 0.0001, 0.001, 0.01, 0.1]"
    other = Config.model_validate(
        {
            "pipeline": {"name": "p"},
            "ingest": {"format": "csv", "path": "x"},
            "baseline": {"num_folds": 5},
        }
    )
    # a baseline change leaves ingest and features outputs valid, and only invalidates baseline
    assert cfg.stage_hash("ingest") == other.stage_hash("ingest")
    assert cfg.stage_hash("features") == other.stage_hash("features")
    assert cfg.stage_hash("baseline") != other.stage_hash("baseline")


def test_a_partial_section_keeps_the_stages_own_defaults(tmp_path):
    # gpt2 and bert_pretrain stop early on val_loss by default (an LM has no accuracy, NSP's
    # saturates); setting one training key must not bring back TrainingConfig's val_accuracy
    base = write(tmp_path, "p.yaml", "pipeline: {name: p}\ngpt2: {training: {epochs: 2}}\n")
    cfg = load_config(base, ["bert_pretrain.training.early_stopping.patience=5"])
    g, b = cfg.gpt2.training, cfg.bert_pretrain.training
    assert (g.epochs, g.early_stopping.metric, g.eval_batch_size, g.log_every_steps) == (
        2, "val_loss", 16, 10,
    )  # fmt: skip
    assert (b.early_stopping.metric, b.early_stopping.patience) == ("val_loss", 5)
    assert cfg.lstm.training.early_stopping.metric == "val_accuracy"


def test_a_model_section_is_the_models_own_dataclass_and_needs_no_torch():
    import subprocess
    import sys

    from sparkloom.models.bert import BertConfig
    from sparkloom.models.cnn import AlexNetConfig, CNNConfig
    from sparkloom.models.gpt2 import GPT2Config
    from sparkloom.models.lstm import LSTMConfig
    from sparkloom.models.textcnn import TextCNNConfig

    cfg = Config.model_validate({"pipeline": {"name": "p"}, "lstm": {"model": {"hidden_dim": 7}}})
    built = {"lstm": LSTMConfig, "textcnn": TextCNNConfig, "cnn": CNNConfig,
             "alexnet": AlexNetConfig, "bert_pretrain": BertConfig, "gpt2": GPT2Config}  # fmt: skip
    for stage, model_config in built.items():
        assert issubclass(model_config, type(getattr(cfg, stage).model)), stage
    assert cfg.lstm.model.hidden_dim == 7
    # the training section is what the training processes get: no mapping in between
    from sparkloom.models.train.config import RunConfig
    from sparkloom.pipelines.deep import run_config

    sent = run_config(cfg, "gpt2", {"train": "t"}, {"vocab_size": 50}, {}, "ckpt", "status", 1)
    got = RunConfig.from_dict(json.loads(json.dumps(sent)))  # as it travels
    assert got.training == cfg.gpt2.training and not got.training.early_stopping.maximize
    # validating a config must not import torch (baseline-only pipelines never need it)
    code = "import sys, sparkloom.pipelines.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_config_reference_in_docs_is_current():
    from sparkloom.pipelines.config_reference import reference, rows

    keys = {key for key, *_ in rows()}
    assert {"gpt2.training.early_stopping.metric", "lstm.model.pooling", "cnn.augment.crop_padding",
            "ingest.csv.sep", "spark.conf"} <= keys  # fmt: skip
    assert dict((k, d) for k, _, d, _ in rows())["gpt2.training.eval_batch_size"] == "`16`"
    assert (ROOT / "docs" / "config-reference.md").read_text() == reference(), (
        "docs/config-reference.md is stale: python -m sparkloom.pipelines.config_reference "
        "> docs/config-reference.md"
    )
