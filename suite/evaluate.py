"""Evaluate step: perplexity (LLM-Pruner ``PPLMetric``), zero-shot accuracy (lm-eval 0.4.13).

Throughput (prefill and decode tokens/s) is timed by `suite/speed.py` (torch.utils.benchmark).

Zero-shot offline: with ``$MINILLM_DATA`` set, every task is redirected to the mirror generically
(`mirror_task_config`): the task's own resolved YAML with ``dataset_path: json`` and the mirror's
split files. Nothing is special-cased per task; a task whose files are not in the mirror is
reported as skipped, and works as soon as its files appear.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from suite.pruning.errors import UserError
from suite import data, models
from suite.config import PAPER_TASKS  # the papers' seven zero-shot tasks: one list, the grid default too
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def _device(model) -> torch.device:
    """Where the inputs go: the input embedding's device (its execution device when accelerate
    offloaded it, `suite.models.load_model(offload=...)`)."""
    from suite.pruning.layerwise import device_of

    return device_of(model.get_input_embeddings())


# --------------------------------------------------------------------------- window length
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


def check_window(model, seqlen: int, what: str = "--seqlen") -> str | None:
    """Check a window of `seqlen` tokens against the model's positions, before any work on it.

    Learned positions (OPT: a table of ``max_position_embeddings`` rows past its offset) cannot
    run a longer window: UserError naming the limit (today's code ended in an IndexError). Rotary
    or ALiBi positions extrapolate: a longer window than the config's trained length runs, with a
    one-line warning on stderr, returned for the result record. None when the window fits (or the
    config names no length).
    """
    from suite.pruning.architectures import adapter_for

    config = getattr(model, "config", model)
    limit = next((getattr(config, k) for k in POSITION_LIMIT_KEYS if getattr(config, k, None)), None)
    if limit is None or seqlen <= limit:
        return None
    kind = adapter_for(model).position_encoding
    if kind == "learned":
        raise UserError(f"{what} {seqlen} exceeds the model's {limit} learned positions "
                        f"(max_position_embeddings); use at most {limit}")
    warning = (f"{what} {seqlen} exceeds the model's trained length {limit}: {kind} positions "
               f"extrapolate, results may not be comparable")
    print(f"warning: {warning}", file=sys.stderr)
    return warning


# --------------------------------------------------------------------------- perplexity
def perplexity(model, tokenizer, corpus: str, seq_len: int = 128, max_tokens: int | None = None,
               batch_size: int = 4, quiet: bool = False) -> float:
    """exp(mean next-token NLL) over the non-overlapping `seq_len` windows of `corpus`.

    Reproduces LLM-Pruner's ``PPLMetric`` / ``llama_eval``: each window is scored independently,
    the loss covers positions 1..L-1 of every window, and the mean is over all predicted tokens.
    One forward per batch (no KV cache, no hidden states); the loss is computed from the logits in
    fp32 and summed in fp64.
    """
    windows = data.eval_windows(tokenizer, corpus, seqlen=seq_len, max_tokens=max_tokens)
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    disable = quiet or not sys.stderr.isatty()
    with torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc=f"ppl {corpus}", disable=disable):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            if logits.dtype != torch.float32:
                logits = logits.float()
            # targets shifted left; the last position of each window predicts nothing (ignored),
            # so the logits are used as a view, without slicing copies
            targets = torch.full_like(batch, -100)
            targets[:, :-1] = batch[:, 1:]
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                     ignore_index=-100, reduction="sum")
    count = windows.size(0) * (windows.size(1) - 1)
    return math.exp(total.item() / count)


# --------------------------------------------------------------------------- zero-shot
class TaskUnavailable(Exception):
    """The task's data cannot be had offline (reported as skipped, not raised to the user)."""


@lru_cache(maxsize=4)
def _full_task_manager(include_path: str | None = None):
    """lm-eval's TaskManager over every bundled task YAML (indexing ~14k names takes ~7 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_dirs_file() -> Path:
    import lm_eval

    version = getattr(lm_eval, "__version__", "unknown")
    return models.cache_root() / f"lm-eval-{version}-task-dirs.json"


def _bundled_task_dirs() -> dict:
    """{task name: directory of its YAML} for lm-eval's bundled tasks, cached per lm-eval version.

    Built once from the full index and written atomically under ``$MINILLM_CACHE``; each later
    process indexes only the directories of the tasks it evaluates (milliseconds, not seconds).
    """
    import lm_eval.tasks

    path = _task_dirs_file()
    bundled = str(Path(lm_eval.tasks.__file__).parent)
    try:
        cached = json.loads(path.read_text())
        if cached.get("root") == bundled:
            return cached["dirs"]
    except (OSError, ValueError, KeyError):
        pass
    tm = _full_task_manager(None)
    dirs = {name: str(Path(e.yaml_path).parent) for name, e in tm.task_index.items()
            if e.kind.name == "TASK" and e.yaml_path is not None}
    with contextlib.suppress(OSError):  # a read-only cache only costs the speed-up
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"root": bundled, "dirs": dirs}))
        os.replace(tmp, path)
    return dirs


def task_manager(include_path: str | None = None, tasks=None):
    """A TaskManager that knows `tasks` (every bundled task plus `include_path` when `tasks` is None).

    With `tasks` given and all of them bundled YAML tasks, only their directories are indexed
    (``include_defaults=False``): the same Task objects as the full index, without its ~7 s scan.
    """
    from lm_eval.tasks import TaskManager

    if include_path is None and tasks is not None:
        dirs = _bundled_task_dirs()
        if all(t in dirs for t in tasks):
            return TaskManager(include_defaults=False, include_path=sorted({dirs[t] for t in tasks}))
    return _full_task_manager(include_path)


def mirror_task_config(tm, name: str, root: Path) -> dict:
    """The task's resolved YAML redirected to the mirror at `root` (raises TaskUnavailable).

    A dict task spec replaces the task's config rather than merging into it, so we start from the
    task's own YAML (includes resolved, ``!function`` tags imported), drop ``include``, set
    ``dataset_path: json`` with the mirror's ``<split>.jsonl`` files as ``data_files`` and set to
    None each split key whose split the mirror lacks.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index[name]
    if entry.kind.name != "TASK" or entry.yaml_path is None:
        raise TaskUnavailable(f"{entry.kind.name.lower()} {name!r} has no YAML task config to redirect to the mirror")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("include", None)
    cfg["task"] = name
    where = data.mirror_dir(root, cfg.get("dataset_path", ""), cfg.get("dataset_name"))
    if not where.is_dir():
        raise TaskUnavailable(f"not in the offline mirror: {where} not found")
    files = {}
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        if split is None:
            continue
        path = where / f"{split}.jsonl"
        if path.is_file():
            files[split] = str(path)
        else:
            cfg[key] = None
    if cfg.get("validation_split") is None and cfg.get("test_split") is None:
        raise TaskUnavailable(f"no evaluation split of {name!r} in {where}")
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    return cfg


@contextlib.contextmanager
def _hub_offline():
    """No hub access: env vars for anything imported later, module constants for what is loaded."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import datasets.config

    patched = [(datasets.config, k, getattr(datasets.config, k)) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if hasattr(datasets.config, k)]
    for module, key, _ in patched:
        setattr(module, key, True)
    try:
        yield
    finally:
        for module, key, value in patched:
            setattr(module, key, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metrics(raw: dict) -> dict:
    """lm-eval's ``{"acc,none": x, ...}`` -> ``{"acc": x, ...}`` (non-finite / "N/A" -> None)."""
    out = {}
    for key, value in raw.items():
        metric = key.split(",")[0]
        if metric in METRICS:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            out[metric] = float(value) if ok else None
    return out


def zero_shot(model, tokenizer, tasks=PAPER_TASKS, limit=None, batch_size: int | str = 1, quiet: bool = False,
              include_path: str | None = None) -> dict:
    """Zero-shot accuracy with lm-eval 0.4.13 (``HFLM`` around the in-memory model, ``simple_evaluate``).

    Returns ``{name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} (those the task reports)
    or {"skipped": "<one-line reason>"} for each task in order, "_mean": mean "acc" over the
    evaluated (non-skipped) tasks, None if none}``; keys starting with "_" are not tasks.
    A task whose data is not available offline (not in the mirror, or loading fails) is skipped,
    not raised; an unknown task name is a `UserError`.
    `include_path`: extra lm-eval task YAML directory (``TaskManager(include_path=...)``).
    `batch_size`: an integer, or "auto" (lm-eval's own search for the largest batch that fits).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(str(include_path) if include_path else None, tasks=tuple(tasks))
    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    groups = [t for t in tasks if tm.task_index[t].kind.name in ("GROUP", "TAG")]
    if groups:
        raise UserError(f"{', '.join(groups)}: group/tag names are not accepted; list the single tasks")
    root = data.mirror_root()
    results: dict = {}
    loaded = {}
    offline = _hub_offline() if root is not None else contextlib.nullcontext()
    hush = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
    level = logging.getLogger("lm_eval").level
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        with offline, hush:
            for name in tasks:
                try:
                    spec = mirror_task_config(tm, name, root) if root is not None else name
                    (loaded[name],) = tm.load([spec])["tasks"].values()  # builds the Task: loads its data
                except TaskUnavailable as exc:
                    results[name] = {"skipped": str(exc)}
                except Exception as exc:  # noqa: BLE001 - dataset loading: hub down, bad files, ...
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    results[name] = {"skipped": f"cannot load data: {type(exc).__name__}: {reason}"}
            if loaded:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
                raw = lm_eval.simple_evaluate(model=lm, tasks=list(loaded.values()), task_manager=tm,
                                              limit=limit, log_samples=False)
                for name, task in loaded.items():
                    results[name] = _metrics(raw["results"][task.config.task])
    finally:
        logging.getLogger("lm_eval").setLevel(level)
    accs = [r["acc"] for r in results.values() if r.get("acc") is not None]
    out = {name: results[name] for name in tasks}
    out["_mean"] = sum(accs) / len(accs) if accs else None
    return out
