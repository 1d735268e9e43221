"""Reading a config: the embedded defaults, then a YAML file, then `--set section.key=value` overrides.

An unknown key or a value of the wrong type fails with the dotted key named and the fix suggested.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from innerloop.distributed.config import Config, ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Embedded defaults <- the YAML file at `path` <- `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    return _validate(raw, source=str(path) if path else "the embedded defaults")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a file from configs/ or omit it "
                          "to use the embedded demo defaults")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, "
                          "e.g. --set rollout.temperature=0.8")
    # YAML parsing gives overrides the same types a config file would: 0.8, true, [a, b], {10: 4}, null.
    # Text YAML cannot read, or reads as a mapping of empty or nested values (as "{question}" and
    # "Q: {question}" do), is meant as a plain string.
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return key.strip(), text
    if isinstance(value, dict) and (not value or any(v is None or isinstance(v, dict) for v in value.values())):
        return key.strip(), text
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'{_suggest(err['loc'])}")
        elif err["type"] == "value_error":
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{key}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str:
    """Name the closest valid key: most unknown keys are typos."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    prefix = ".".join(str(p) for p in loc[:-1])
    if close:
        return f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return f"; valid keys here: {', '.join(model.model_fields)}"
