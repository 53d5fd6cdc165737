"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import sys

from storydiffusion.app import cli


def run_cli(monkeypatch, capsys, *args):
    """Call the real entry point with `args`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["storydiffusion", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
