"""Checks the benchmark tools make on their command lines before measuring anything: a
mistake is a one-line usage error (exit 2), not a traceback after minutes of work."""

from __future__ import annotations

import argparse
import os


def positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Each of args.<name> (an int flag --name) is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive; got {getattr(args, name)}")


def preset(parser: argparse.ArgumentParser, name: str, flag: str = "--preset") -> None:
    """name is one of lrulm's model presets."""
    from lrulm.model_config import PRESETS

    if name not in PRESETS:
        parser.error(f"{flag} {name!r}: use one of {', '.join(PRESETS)}")


def writable(parser: argparse.ArgumentParser, path: str, flag: str = "--json") -> None:
    """path (if given) can be written: checked now, not when the results are ready."""
    if path and (
        os.path.isdir(path) or not os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK)
    ):
        parser.error(f"{flag} {path}: give a file in an existing, writable directory")


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds each option's default to its --help line (and its subcommands' options'),
    unless the help names one already; flags without a value and empty defaults are left."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        default = action.default  # 0 and 0.0 are shown (they == False)
        shown = not (default is None or default is False or default is argparse.SUPPRESS)
        shown = shown and default != ""
        if not action.option_strings or action.nargs == 0 or not shown:
            continue
        if action.help is None:
            action.help = "default: %(default)s"
        elif "default:" not in action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return parser
