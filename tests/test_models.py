"""suite/models.py: the embedded model's cached copy is made once, even by concurrent first uses."""
from __future__ import annotations

import threading
import time

from suite import models


def test_concurrent_first_uses_convert_the_embedded_model_once(tmp_path, monkeypatch):
    # as two grid cells of `suite run --jobs 2` on an empty cache (flock also excludes threads that
    # open the lock file separately, so threads stand in for the processes here)
    calls = []

    def slow_conversion(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # both users are inside embedded_model_dir meanwhile
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")  # a second conversion would fail here: the dir exists
        return out_dir

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantise_gguf", slow_conversion)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    got, errors = [], []

    def use():
        try:
            got.append(models.embedded_model_dir())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    users = [threading.Thread(target=use) for _ in range(3)]
    for t in users:
        t.start()
    for t in users:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert got == [tmp_path / "smollm2-135m-instruct-f32"] * 3
