"""The one place that reads argparse's private names: argparse has no public way to list a parser's flags
with their checks (choices, type, default) or to change a flag's help after it was added. Everything else
calls these functions.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple, Optional


class Flag(NamedTuple):
    """One option of a parser, as the checks of a saved configuration need it."""
    dest: str
    flags: tuple          # its option strings, the first the one named in messages ('--epochs', '--epoch')
    choices: Optional[tuple]
    type: Optional[callable]
    default: object
    switch: bool          # store_true / store_false: the value is a bool


def flags(parser: argparse.ArgumentParser) -> list:
    """Every option of `parser` (positional arguments left out), in the order they were added."""
    switch_types = (argparse._StoreTrueAction, argparse._StoreFalseAction)
    return [Flag(a.dest, tuple(a.option_strings), tuple(a.choices) if a.choices is not None else None, a.type,
                 a.default, isinstance(a, switch_types))
            for a in parser._actions if a.option_strings]


def dest_of(parser: argparse.ArgumentParser) -> dict:
    """{'--flag': dest} for every option string of `parser` (aliases included)."""
    return {s: f.dest for f in flags(parser) for s in f.flags}


def set_help(parser: argparse.ArgumentParser, dest: str, text: str):
    """Replace the --help line of the option stored in `dest` (a flag that a shared parser adds and a script
    describes in its own terms)."""
    found = [a for a in parser._actions if a.dest == dest]
    if not found:
        raise KeyError(f'no option stores {dest!r}')
    for action in found:
        action.help = text
