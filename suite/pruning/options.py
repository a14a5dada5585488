"""A method's options as one small declarative config object (PEFT's `LoraConfig` spirit, pydantic).

A method module declares

    class Options(MethodOptions):
        norm: Literal["l1", "l2"] = "l2"        # choices are Literal types
        batch_size: PositiveInt = 1             # ranges are annotated types (pydantic / annotated_types)
        eps: Float = 1e-3                       # Float / Int: numbers that refuse booleans

        @model_validator(mode="after")          # combinations: raise UserError with one full line
        def _combinations(self, info): ...      # info.context["scope"]: the selection scope, or None

    OPTIONS = Options.defaults()                # {name: default}, what the rest of the code reads

and `parse(Options, NAME, given, scope=...)` returns the merged options as a plain dict, or raises
one UserError line for an unknown key (`method 'x' has no option 'y'; options: …`), an ill-typed
value (`x option y: expected float, got 'two'`), a value outside its choices (`x option y='z':
choose one of a, b`) or range (`x option y: must be >= 1, got 0`), or the combination a validator
refuses. Values may come as strings from the CLI (`--opt eps=1e-3`): pydantic's lax mode converts
them ("1e-3" -> 1e-3, "16" -> 16, "true" / "false" / "yes" / "no" / "1" / "0" -> bool).

The grid config (`suite/config.py`), `suite prune` and `suite.pipeline.prune` all call `parse`
through `suite.pruning.scoring.checked_options`, so one declaration is the only place an option's type,
choices, range and combinations are written down.
"""
from __future__ import annotations

import difflib
import math
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

from suite.pruning.errors import UserError


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _bool_word(value):
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if not isinstance(value, bool):
        raise ValueError("expected a boolean")
    return value


def _whole(value):
    """16, 16.0 and "16" are 16; 2.5 is refused (as the option parser did before pydantic)."""
    value = _finite(value)
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError("not a whole number") from None
    if not isinstance(number, (int, float)) or number != int(number):
        raise ValueError("not a whole number")
    return int(number)


def _finite(value):
    """A number (or its CLI string) that is finite: inf and nan are refused (an SPSA step of inf runs)."""
    value = _no_bool(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value  # not a number at all: pydantic's float check says so
    if not math.isfinite(number):
        raise PydanticCustomError("finite_number", "expected a finite number")
    return value


def _list_word(value):
    """A list option from the CLI: "[1e2, 1e-4, 0]" or "1e2,1e-4,0" -> ["1e2", "1e-4", "0"] (items then
    converted by their own type); a list (YAML, Python) passes unchanged."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def listed(item):
    """The type of a list option whose items are `item` (e.g. `listed(Float)`), also given as one CLI
    string (`--opt sm_reg_weight=1e2,1e-4,0` or `=[1e2,1e-4,0]`); an empty list is refused."""
    from pydantic import Field

    return Annotated[list[item], BeforeValidator(_list_word), Field(min_length=1)]


Float = Annotated[float, BeforeValidator(_finite)]
Int = Annotated[int, BeforeValidator(_whole)]
Bool = Annotated[bool, BeforeValidator(_bool_word)]


class MethodOptions(BaseModel):
    """Base of every method's `Options`: unknown keys refused, defaults validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @classmethod
    def defaults(cls) -> dict:
        """{option: default} (a plain dict; the module-level `OPTIONS`)."""
        return {name: field.default for name, field in cls.model_fields.items()}


def _type_word(annotation) -> str:
    base = getattr(annotation, "__origin__", annotation)
    if base is Annotated:
        base = annotation.__args__[0]
    return getattr(base, "__name__", str(base))


def parse(options_class: type[MethodOptions], method_name: str, given: dict | None,
          scope: str | None = None) -> dict:
    """`options_class`'s defaults overridden by `given`, validated; a plain dict.

    `scope` ("layer" | "global" | None: the method's default | "checked": already checked with its
    scope, as `method.score` re-validates options the pipeline checked; scope-dependent refusals are
    then skipped) reaches the model validators as `info.context["scope"]`. Raises UserError (one
    line) as the module docstring lists.
    """
    given = dict(given or {})
    fields = options_class.model_fields
    unknown = [key for key in given if key not in fields]
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"method {method_name!r} has no option {unknown[0]!r}{hint}; options: {known}")
    try:
        model = options_class.model_validate(given, context={"scope": scope})
    except pydantic.ValidationError as exc:
        raise UserError(_one_line(exc, options_class, method_name, given)) from None
    return model.model_dump()


def _one_line(exc: pydantic.ValidationError, options_class, method_name: str, given: dict) -> str:
    error = exc.errors(include_url=False)[0]
    key = str(error["loc"][0]) if error["loc"] else ""
    value: Any = given.get(key, error.get("input"))
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "value_error" and not key:  # a model validator's ValueError: its own words
        return f"{method_name} options: {ctx.get('error', error['msg'])}"
    if kind == "finite_number":
        return f"{method_name} option {key}: expected a finite number, got {value!r}"
    if kind == "literal_error":
        choices = ", ".join(str(c) for c in options_class.model_fields[key].annotation.__args__ if c is not None)
        return f"{method_name} option {key}={value!r}: choose one of {choices}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and kind.endswith(("_than", "_than_equal")):
            return f"{method_name} option {key}: must be {word} {ctx[bound]}, got {value!r}"
    expected = _type_word(options_class.model_fields[key].annotation) if key in options_class.model_fields else "?"
    return f"{method_name} option {key}: expected {expected}, got {value!r}"
