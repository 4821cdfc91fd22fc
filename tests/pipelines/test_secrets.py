"""Secrets never leave in clear (MLflow params, config/resolved.yaml, logs, config errors), and
a YAML alias bomb is refused at load time (issue 16, items 11 and 16)."""

import io
import logging
import time

import pytest
import yaml

from sparkloom.pipelines import tracking
from sparkloom.pipelines.config import ConfigError, load_config
from tests.conftest import make_config

SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    "key, masked",
    [
        # issue 16: stored in clear before
        ("spark.ssl.keyStorePassword", True),
        ("spark.hadoop.javax.jdo.option.ConnectionPassword", True),
        ("spark.hadoop.fs.azure.account.key.myacct.dfs.core.windows.net", True),
        ("spark.hadoop.fs.s3a.encryption.key", True),
        ("spark.hadoop.fs.s3.awsSecretAccessKey", True),
        ("spark.ssl.trustStorePassword", True),
        ("spark.ssl.keyPassword", True),
        ("spark.hadoop.fs.s3a.access.key", True),
        ("spark.hadoop.fs.s3a.secret.key", True),
        ("spark.hadoop.fs.s3a.session.token", True),
        ("spark.hadoop.fs.s3a.server-side-encryption.key", True),
        ("spark.hadoop.fs.s3n.awsAccessKeyId", True),
        ("spark.hadoop.fs.azure.account.oauth2.client.secret", True),
        ("spark.hadoop.fs.azure.sas.fixed.token", True),
        ("spark.hadoop.fs.azure.sas.mycontainer.myacct.blob.core.windows.net", True),
        ("spark.hadoop.fs.gs.auth.service.account.private.key", True),
        ("spark.authenticate.secret", True),
        ("hive.metastore.dbpwd", True),
        ("db.pwd", True),
        ("auth_token", True),
        ("oauth2.token", True),
        ("HF_TOKEN", True),
        ("databricksAccessToken", True),
        ("api_key", True),
        ("apiKey", True),
        ("ssl.passphrase", True),
        ("aws.credentials", True),
        # look like secrets, are not
        ("features.tokenizer.min_token_length", False),
        ("features.tokenizer.pattern", False),
        ("bert_pretrain.tokenizer.vocab_size", False),
        ("gpt2.generate.max_new_tokens", False),
        ("max_tokens", False),
        ("token_length", False),
        ("gpt2.tokenizer.pad_token", False),
        ("spark.ssl.keyStore", False),  # the keystore's path
        ("spark.ssl.keyStoreType", False),
        ("spark.hadoop.fs.azure.sas.token.provider.type", False),
        ("spark.sql.shuffle.partitions", False),
        ("ingest.columns.id_key", False),
    ],
)
def test_which_keys_are_masked(key, masked):
    assert tracking.mask(key, SECRET) == ("***" if masked else SECRET)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("s3a://etl:hunter2@bucket/x.csv", "s3a://etl:***@bucket/x.csv"),
        (
            "jdbc:postgresql://db/metastore?user=hive&password=hunter2&ssl=true",
            "jdbc:postgresql://db/metastore?user=hive&password=***&ssl=true",
        ),
        (
            "set spark.ssl.keyStorePassword=hunter2 and go",
            "set spark.ssl.keyStorePassword=*** and go",
        ),
        (
            "{'spark.ssl.keyStorePassword': 'hunter 2', 'a': 'b'}",
            "{'spark.ssl.keyStorePassword': '***', 'a': 'b'}",
        ),  # fmt: skip
        ("min_token_length=3 sas.token=sv2024sig", "min_token_length=3 sas.token=***"),
        # an error's hint `pass KEY=...` and `key: what is wrong` stay readable
        ("pass spark.conf.x.password=...", "pass spark.conf.x.password=..."),
        (
            "spark.conf.x.password: input should be a valid string",
            "spark.conf.x.password: input should be a valid string",
        ),  # fmt: skip
    ],
)
def test_secrets_inside_free_text_are_masked(text, shown):
    assert tracking.mask("message", text) == shown


SPARK_SECRETS = {
    "spark.ssl.keyStorePassword": SECRET + "-ks",
    "spark.hadoop.javax.jdo.option.ConnectionPassword": SECRET + "-jdo",
    "spark.hadoop.fs.azure.account.key.myacct.dfs.core.windows.net": SECRET + "-azure",
    "spark.hadoop.fs.s3a.encryption.key": SECRET + "-enc",
    "spark.hadoop.fs.s3.awsSecretAccessKey": SECRET + "-aws",
    "spark.hadoop.fs.s3a.session.token": SECRET + "-session",
    "spark.ssl.trustStorePassword": 918273645,  # a number is a secret too
}


def test_spark_conf_secrets_never_reach_params_or_resolved_yaml(tmp_path):
    conf = {**SPARK_SECRETS, "spark.sql.shuffle.partitions": 3, "spark.ssl.keyStore": "/ks.jks"}
    cfg = make_config(tmp_path, spark={"conf": conf},
                      features={"tokenizer": {"min_token_length": 2}})  # fmt: skip
    params = tracking.masked_params(cfg)
    resolved = tracking.masked_yaml(cfg)
    for secret in SPARK_SECRETS.values():
        assert str(secret) not in str(params) and str(secret) not in resolved
    for key in SPARK_SECRETS:
        assert params[f"spark.conf.{key}"] == "***"
    assert yaml.safe_load(resolved)["spark"]["conf"] == {
        **{key: "***" for key in SPARK_SECRETS},
        "spark.sql.shuffle.partitions": 3,
        "spark.ssl.keyStore": "/ks.jks",
    }
    assert params["spark.conf.spark.sql.shuffle.partitions"] == "3"
    assert params["features.tokenizer.min_token_length"] == "2"  # was "***"
    assert yaml.safe_load(resolved)["features"]["tokenizer"]["min_token_length"] == 2


def test_log_lines_and_their_tracebacks_mask_secret_settings():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(tracking.MaskSecrets())
    logger = logging.getLogger("test_secrets.masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("starting with %s", "spark.ssl.keyStorePassword=" + SECRET)
        try:
            raise RuntimeError(f"cannot connect: {{'fs.s3a.session.token': '{SECRET}'}}")
        except RuntimeError:
            logger.exception("ingest failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert SECRET not in text
    assert "starting with spark.ssl.keyStorePassword=***\n" in text
    assert "RuntimeError: cannot connect: {'fs.s3a.session.token': '***'}" in text


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "pipeline: {name: p}\ningest: {format: csv, path: x.csv}\n"


def test_a_config_error_never_echoes_the_secret_it_rejects(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, spark={"conf": {"spark.ssl.keyStorePassword": [SECRET]}})
    assert str(e.value) == (
        "bad config: spark.conf.spark.ssl.keyStorePassword: input should be a valid string, "
        "a valid integer, a valid number or a valid boolean (got a value, hidden because the key "
        "names a secret); fix it in the YAML or pass spark.conf.spark.ssl.keyStorePassword=..."
    )
    conf = write(tmp_path, "p.yaml", BASE)
    with pytest.raises(ConfigError) as e:
        load_config(conf, [f"spark.conf.spark.hadoop.fs.s3a.session.token=[{SECRET}]"])
    assert SECRET not in str(e.value) and "(got a value, hidden" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(conf, [f"={SECRET}"])
    assert str(e.value) == "an override has no key before '='; write e.g. ingest.split.seed=7"


def test_a_rejected_value_is_shown_in_80_characters_at_most(tmp_path):
    conf = write(tmp_path, "p.yaml", BASE + f"baseline: {{num_folds: [{'x' * 100_000}]}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    shown = str(e.value).split("(got ")[1].split("); fix it")[0]
    assert len(shown) == 80 and shown.startswith("['xxxx") and shown.endswith("...")
    assert len(str(e.value)) < 250


def billion_laughs(indent: str = "") -> str:
    """Nine levels of ten aliases: 10^9 strings once expanded, 90 aliases written."""
    lines = [f"{indent}l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    for i in range(1, 9):
        lines.append(f"{indent}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    # inside spark.conf: the values the error formatter used to repr one by one
    conf = write(tmp_path, "bomb.yaml", BASE + "spark:\n  conf:\n" + billion_laughs("    "))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    assert time.perf_counter() - start < 0.5
    assert str(e.value) == (
        f"config file {conf.resolve()} uses YAML aliases that expand to more than 1,000,000 "
        "values; write the repeated parts out, or reuse whole sections with `<<: *anchor`"
    )


def test_an_alias_bomb_in_an_override_is_refused(tmp_path):
    conf = write(tmp_path, "p.yaml", BASE)
    levels = ["&l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(conf, [f"spark.conf.x=[{', '.join(levels)}]"])
    assert time.perf_counter() - start < 0.5
    assert str(e.value).startswith(
        "override spark.conf.x=... uses YAML aliases that expand to more than 1,000,000 values"
    )


def test_a_value_that_contains_itself_is_refused(tmp_path):
    conf = write(tmp_path, "loop.yaml", BASE + "baseline: &b {grid: *b}\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    assert str(e.value) == (
        f"config file {conf.resolve()} has a YAML alias inside its own anchor (a value that "
        "contains itself); remove that alias"
    )


def test_ordinary_anchors_and_merges_still_load(tmp_path):
    write(tmp_path, "base.yaml", "spark:\n  conf: {spark.sql.shuffle.partitions: 2}\n")
    conf = write(tmp_path, "p.yaml", "extends: base.yaml\n" + BASE + (
        "lstm:\n  distributor: &dist {num_processes: 2, local_mode: true, timeout_s: 600}\n"
        "textcnn:\n  distributor: {<<: *dist, num_processes: 1}\n"
        "bert:\n  training: &train {epochs: 3, batch_size: 8}\n"
        "gpt2:\n  training: *train\n"
    ))  # fmt: skip
    cfg = load_config(conf, ["textcnn.distributor.timeout_s=60"])
    lstm, textcnn = cfg.lstm.distributor, cfg.textcnn.distributor
    assert (lstm.num_processes, lstm.local_mode, lstm.timeout_s) == (2, True, 600)
    assert (textcnn.num_processes, textcnn.local_mode, textcnn.timeout_s) == (1, True, 60)
    assert (cfg.gpt2.training.epochs, cfg.gpt2.training.batch_size) == (3, 8)
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": 2}


def test_masking_a_long_line_is_linear():
    line = "payload=" + "A" * 100_000 + " s3a://" + "b" * 100_000
    start = time.perf_counter()
    assert tracking.mask("message", line) == line
    assert time.perf_counter() - start < 0.5  # was quadratic: a minute


def test_a_config_nested_past_the_recursion_limit_is_a_config_error(tmp_path):
    conf = write(
        tmp_path, "deep.yaml", BASE + "spark: {conf: {x: " + "[" * 1500 + "]" * 1500 + "}}\n"
    )
    with pytest.raises(ConfigError) as e:  # was a RecursionError traceback
        load_config(conf)
    assert (
        str(e.value) == f"config file {conf.resolve()} nests too deeply to be a config; flatten it"
    )


def test_extends_must_name_files(tmp_path):
    conf = write(tmp_path, "p.yaml", "extends: [1]\n" + BASE)
    with pytest.raises(ConfigError) as e:  # was a TypeError traceback
        load_config(conf)
    assert (
        str(e.value) == f"'extends' in {conf.resolve()} must be a file name or a list of file names"
    )
