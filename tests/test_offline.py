"""Offline: without the dataset mirror, with a missing mirror or model path, with a hub id while the hub
is off or unreachable, a command fails with one `error:` line, exit 2, and sends nothing over the
network (tests/no_network.py logs every attempt)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_output import one_error_line

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def guarded(args, env_set: dict, env_unset=(), cwd=None):
    """Run the CLI under tests/no_network.py; (process, network attempts logged)."""
    log = Path(cwd or ROOT) / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in env_unset}
    env.update(env_set, NO_NETWORK_LOG=str(log), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS / "no_network.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    attempts = log.read_text().splitlines() if log.exists() else []
    return proc, attempts


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


NO_HUB_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


@pytest.mark.parametrize("case", ["no mirror, offline", "no mirror, no network", "mirror path missing",
                                  "missing path under an existing dir", "hub id, offline", "hub id, no network",
                                  "eval, no mirror, offline"])
def test_offline_errors_are_one_line_and_send_nothing(tmp_path, case):
    (tmp_path / "out").mkdir()
    (tmp_path / "hf").mkdir()
    env = {"HF_HOME": str(tmp_path / "hf")}  # an empty hub cache: nothing is cached
    unset = ["MINILLM_DATA"] if "no mirror" in case else []
    if "no network" in case:
        unset += NO_HUB_VARS
    else:
        env |= OFFLINE
    model, method = "tiny-opt", "flap"
    if case == "mirror path missing":
        env["MINILLM_DATA"] = str(tmp_path / "no-such-mirror")
    elif case == "missing path under an existing dir":
        model, method = "out/wanda", "random"
        unset += NO_HUB_VARS  # even with the hub allowed, a path is no hub id
    elif case.startswith("hub id"):
        model, method = "someone/some-model", "random"
    if case.startswith("eval"):
        args = ["eval", "--model", model, "--ppl", "wikitext2"]
    else:
        args = ["prune", "--model", model, "--method", method, "--ratio", "0.2", "--out", str(tmp_path / "o")]
    proc, attempts = guarded(args, env, unset, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    expected = {"no mirror, offline": "MINILLM_DATA is not set and HF_HUB_OFFLINE=1",
                "no mirror, no network": "MINILLM_DATA is not set and the hub",
                "mirror path missing": str(tmp_path / "no-such-mirror"),
                "missing path under an existing dir": "out/wanda: no such directory",
                "hub id, offline": "HF_HUB_OFFLINE=1",
                "hub id, no network": "unreachable",
                "eval, no mirror, offline": "MINILLM_DATA is not set"}[case]
    assert expected in line
    if "no network" in case:
        assert len(attempts) <= 2, attempts  # one probe (name lookup + connect), no retries
    else:
        assert attempts == []
    assert not (tmp_path / "o").exists()
