"""Traps 1-3: faults injected into real TorchDistributor runs (gloo, 2 processes), in barrier
mode (local_mode=False, one Spark task per rank) and local mode (torchrun on the driver).

- A rank that raises or calls os._exit, before rank 0 has finished or after it is waiting to
  return, fails the job with one error that names that rank (never a reported success).
- A hung rank fails the job after distributor.timeout_s, named as hung.
- The launcher returns rank 0's result, and retries a failed run from its last checkpoint.
Each case prints the time from the fault to the error (the `-s` output gives the figures).
"""

from __future__ import annotations

import os
import time

import pytest

from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.deep import TrainingError, run_deep
from sparkloom.pipelines.runner import run_pipeline
from tests.conftest import make_config, make_docs

LSTM = {
    "model": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
    "training": {"epochs": 2, "batch_size": 8, "optimizer": {"lr": 0.02},
                 "checkpoint_every_steps": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    """A tiny corpus ingested and featurized once; each test trains the LSTM on it."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus"
    for d in make_docs():
        (corpus / d["label"]).mkdir(parents=True, exist_ok=True)
        (corpus / d["label"] / f"{d['id']}.txt").write_text(d["text"])
    cfg = make_config(
        root,
        pipeline={"stages": ["ingest", "features"]},
        ingest={"format": "text_dirs", "path": str(corpus)},
        features={"sequence": {"min_df": 1}},
    )
    run_pipeline(spark, cfg, ["ingest", "features"])
    return root, corpus


def lstm_config(prepared, local_mode: bool, **distributor):
    root, corpus = prepared
    return make_config(
        root,
        pipeline={"stages": ["ingest", "features", "lstm"]},
        ingest={"format": "text_dirs", "path": str(corpus)},
        features={"sequence": {"min_df": 1}},
        lstm={**LSTM, "distributor": {"local_mode": local_mode, "max_retries": 0,
                                      **distributor}},
    )  # fmt: skip


def train_with_fault(spark, cfg, fault: str, monkeypatch) -> tuple[TrainingError, float]:
    """(the error, seconds from the fault firing to the error reaching the driver)."""
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    monkeypatch.setenv("SPARKLOOM_FAULT", fault)
    with pytest.raises(TrainingError) as err:
        run_deep(spark, cfg, catalog, "lstm", force=True)
    failed_at = time.time()
    status = str(err.value).rsplit("status files in ", 1)[1].rstrip(")")
    fired = [os.path.join(status, f) for f in os.listdir(status) if f.startswith("fault-")]
    assert fired, f"the fault never fired: {err.value}"
    with open(fired[0]) as f:
        seconds = failed_at - float(f.read())
    print(f"\n[{fault}] local_mode={cfg.lstm.distributor.local_mode}: error after {seconds:.1f}s: "
          f"{err.value}")  # fmt: skip
    return err.value, seconds


MODES = [pytest.param(False, id="barrier"), pytest.param(True, id="local_mode")]


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", MODES)
@pytest.mark.parametrize("mode", ["raise", "exit"])
@pytest.mark.parametrize("at", ["step=3", "at=end"], ids=["mid-training", "after-rank-0-done"])
def test_a_failing_rank_fails_the_job_and_is_named(
    spark, prepared, monkeypatch, local_mode, mode, at
):
    cfg = lstm_config(prepared, local_mode)
    error, seconds = train_with_fault(spark, cfg, f"rank=1,{at},mode={mode}", monkeypatch)
    message = str(error)
    if mode == "raise":
        assert "rank 1 raised RuntimeError: injected fault on rank 1" in message
        assert "fault_hook" in error.tail  # the rank's own traceback comes with the error
    else:
        assert "rank 1 died without a Python error" in message
    assert "rank 0 raised" not in message  # rank 0 only lost its peer
    assert seconds < 60  # seconds, not the 10-minute process-group timeout (measured: ~1-5 s)


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", MODES)
def test_a_hung_rank_fails_the_job_after_the_configured_timeout(
    spark, prepared, monkeypatch, local_mode
):
    cfg = lstm_config(prepared, local_mode, timeout_s=10)
    error, seconds = train_with_fault(spark, cfg, "rank=1,step=2,mode=hang", monkeypatch)
    assert "rank 1 hung: ranks [0] timed out waiting for it" in str(error)
    assert 10 <= seconds < 120  # timeout_s, not the default 30 minutes


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", MODES)
def test_the_launcher_returns_rank_0s_result_and_retries_from_the_checkpoint(
    spark, prepared, monkeypatch, local_mode
):
    cfg = lstm_config(prepared, local_mode, max_retries=1)
    catalog = Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name)
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=1,step=3,mode=exit")  # on the first try only
    result = run_deep(spark, cfg, catalog, "lstm", force=True)
    assert result.attempts == 2
    assert result.resumed_from is not None and result.resumed_from["step"] == 2
    assert result.world_size == 2 and len(result.history) == 2
    assert sum(map(sum, result.confusion["test"])) > 0  # rank 0 evaluates: its result came back


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", MODES)
def test_every_rank_evaluates_the_best_weights_rank_0_saved(spark, prepared, local_mode,
                                                             monkeypatch):  # fmt: skip
    """Rank 0 is 3 s slow writing best.pt: the other rank must not evaluate its test and
    validation shard with the previous best (it used to read the file itself, racing)."""
    cfg = lstm_config(prepared, local_mode)
    monkeypatch.setenv("SPARKLOOM_FAULT", "rank=0,at=save,mode=slow")
    result = run_deep(spark, cfg, Catalog(spark, cfg.pipeline.data_root, cfg.pipeline.name),
                      "lstm", force=True)  # fmt: skip
    last = result.history[-1]
    assert result.best_epoch == len(result.history) == 2  # the final weights are the best
    # the same weights on the same validation rows as the epoch's own evaluation
    assert result.metrics["val_loss"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert result.metrics["val_accuracy"] == last["val_accuracy"]
