"""The tools' command lines (``moe experts``, ``moe experiments``, ``moe data ...``) on jsonargparse, the parser
of the training commands (LightningCLI), and the one-line message of a mistake on either.

Each option is declared once: flag, type with its range (:mod:`jsonargparse.typing`: ``PositiveInt``,
``NonNegativeFloat``, ...; ``Literal`` for choices), default (taken from the config dataclass it fills) and help.
A settings dataclass may declare its options itself (:func:`option` fields): the parser takes flag, type and
default from the field (:meth:`ToolParser.add_option`) and the dataclass checks a value given in code against
the same type (:func:`settings_mistake`), so a range is written once for both.
jsonargparse checks the values; its exceptions carry only text, so the message of a mistake is not read from
them: :func:`find_mistake` checks the given values against the declared types and names the first that does not
fit (:class:`Mistake`), and the library's text, whitespace-joined, serves only when no value is at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

__all__ = [
    "Mistake",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "ToolArgumentError",
    "ToolParser",
    "declared_options",
    "find_mistake",
    "option",
    "plain_number",
    "run_tool",
    "settings_mistake",
]

# the ranges of jsonargparse's restricted numbers: type -> (bound, strict), i.e. value >= bound or value > bound
RANGES: dict[type, tuple[float, bool]] = {
    PositiveInt: (0, True),
    NonNegativeInt: (0, False),
    PositiveFloat: (0, True),
    NonNegativeFloat: (0, False),
}
_NUMBER_BASE = {PositiveInt: int, NonNegativeInt: int, PositiveFloat: float, NonNegativeFloat: float}


@dataclass(frozen=True)
class Mistake:
    """A value that does not fit its option's declared type: ``kind`` is "type" (not a ``base``, of a number
    type with a range when ``ranged``), "range" (outside ``bound``/``strict``), "choice" (not among ``choices``)
    or "empty" (no value of an option that takes one or more)."""

    flag: str
    value: str
    kind: Literal["type", "range", "choice", "empty"]
    base: type | None = None
    bound: float = 0
    strict: bool = False
    choices: tuple = ()
    ranged: bool = False

    def tool_line(self) -> str:
        """The tools' wording (argparse's): ``argument --n-train: must be at least 1, got 0``."""
        return f"argument {self.flag}: {self.problem()}"

    def problem(self) -> str:
        """What is wrong with the value, in the tools' wording without the flag: ``must be at least 1, got 0``."""
        if self.kind == "type" and self.ranged:
            return f"{self.value!r} is not {'an integer' if self.base is int else 'a number'}"
        if self.kind == "type":
            return f"invalid {self.base.__name__} value: {self.value!r}"
        if self.kind == "choice":
            listed = ", ".join(repr(c) for c in self.choices)
            return f"invalid choice: {self.value!r} (choose from {listed})"
        if self.kind == "empty":
            return "give at least one value"
        if self.strict and self.base is int:  # an integer above 0 is one of at least 1
            return f"must be at least {int(self.bound) + 1}, got {self.value}"
        wanted = f"> {self.bound:g}" if self.strict else f"at least {self.bound:g}"
        return f"must be {wanted}, got {self.value}"

    def training_line(self) -> str:
        """The training commands' wording: ``--data.batch_size 0: must satisfy value>0``."""
        if self.kind == "type":
            return f"{self.flag} {self.value}: expected {self.base.__name__}"
        if self.kind == "choice":
            return f"{self.flag} {self.value}: expected one of {', '.join(str(c) for c in self.choices)}"
        return f"{self.flag} {self.value}: must satisfy value{'>' if self.strict else '>='}{self.bound:g}"


def _check(flag: str, hint, text: str) -> Mistake | None:
    """The mistake of ``text`` as a value of type ``hint`` (None when it fits or the type is not one checked here)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("null", "none"):
            return None
        options = [a for a in args if a is not type(None)]
        return _check(flag, options[0], text) if len(options) == 1 else None
    if typing.get_origin(hint) is Literal:
        return None if text in {str(a) for a in args} else Mistake(flag, text, "choice", choices=args)
    base = _NUMBER_BASE.get(hint, hint if hint in (int, float) else None)
    if base is None:
        return None
    try:
        value = base(text)
    except ValueError:
        return Mistake(flag, text, "type", base=base, ranged=hint in RANGES)
    if hint in RANGES:
        bound, strict = RANGES[hint]
        if not (value > bound if strict else value >= bound):  # NaN fails too
            return Mistake(flag, text, "range", base=base, bound=bound, strict=strict)
    return None


def _element(hint) -> Any:
    """The type of each value of an option that takes several (``tuple[int, ...]``, ``list[float]``), else None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if (origin is tuple and len(args) == 2 and args[1] is Ellipsis) or (origin is list and len(args) == 1):
        return args[0]
    return None


def _allows_none(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _without_none(hint) -> Any:
    """``hint`` without its None: ``X`` of ``X | None``; any other hint as it is."""
    if _allows_none(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def option(flag: str, default: Any = None) -> Any:
    """A field of a settings dataclass that a tool's command line sets with ``flag``: the field's annotation is
    the option's type, its range or choices included (``PositiveInt``, ``NonNegativeFloat | None``,
    ``Literal["global"] | None``; ``tuple[int, ...]`` for one or more values)."""
    return dataclasses.field(default=default, metadata={"flag": flag})


def declared_options(settings: type) -> dict[str, tuple[str, Any, Any]]:
    """Field name -> (flag, type hint, default) of the :func:`option` fields of the dataclass ``settings``."""
    hints = typing.get_type_hints(settings)
    return {
        f.name: (f.metadata["flag"], hints[f.name], f.default)
        for f in dataclasses.fields(settings)
        if "flag" in f.metadata
    }


def plain_number(value: Any) -> Any:
    """A parsed restricted number (``PositiveInt(5)``) as the plain int or float it is (what a config file or a
    saved hyperparameter should hold); any other value as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return float(value) if isinstance(value, float) else value


def settings_mistake(settings: Any) -> Mistake | None:
    """The first :func:`option` field of the dataclass instance ``settings`` whose value does not fit its declared
    type (a value set in code rather than parsed), as the :class:`Mistake` the tool's parser would report."""
    for name, (flag, hint, _) in declared_options(type(settings)).items():
        value, element = getattr(settings, name), _element(hint)
        if element is not None and not len(value):
            return Mistake(flag, "", "empty")
        for v in value if element is not None else [value]:
            found = _check(flag, element or hint, "null" if v is None else str(v))
            if found is not None:
                return found
    return None


def _given(argv: Sequence[str], flags: Iterable[str], many: Iterable[str] = ()) -> Iterable[tuple[str, str]]:
    """(flag, value) of every value ``argv`` gives one of ``flags``: ``--flag v``, ``--flag=v``, or ``--flag v1 v2``
    for the flags in ``many``."""
    flags, many, argv = set(flags), set(many), list(argv)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag not in flags:
            continue
        if eq:
            yield flag, value
            continue
        for value in argv[i + 1 : None if flag in many else i + 2]:
            if value.startswith("--"):
                break
            yield flag, value


def find_mistake(argv: Sequence[str], declared: dict[str, object], many: Iterable[str] = ()) -> Mistake | None:
    """The first value in ``argv`` that does not fit the type ``declared`` for its flag (flag -> type hint);
    the flags in ``many`` take several values."""
    for flag, value in _given(argv, declared, many):
        found = _check(flag, declared[flag], value)
        if found is not None:
            return found
    return None


class ToolArgumentError(ValueError):
    """A mistake on a tool's command line; ``prog`` is the command whose ``--help`` lists the options."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class ToolParser(ArgumentParser):
    """A jsonargparse parser of a tool whose mistakes are one :class:`ToolArgumentError` for the ``moe`` command
    to print as one line (``moe: error: ...``), not a usage block and an exit."""

    def __init__(self, prog: str, description: str | None = None):
        self.declared: dict[str, object] = {}  # flag or positional name -> its type
        self.positionals: list[str] = []  # in order
        self.required_positionals: list[str] = []
        self.many: set[str] = set()  # flags that take several values
        self.subcommands: dict[str, ToolParser] = {}
        self.tool_prog = prog
        super().__init__(prog=prog, description=description, exit_on_error=False)

    def add_tool_subcommands(self, parsers: dict[str, ToolParser], dest: str = "cmd") -> None:
        """Subcommands (``moe experts fit|report|...``), each a :class:`ToolParser` of its own."""
        sub = self.add_subcommands(dest=dest, required=True)
        for name, parser in parsers.items():
            sub.add_subcommand(name, parser)
            parser.prog = parser.tool_prog  # its usage line names the command a user types
        self.subcommands = dict(parsers)

    def add_argument(self, *names: str, **kwargs):
        action = super().add_argument(*names, **kwargs)
        if "choices" in kwargs:
            hint = Literal[tuple(kwargs["choices"])]
        else:
            hint = kwargs.get("type", str)
        for name in names:
            self.declared[name] = hint
            if kwargs.get("nargs") in ("+", "*"):
                self.many.add(name)
        if not names[0].startswith("-"):
            self.positionals.append(names[0])
            if kwargs.get("nargs") not in ("?", "*"):
                self.required_positionals.append(names[0])
        return action

    def add_option(self, settings: type, name: str, **kwargs):
        """The option that the :func:`option` field ``name`` of the dataclass ``settings`` declares: its flag and
        type (range or choices included) from the field, its default the field's unless ``kwargs`` give one
        (a None default admits None); ``kwargs``: the rest (``help``)."""
        flag, hint, default = declared_options(settings)[name]
        element = _element(hint)
        if element is not None:
            hint, kwargs["nargs"] = element, "+"
        kwargs.setdefault("default", default)
        plain = _without_none(hint)
        if typing.get_origin(plain) is Literal:  # listed in the usage line as {a,b}
            return self.add_argument(flag, choices=typing.get_args(plain), **kwargs)
        if plain is str:  # argparse's own: no type in the help
            return self.add_argument(flag, **kwargs)
        if kwargs["default"] is None and element is None and not _allows_none(hint):
            hint = hint | None
        return self.add_argument(flag, type=hint, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *more, **options) -> Namespace:
        """The parsed options of ``args`` (default ``sys.argv[1:]``), or a :class:`ToolArgumentError`."""
        args = list(sys.argv[1:] if args is None else args)
        try:
            return super().parse_args(args, *more, **options)
        except argparse.ArgumentError as exc:
            raise self.mistake(args, exc) from None

    def mistake(self, argv: list[str], exc: argparse.ArgumentError) -> ToolArgumentError:
        """The one-line error of ``argv`` that jsonargparse refused with ``exc``, from the declared options;
        a subcommand's own parser words its mistakes and names its ``--help``."""
        for i, arg in enumerate(argv):
            if arg in self.subcommands:
                return self.subcommands[arg].mistake(argv[i + 1 :], exc)
        return ToolArgumentError(self._line(argv, exc), self.tool_prog)

    def _line(self, argv: list[str], exc: argparse.ArgumentError) -> str:
        if self.subcommands:
            listed = ", ".join(repr(c) for c in self.subcommands)
            given = next((a for a in argv if not a.startswith("-")), None)
            if given is None:
                return f"the following arguments are required: {{{','.join(self.subcommands)}}}"
            return f"argument {{{','.join(self.subcommands)}}}: invalid choice: {given!r} (choose from {listed})"
        mistake = find_mistake(argv, {k: v for k, v in self.declared.items() if k.startswith("-")}, self.many)
        words = self._free_words(argv)
        for name, word in zip(self.positionals, words):
            mistake = mistake or _check(name, self.declared[name], word)
        if mistake is not None:
            return mistake.tool_line()
        missing = [name for name in self.positionals[len(words) :] if name in self.required_positionals]
        if missing:
            return f"the following arguments are required: {', '.join(missing)}"
        return " ".join(str(exc).split())

    def _free_words(self, argv: list[str]) -> list[str]:
        """The words of ``argv`` that no flag takes: the positionals' values, in order."""
        takes_value = {flag for flag in self.declared if flag.startswith("-")}
        free, skip = [], 0  # skip: how many words the last flag still takes (-1: all up to the next flag)
        for arg in argv:
            if arg.startswith("-"):
                flag = arg.partition("=")[0]
                skip = 0 if ("=" in arg or flag not in takes_value) else (-1 if flag in self.many else 1)
                continue
            if skip:
                skip -= skip > 0
                continue
            free.append(arg)
        return free


def run_tool(main: Callable[[Sequence[str] | None], int | None], prog: str) -> int:
    """A tool's ``main`` run as its own program (``python -m ...``): a mistake is one line and status 2."""
    try:
        return int(main(None) or 0)
    except ToolArgumentError as exc:
        print(f"moe: error: {exc} ({exc.prog or prog} --help lists the options)", file=sys.stderr)
        return 2
