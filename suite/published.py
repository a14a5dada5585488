"""Published numbers (suite/published.yaml) and their rows in a results table (`suite table --published`).

The file is validated by the pydantic models below: every entry names its method, model and source;
a reported entry has a ratio, what the ratio counts, the protocol (window length, tokens,
calibration, with or without tuning) and at least one metric; a `not found` entry has no metric.

A reproduced row matches an entry when the method, the model (by the file's `models` aliases), the
ratio, what it counts (`ratio_of`; a dense row: any) and the tuning (a "w/ tune" row: `tuned: true`)
agree. The table then gets, under that row, a row "label (published)" with the entry's values and,
per metric, the reproduction's difference from it, reproduced / published - 1 in percent. The
protocol differences that remain (window length, tokens, calibration) go into the caption.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PATH = Path(__file__).with_name("published.yaml")
METRICS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4", "boolq": "BoolQ", "piqa": "PIQA",
           "hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc_easy": "ARC-e", "arc_challenge": "ARC-c",
           "openbookqa": "OBQA", "average": "Average"}  # file key -> table column (suite/tables.py)
COUNTS = {"all": "all parameters", "layers": "the decoder layers' parameters",
          "width": "the hidden width (SliceGPT's slicing)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Strict):
    corpus: str | None = None    # as suite/data.py names corpora (c4, wikitext2, bookcorpus, ...)
    nsamples: int | None = Field(None, gt=0)
    seqlen: int | None = Field(None, gt=0)
    where: str | None = None     # where the setting was read (script, function), or why it is unknown


class Protocol(_Strict):
    context: int = Field(gt=0)          # tokens per perplexity window
    tokens: str                         # which evaluation tokens ("full test set", ...)
    calibration: Calibration | None     # what the method calibrated on (None: dense or data-free)
    tuned: bool                         # recovered (e.g. LoRA) before evaluation


class Entry(_Strict):
    method: str
    model: str
    source: str = Field(min_length=10)  # paper + table, or README section
    status: Literal["reported", "not found"] = "reported"
    ratio: float | None = Field(None, ge=0, lt=1)
    ratio_of: Literal["all", "layers", "width"] | None = None
    variant: str | None = None
    protocol: Protocol | None = None
    metrics: dict[Literal[tuple(METRICS)], float] = {}

    @model_validator(mode="after")
    def _complete(self):
        if self.status == "not found":
            if self.metrics:
                raise ValueError(f"{self.method} / {self.model}: a 'not found' entry has no metrics")
            return self
        if self.ratio is None or self.protocol is None or not self.metrics:
            raise ValueError(f"{self.method} / {self.model}: a reported entry needs ratio, protocol and metrics")
        if self.ratio > 0 and self.ratio_of is None:
            raise ValueError(f"{self.method} / {self.model} @ {self.ratio}: say what the ratio counts (ratio_of)")
        return self


class Published(_Strict):
    models: dict[str, list[str]]
    entries: list[Entry]

    @model_validator(mode="after")
    def _known_models(self):
        unknown = {e.model for e in self.entries} - set(self.models)
        if unknown:
            raise ValueError(f"entries name models not in `models`: {', '.join(sorted(unknown))}")
        return self

    def model_of(self, name: str) -> str | None:
        """The published model a record's model name (a hub id, a path) is, or None."""
        name = str(name).lower()
        for model, aliases in self.models.items():
            if any(name == a.lower() or name.rsplit("/", 1)[-1] == a.lower().rsplit("/", 1)[-1] for a in aliases):
                return model
        return None


@functools.cache
def load(path: Path = PATH) -> Published:
    """The published numbers (validated; pydantic's ValidationError names the bad entry)."""
    return Published.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def match(published: Published, method: str, model: str, ratio: float, ratio_of: str, tuned: bool) -> Entry | None:
    """The reported entry for a reproduced row, or None."""
    name = published.model_of(model)
    for entry in published.entries:
        if (entry.status == "reported" and entry.method == method and entry.model == name
                and math.isclose(entry.ratio, ratio, abs_tol=1e-9) and entry.protocol.tuned == tuned
                and (method == "dense" or entry.ratio_of == ratio_of)):
            return entry
    return None


def _measured(records: list[dict]) -> dict:
    """{(model, label, ratio): (evaluation, calibration)} of the ok records, as the table's rows name them."""
    from suite.records import TUNE, cell_identity, latest

    out = {}
    for record in latest(records):
        if record.get("status", "ok") == "ok":
            model, label, ratio, _ = cell_identity(record)
            cell = record.get("cell") or {}
            value = (cell.get("evaluation") or {}, record.get("calibration"))
            for suffix in ("", *TUNE):
                out[(model, label + suffix, ratio)] = value
    return out


def protocol_note(entry: Entry, evaluation: dict, calibration: dict | None) -> str:
    """What still differs between the entry's protocol and the reproduction's, one sentence ("" if nothing)."""
    p, diffs = entry.protocol, []
    seqlen, tokens = evaluation.get("seqlen"), evaluation.get("max_tokens")
    if seqlen is not None and seqlen != p.context:
        diffs.append(f"published at {p.context}-token windows, measured at {seqlen}")
    if tokens is not None:
        diffs.append(f"published on the {p.tokens}, measured on the first {tokens:,} tokens")
    if calibration and p.calibration is not None:
        ours, theirs = calibration, p.calibration
        for key, unit in (("corpus", "corpus"), ("nsamples", "windows"), ("seqlen", "tokens per window")):
            mine, published = ours.get(key), getattr(theirs, key)
            if published is None:
                diffs.append(f"calibration {unit} not published ({theirs.where}), measured {mine}")
            elif str(mine).lower() != str(published).lower():
                diffs.append(f"calibration {unit} published {published}, measured {mine}")
    if not diffs:
        return ""
    what = entry.method if entry.method == "dense" else f"{entry.method} @ {entry.ratio:.0%} of {COUNTS[entry.ratio_of]}"
    return f"Protocol differences, {what} on {entry.model}: " + "; ".join(diffs) + "."


def add_published(frame: pd.DataFrame, records: list[dict], published: Published | None = None) -> pd.DataFrame:
    """`frame` (suite.tables.results_frame) with a published row under every matching reproduced row;
    `frame.attrs["protocol_notes"]` lists the remaining protocol differences."""
    from suite.records import TUNE

    published = published or load()
    measured = _measured(records)
    rows, notes, sources = [], [], []
    for _, row in frame.iterrows():
        rows.append(row)
        if row["_failed"]:
            continue
        tuned = str(row["Method"]).endswith(TUNE[1])
        entry = match(published, row["_method"], row["Model"], row["Ratio"], row["_ratio_of"], tuned)
        if entry is None:
            continue
        extra = row.copy()
        for column in [c for c in frame.columns if c not in ("Model", "_method", "Ratio", "_ratio_of")]:
            extra[column] = math.nan if pd.api.types.is_number(row[column]) else ""
        extra["Method"] = f"{row['Method']} (published)"
        extra["Seeds"], extra["_failed"], extra["_published"], extra["Error"] = 1, False, True, ""
        difference = {}
        tasks = [c for c in frame.attrs["metrics"] if c not in frame.attrs["lower_is_better"] and c != "Average"]
        published_tasks = [METRICS[k] for k in entry.metrics if k not in ("wikitext2", "ptb", "c4", "average")]
        for key, value in entry.metrics.items():
            column = METRICS[key]
            if column == "Average" and sorted(tasks) != sorted(published_tasks):
                continue  # an average over other tasks is not comparable
            if column in frame.columns:
                extra[column] = value
                if not math.isnan(row[column]):
                    difference[column] = 100 * (row[column] / value - 1)
        extra["_difference"] = difference
        rows.append(extra)
        note = protocol_note(entry, *measured.get((row["Model"], row["Method"], row["Ratio"]), ({}, None)))
        if note and note not in notes:
            notes.append(note)
        sources.append(entry.source)
    out = pd.DataFrame(rows).reset_index(drop=True)
    out["_difference"] = [d if isinstance(d, dict) else {} for d in out.get("_difference", [None] * len(out))]
    out["_published"] = out["_published"].astype(bool)
    if sources:
        notes.append("Sources: " + "; ".join(dict.fromkeys(sources)) + ".")
    out.attrs = {**frame.attrs, "protocol_notes": notes}
    return out
