"""Recipe files: a script's flags as a YAML mapping (or a result's config.json), turned into command-line tokens.

The keys are the flag names (`epochs`, `batch-p` or `batch_p`); the tokens go before the command line's own, so a
flag given on the command line wins, and argparse checks every value as if it had been typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from utils import UserError

# Keys a recipe never sets: the recipe file itself, and resuming (a recipe starts a run).
NOT_RECIPE = ("config", "resume")


def read_recipe(path: Path) -> dict[str, object]:
    """The flags a recipe file sets: its mapping, or a result's config.json's "flags"."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("flags"), dict):
        loaded = loaded["flags"]
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    return {str(key).replace("-", "_"): value for key, value in loaded.items() if key not in NOT_RECIPE}


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's optional flags by destination name."""
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def value_tokens(action: argparse.Action, value: object) -> list[str]:
    """The command-line tokens that give `action` the value `value` (none for a null value)."""
    flag = action.option_strings[0]
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:
        return [flag] if value else []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def recipe_tokens(recipe: dict[str, object], parser: argparse.ArgumentParser, path: Path) -> list[str]:
    """A recipe's flags as command-line tokens; a key the parser does not know is named with its file."""
    actions = flag_actions(parser)
    unknown = sorted(key for key in recipe if key not in actions)
    if unknown:
        raise UserError(f"--config {path}: unknown flag(s) {', '.join(unknown)}")
    return [token for key, value in recipe.items() for token in value_tokens(actions[key], value)]


def config_path(argv: Sequence[str]) -> Path | None:
    """The file named by the last --config in `argv`, if any (one recipe applies: a later one replaces it)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = Path(argv[i + 1])
        elif arg.startswith("--config="):
            found = Path(arg.partition("=")[2])
    return found


def with_recipe(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with the --config file's flags in front of it (the command line's own flags come later and win)."""
    path = config_path(argv)
    return [*recipe_tokens(read_recipe(path), parser, path), *argv] if path else list(argv)


def given_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of the flags that `argv` (recipe tokens included) gives explicitly."""
    by_option = {option: action.dest for action in flag_actions(parser).values() for option in action.option_strings}
    return {by_option[arg.partition("=")[0]] for arg in argv if arg.partition("=")[0] in by_option}
