"""Command-line flags declared once, on the fields of a frozen dataclass of settings.

A field made with `setting(default, doc, parse=..., choices=...)` is a flag: the field's name
with "-" for "_" (`warmup_steps` is `--warmup-steps`), its default, `doc` for its help, and
`parse`, which turns the text of the command line into the value or refuses it with a message
saying what it expected. A boolean setting is a switch: `--name` sets one that defaults to
False, `--no-name` clears one that defaults to True. A field whose default is itself a dataclass
of settings (TrainConfig.model) adds that dataclass's settings as flags; any other field is not a
flag.

Every error is one line and exit status 2: the usage summary argparse prints first runs to a dozen
lines for the example's flags and buries the message (--help has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Iterator, NamedTuple, NoReturn, Sequence


class Setting(NamedTuple):
  """What a field's flag needs besides its name and default: held in the field's metadata."""
  doc: str | None
  parse: Callable[[str], Any] | None  # None: the text as it is
  choices: Sequence[str] | None


def setting(default: Any, doc: str | None = None, *, parse: Callable[[str], Any] | None = None,
            choices: Sequence[str] | None = None) -> Any:
  """A dataclass field that is also a command-line flag."""
  return dataclasses.field(default=default,
                           metadata={"setting": Setting(doc, parse, choices)})


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
  """A `parse`: an integer of at least `minimum` (and at most `maximum`, if given)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
      bounds = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
      raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
    return value
  return parse


def number(low: float, high: float = math.inf, *, low_included: bool) -> Callable[[str], float]:
  """A `parse`: a finite number between `low` and `high` (`high` included when finite)."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    above_low = value >= low if low_included else value > low
    if not (math.isfinite(value) and above_low and value <= high):
      interval = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high < math.inf else ')'}"
      raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
    return value
  return parse


class ArgumentParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line, exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message}\n")


def _settings(config_class: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
  """The fields of `config_class` that are flags, its nested dataclasses' included, in order."""
  for field in dataclasses.fields(config_class):
    if dataclasses.is_dataclass(field.default):
      yield from _settings(type(field.default))
    elif "setting" in field.metadata:
      yield field, field.metadata["setting"]


def add_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
  """Adds a flag to `parser` for each setting of `config_class`."""
  for field, flag in _settings(config_class):
    name = "--" + field.name.replace("_", "-")
    if isinstance(field.default, bool):
      if field.default:
        parser.add_argument(f"--no-{name[2:]}", dest=field.name, action="store_false",
                            help=flag.doc)
      else:
        parser.add_argument(name, action="store_true", help=flag.doc)
    else:
      parser.add_argument(name, type=flag.parse, choices=flag.choices, default=field.default,
                          help=flag.doc)


def config_from(config_class: type, args: dict[str, Any]) -> Any:
  """A `config_class` of the parsed flags `args` (by field name); a field that is not a flag
  keeps its default. Raises what `config_class` raises for values it refuses together."""
  values = {}
  for field in dataclasses.fields(config_class):
    if dataclasses.is_dataclass(field.default):
      values[field.name] = config_from(type(field.default), args)
    elif "setting" in field.metadata:
      values[field.name] = args[field.name]
  return config_class(**values)
