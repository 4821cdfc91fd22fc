"""Trap 5: a kill (SIGKILL) during a checkpoint save must never leave an unloadable latest
checkpoint. Reproduced first with a plain torch.save to the final path; then the training
runtime's Checkpoints (temp file, fsync, atomic rename, `latest` pointer replaced the same
way, old ones pruned only after) is killed mid-save, again and again."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sparkloom.models.train import CheckpointConfig, Checkpoints, Dist

BIG = 4_000_000  # floats: a 16 MB state, so a save takes long enough to be hit mid-write

SAVER = textwrap.dedent(
    """
    import sys, torch
    from sparkloom.models.train import CheckpointConfig, Checkpoints, Dist
    mode, where = sys.argv[1], sys.argv[2]
    state = {"w": torch.randn(int(sys.argv[3]))}
    ckpt = Checkpoints(CheckpointConfig(dir=where, keep=2), Dist(0, 1, 0, torch.device("cpu")))
    step = 0
    while True:
        step += 1
        state["global_step"] = step
        state["w"][0] = step
        if mode == "plain":
            torch.save(state, where + "/plain.pt")
        else:
            ckpt.save(state, best=False)
        print(step, flush=True)
    """
)


def kill_mid_save(mode: str, where: str, after: float) -> int:
    """Start a saver, SIGKILL it `after` seconds after its first complete save (it saves
    without a pause, so the kill lands in a save); the last step it reported complete."""
    proc = subprocess.Popen([sys.executable, "-c", SAVER, mode, where, str(BIG)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    first = proc.stdout.readline()
    assert first.strip(), "the saver died before its first save"
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    steps = [int(x) for x in (first + out).split()]
    return steps[-1]


def test_a_plain_save_killed_mid_write_is_unloadable(tmp_path):
    broken = 0
    for i in range(6):  # the kill lands mid-write most of the time
        kill_mid_save("plain", str(tmp_path), 0.2 + 0.13 * i)
        try:
            torch.load(tmp_path / "plain.pt", weights_only=True)
        except Exception:
            broken += 1
    print(f"\nplain torch.save killed mid-write: {broken} of 6 files unloadable")
    assert broken > 0


@pytest.mark.parametrize("round_", range(6))
def test_checkpoints_survive_a_kill_during_save(tmp_path, round_):
    where = tmp_path / "ckpt"
    done = kill_mid_save("checkpoints", str(where), 0.2 + 0.13 * round_)
    assert done > 0
    ckpt = Checkpoints(CheckpointConfig(dir=str(where)), Dist(0, 1, 0, torch.device("cpu")))
    latest = ckpt.latest()
    state = Checkpoints.load(latest)  # loadable, and not older than the last completed save
    assert state["global_step"] >= done and state["w"][0] == state["global_step"]
    assert state["w"].numel() == BIG
