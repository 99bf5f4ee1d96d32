"""Config files of the commands built from a dataclass (`dialoop train sft|rm|ppo`, `iterate`, `demo`).

A config file is a YAML mapping of option names to values (`batch_size: 8` or `batch-size: 8`); flags given
on the command line override it. `read_config_file` checks every key and value against the dataclass and
names the file and line of a bad one; `write_config_file` saves a run's resolved options in the same form,
so that `--config RUN_DIR/train_config.yaml` repeats the run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dialoop.atomic import write_atomic


class ConfigFileError(ValueError):
    """A config file that cannot be read or holds a bad key or value; `str()` is `FILE:LINE: reason`."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")


def _allowed_types(hint: Any) -> tuple[set[type], bool]:
    """The plain types a field accepts, and whether it accepts None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = set(typing.get_args(hint))
        return {a for a in args if a is not type(None)}, type(None) in args
    if typing.get_origin(hint) is typing.Literal:
        return {type(v) for v in typing.get_args(hint)}, False
    return {hint}, False


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the field's type: YAML gives strings for paths and ints where floats are meant."""
    allowed, nullable = _allowed_types(hint)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{name} cannot be empty")
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, int | float) and float in allowed:
        return float(value)
    elif isinstance(value, str) and float in allowed and _is_float(value):
        return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
    elif isinstance(value, str) and Path in allowed:
        return Path(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif not allowed & {bool, int, float, str, Path}:
        return value  # a type this reader does not know: the dataclass checks it
    expected = " or ".join(sorted("path" if t is Path else t.__name__ for t in allowed))
    raise ValueError(f"{name} must be {expected}, not {value!r}")


def read_config_file(path: Path, config_cls: type) -> dict[str, Any]:
    """The options a config file gives, by field name, each of the field's type."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, 0, f"cannot read: {exc}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigFileError(path, line, f"invalid YAML: {exc.problem}") from exc
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigFileError(path, root.start_mark.line + 1, "expected a mapping of option: value")
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    loader = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        name = str(key).replace("-", "_")
        if key is None or name not in names:
            known = ", ".join(sorted(names))
            raise ConfigFileError(path, line, f"unknown key {key!r} (known: {known})")
        if name in values:
            raise ConfigFileError(path, line, f"{key!r} is given twice")
        try:
            values[name] = _coerce(name, hints[name], loader.construct_object(value_node, deep=True))
        except (ValueError, yaml.constructor.ConstructorError) as exc:
            raise ConfigFileError(path, line, str(exc)) from exc
    return values


def _plain(value: Any) -> Any:
    """A value as the file holds it. A relative path would change meaning with the working directory: paths
    that exist here are made absolute, and so are strings naming a directory here (`model: runs/sft`, a
    model dir or a hub id); what does not exist here (a hub id) stays as given."""
    if isinstance(value, Path):
        return str(value.resolve() if value.exists() else value)
    if isinstance(value, str) and value and Path(value).is_dir():
        return str(Path(value).resolve())
    return value


def write_config_file(path: Path, config: Any, *, leave_out: tuple[str, ...], header: str) -> None:
    """Save a config dataclass's values (paths made absolute) as a config file, but for `leave_out`."""
    values = {
        f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in leave_out
    }
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    write_atomic(Path(path), comment + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
