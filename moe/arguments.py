"""The tools' command lines (``moe experts``, ``moe experiments``, ``moe data ...``): one-line errors and
checked numbers, like the training commands' (LightningCLI) flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class ToolArgumentError(argparse.ArgumentError):
    """A mistake on a tool's command line; ``prog`` is the command whose ``--help`` lists the options."""

    def __init__(self, message: str, prog: str):
        super().__init__(None, message)
        self.prog = prog


class ToolParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose mistakes are raised (:class:`ToolArgumentError`) for the ``moe`` command
    to print as one line, ``moe: error: ...``, instead of argparse's usage block and exit."""

    def error(self, message: str) -> NoReturn:
        handling = sys.exc_info()[1]
        if isinstance(handling, ToolArgumentError):  # a subcommand's own error, passed up by its parent parser
            raise handling
        raise ToolArgumentError(message, self.prog)


def run_tool(main: Callable[[Sequence[str] | None], int | None], prog: str) -> int:
    """A tool's ``main`` run as its own program (``python -m ...``): a mistake is one line and status 2."""
    try:
        return int(main(None) or 0)
    except argparse.ArgumentError as exc:
        print(f"moe: error: {exc} ({getattr(exc, 'prog', prog)} --help lists the options)", file=sys.stderr)
        return 2


def _at_least(kind: type, least: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused below ``least`` (or at it, when ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > least if strict else value >= least):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else 'at least'} {least:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _at_least(int, 1)
non_negative_float = _at_least(float, 0)
positive_float = _at_least(float, 0, strict=True)
