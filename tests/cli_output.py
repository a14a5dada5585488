"""What a refused command prints: one `error: ...` line on stderr (warnings of libraries aside)."""


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
