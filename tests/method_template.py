"""The README's method template ("Adding a method in minutes"), installed as a user would: the module
written to a folder on the import path and its registry entry added to `suite.methods.METHODS`.

Grid cells run in their own processes (suite/commands/cell.py): `install` also writes a cell function
that adds the same entry there, pointed at by the runner's `MINILLM_CELL_FN` hook.
"""
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The fenced code block right after `<!-- marker ... -->` in the README."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- " + re.escape(marker) + r"[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker!r}"
    return match.group(1)


def install(folder: Path, monkeypatch, source: str | None = None, package: str = "mymethods") -> str:
    """Write the template (or `source`) as `<package>/l1act.py` under `folder`, register it in this
    process and in every cell process; returns the method's name."""
    from suite import methods

    entry_line = readme_block("registry entry").strip().rstrip(",")
    name, _, call = entry_line.partition(":")
    name = name.strip().strip('"')
    (folder / package).mkdir(parents=True, exist_ok=True)
    (folder / package / "__init__.py").write_text("")
    (folder / package / "l1act.py").write_text(source if source is not None else readme_block("method template"))
    (folder / "template_cell.py").write_text(
        "from suite import methods\n"
        f"methods.METHODS[{name!r}] = methods.{call.strip()}\n"
        "from suite.pipeline import run_cell  # noqa: E402,F401\n")
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, module)  # a rewritten module is imported afresh
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{__import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("MINILLM_CELL_FN", "template_cell:run_cell")
    monkeypatch.setitem(methods.METHODS, name, eval(call.strip(), {"Method": methods.Method}))  # noqa: S307
    return name
