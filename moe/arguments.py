"""The tools' command lines (``moe experts``, ``moe experiments``, ``moe data ...``): one-line errors and
checked numbers, like the training commands' (LightningCLI) flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class ToolParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose mistakes are one line naming the flag, ending with where the help is
    (argparse prints its usage block first; this one leaves it to ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _bounded(kind: type, low: float, inclusive: bool) -> Callable[[str], float]:
    word = f">= {low:g}" if inclusive else f"> {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (value == low and not inclusive) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {word}")
        return value

    parse.__name__ = f"{kind.__name__} {word}"
    return parse


positive_int = _bounded(int, 0, inclusive=False)
non_negative_int = _bounded(int, 0, inclusive=True)
non_negative_float = _bounded(float, 0, inclusive=True)
positive_float = _bounded(float, 0, inclusive=False)
