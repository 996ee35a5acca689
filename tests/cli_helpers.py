"""Run the console entry point in-process, as `adapterzoo ARGS...` would, for tests."""

import sys

from adapterzoo.cli import main


def run(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `adapterzoo ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["adapterzoo", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
