"""Config text: a sweep config file read as UTF-8, parsed as YAML (a key given twice is an
error, not YAML's silent last-one-wins), ``--set dotted.key=value`` overrides parsed and applied
to the parsed mapping. Every problem is a :class:`~sweeps.spec.errors.ConfigError` naming the field
(:mod:`sweeps.spec.config` validates the result against the schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys: YAML's own rules
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicated key {key!r} on lines {seen[key]} and {line} (YAML would keep "
                        "only the last one): merge them into one",
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe types only); a key given twice in one mapping is an error.

    Raises:
        yaml.YAMLError: not YAML, or a duplicated key (the message names it and its lines).
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe types only


def read_config_text(path: str | Path) -> str:
    """The text of the config file ``path``: UTF-8 (a BOM allowed); ``ConfigError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config: cannot read {str(path)!r}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config: {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set: expected dotted.key=value (got {text!r})")
    try:
        return key, parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value is not valid YAML: {yaml_problem(err)} (got {raw!r})") from None
    except RecursionError:
        raise ConfigError(f"--set {key}: value is nested too deeply (got {raw[:80]!r})") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the problem and where (``line L, column C``)."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[part] = child
        node = child
    if not isinstance(node, dict):
        raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section (got {node!r})")
    node[parts[-1]] = value
