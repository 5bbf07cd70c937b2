"""The PVE API structure file as a pure validator.

Everything here is a pure function of the structure (the vendored
``data/pve-api-structure.json``) and the request: path template matching,
parameter coercion from form-encoded strings, the checks PVE's JSONSchema
applies (required, type, enum, pattern, min/max, length, ``[n]`` families,
property strings, named formats, ``additionalProperties``) and a checker for
response values against an endpoint's ``returns``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from labkeeper.pvesim.formats import NAMED, NAMED_PROPERTY_STRINGS

# How many devices PVE allows per indexed family (``net[n]`` -> net0..net31).
FAMILY_CAPS: dict[str, int] = {
    "net": 32,
    "ipconfig": 32,
    "mp": 256,
    "unused": 256,
    "dev": 256,
    "scsi": 31,
    "virtio": 16,
    "ide": 4,
    "sata": 6,
    "usb": 14,
    "hostpci": 16,
    "serial": 4,
    "parallel": 3,
    "numa": 8,
    "virtiofs": 10,
}

# Path parameters that may contain "/" when a client does not percent-encode them.
GREEDY_PARAMS = frozenset({"volume"})

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

NOT_DEFINED = (
    "property is not defined in schema and the schema does not allow additional properties"
)
MISSING = "property is missing and it is not optional"


# The shared structure file was made by stripping every ``description`` key from
# PVE's API viewer data, which also removed the *parameters* named ``description``.
# They are restored here, as PVE 9 declares them (string, optional, at most 8 KiB),
# on the guest endpoints labkeeper uses; nothing else is added.
_DESCRIPTION_PARAM = {"type": "string", "optional": 1, "maxLength": 8192}
RESTORED_DESCRIPTION_PARAMS: tuple[tuple[str, str], ...] = (
    ("/nodes/{node}/lxc", "POST"),
    ("/nodes/{node}/lxc/{vmid}/config", "PUT"),
    ("/nodes/{node}/qemu", "POST"),
    ("/nodes/{node}/qemu/{vmid}/config", "POST"),
    ("/nodes/{node}/qemu/{vmid}/config", "PUT"),
    ("/nodes/{node}/qemu/{vmid}/clone", "POST"),
    ("/nodes/{node}/lxc/{vmid}/clone", "POST"),
    ("/nodes/{node}/lxc/{vmid}/snapshot", "POST"),
    ("/nodes/{node}/qemu/{vmid}/snapshot", "POST"),
)


def _restore_description_params(structure: dict[str, Any]) -> dict[str, Any]:
    for template, method in RESTORED_DESCRIPTION_PARAMS:
        entry = structure["paths"].get(template, {}).get(method)
        if entry is None:
            continue
        props = entry.setdefault("parameters", {}).setdefault("properties", {})
        props.setdefault("description", dict(_DESCRIPTION_PARAM))
    return structure


@functools.cache
def load_structure(path: str | None = None) -> dict[str, Any]:
    """The structure file (vendored copy unless ``path`` is given), parsed once, with the
    ``description`` parameters the shared copy lost restored."""
    if path is not None:
        return _restore_description_params(json.loads(Path(path).read_text(encoding="utf-8")))
    text = resources.files("labkeeper.pvesim").joinpath("data/pve-api-structure.json")
    return _restore_description_params(json.loads(text.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- patterns


def perl_to_python(pattern: str) -> str:
    """Translate the Perl regex dialect used in the structure file to Python ``re``."""
    out = pattern.replace("(?^:", "(?:").replace("(?^i:", "(?i:")
    out = out.replace(r"\z", r"\Z").replace(r"\h", r"[ \t]")
    out = out.replace("[[:alnum:]]", "[A-Za-z0-9]").replace("[:alnum:]", "A-Za-z0-9")
    return out


@functools.cache
def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    """Compile a Perl pattern anchored to the whole value; None if Python cannot."""
    try:
        return re.compile(r"(?:" + perl_to_python(pattern) + r")\Z")
    except re.error:
        return None


# --------------------------------------------------------------------------- coercion


class _TypeError(Exception):
    pass


def coerce(value: Any, type_: str | None) -> Any:
    """Turn a form-encoded value into the JSON type; raise _TypeError on failure."""
    if type_ in (None, "string"):
        return _to_string(value)
    to_type = _COERCE.get(type_)
    return value if to_type is None else to_type(value)


def _to_string(value: Any) -> str:
    if isinstance(value, (list, dict)):
        raise _TypeError(f"type check ('string') failed - got {_ref(value)}")
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _to_integer(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise _TypeError(f"type check ('integer') failed - got '{value}'")


def _to_number(value: Any) -> int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and re.fullmatch(
        r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", value.strip()
    ):
        num = float(value)
        return int(num) if num.is_integer() and "." not in value else num
    raise _TypeError(f"type check ('number') failed - got '{value}'")


def _to_boolean(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise _TypeError(f"type check ('boolean') failed - got '{value}'")


def _to_array(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _to_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _TypeError(f"type check ('object') failed - got '{value}'")


_COERCE: dict[str, Callable[[Any], Any]] = {
    "integer": _to_integer,
    "number": _to_number,
    "boolean": _to_boolean,
    "array": _to_array,
    "object": _to_object,
}


def _ref(value: Any) -> str:
    return "ARRAY" if isinstance(value, list) else "HASH"


# --------------------------------------------------------------------------- values


def check_value(schema: dict[str, Any], raw: Any, name: str) -> tuple[Any, str | None]:
    """Coerce and check one value against its parameter schema.

    Returns ``(value, None)`` or ``(None, error message)``.
    """
    if "alias" in schema and "type" not in schema:
        return raw, None
    type_ = schema.get("type")
    if type_ is None and isinstance(schema.get("format"), dict):
        type_ = "string"
    try:
        value = coerce(raw, type_)
    except _TypeError as exc:
        return None, str(exc)
    if type_ == "array":
        return _check_items(schema.get("items") or {}, value, name)
    err = (
        _format_error(schema.get("format"), value, name)
        or _string_error(schema, value)
        or _number_error(schema, value, type_)
        or _enum_error(schema, value)
    )
    if err:
        return None, err
    return value, None


def _check_items(items: dict[str, Any], value: list[Any], name: str) -> tuple[Any, str | None]:
    out = []
    for item in value:
        checked, err = check_value(items, item, name)
        if err:
            return None, err
        out.append(checked)
    return out, None


def _format_error(fmt: Any, value: Any, name: str) -> str | None:
    """A ``format`` (property string or named format) the value does not meet."""
    if fmt is None or isinstance(value, (list, dict)):
        return None
    text = str(value)
    if isinstance(fmt, dict):
        return check_property_string(fmt, text, name)
    if fmt in NAMED_PROPERTY_STRINGS:
        return check_property_string(NAMED_PROPERTY_STRINGS[fmt], text, name)
    if fmt in NAMED:
        err = NAMED[fmt](text)
        if err:
            return f"invalid format - {err}\n"
    return None


def _string_error(schema: dict[str, Any], value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    if "maxLength" in schema and len(value) > int(schema["maxLength"]):
        return f"value may only be {schema['maxLength']} characters long"
    if "minLength" in schema and len(value) < int(schema["minLength"]):
        return f"value must be at least {schema['minLength']} characters long"
    if "pattern" in schema:
        regex = compile_pattern(schema["pattern"])
        if regex is not None and not regex.match(value):
            return "value does not match the regex pattern"
    return None


def _number_error(schema: dict[str, Any], value: Any, type_: str | None) -> str | None:
    if type_ not in ("integer", "number"):
        return None
    if "minimum" in schema and value < float(schema["minimum"]):
        return f"value must have a minimum value of {schema['minimum']}"
    if "maximum" in schema and value > float(schema["maximum"]):
        return f"value must have a maximum value of {schema['maximum']}"
    return None


def _enum_error(schema: dict[str, Any], value: Any) -> str | None:
    if "enum" in schema and str(value) not in map(str, schema["enum"]):
        return (
            f"value '{value}' does not have a value in the enumeration "
            f"'{', '.join(map(str, schema['enum']))}'"
        )
    return None


def split_property_string(text: str) -> list[str]:
    """Split ``a=1,b="x,y"`` on commas outside double quotes."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            continue
        if ch == "," and not quoted:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return [p for p in parts if p != ""]


def parse_property_string(
    fmt: dict[str, Any], text: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Parse a property string into ``(values, errors)`` following ``fmt``."""
    default_key = next((k for k, v in fmt.items() if v.get("default_key")), None)
    values: dict[str, str] = {}
    errors: dict[str, str] = {}
    for part in split_property_string(text):
        key, sep, val = part.partition("=")
        if not sep:
            if default_key is None:
                errors[part] = "value without key, but schema does not define a default key"
                continue
            if default_key in values:
                errors[default_key] = "duplicate key in comma-separated list property"
                continue
            values[default_key] = part
            continue
        if key in values:
            errors[key] = "duplicate key in comma-separated list property"
            continue
        values[key] = val
    return values, errors


def check_property_string(fmt: dict[str, Any], text: str, name: str) -> str | None:
    """Validate a property string; PVE's ``format error`` message or None."""
    values, errors = parse_property_string(fmt, text)
    for key, val in values.items():
        if key in errors:
            continue
        schema = fmt.get(key)
        if schema is None:
            errors[key] = NOT_DEFINED
            continue
        if "alias" in schema:
            if "keyAlias" in schema:
                target = fmt.get(schema["keyAlias"], {})
                if target and "enum" in target and key not in target["enum"]:
                    errors[key] = f"value '{key}' does not have a value in the enumeration"
            schema = fmt.get(schema["alias"], {})
        _, err = check_value(schema, val, f"{name}.{key}")
        if err:
            errors[key] = err.rstrip("\n")
    for key, schema in fmt.items():
        if "alias" in schema or schema.get("optional"):
            continue
        aliases = [k for k, s in fmt.items() if s.get("keyAlias") == key]
        if key not in values and not any(a in values for a in aliases):
            errors.setdefault(key, MISSING)
    if not errors:
        return None
    lines = "".join(f"{name}.{k}: {v}\n" for k, v in sorted(errors.items()))
    return f"invalid format - format error\n{lines}\n"


# --------------------------------------------------------------------------- params


def _family_schema(
    props: dict[str, Any], name: str
) -> tuple[str, dict[str, Any]] | None:
    match = re.fullmatch(r"([a-z_-]+?)(\d+)", name)
    if not match:
        return None
    family, index = match.group(1), int(match.group(2))
    schema = props.get(f"{family}[n]")
    if schema is None:
        return None
    if index >= FAMILY_CAPS.get(family, 256):
        return None
    return f"{family}[n]", schema


def validate_params(
    parameters: dict[str, Any], raw: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Check request parameters against an endpoint's ``parameters`` schema.

    Returns ``(values, errors)``: coerced values, and ``{param: message}`` in
    PVE's wording (empty when the request is valid).
    """
    props: dict[str, Any] = parameters.get("properties") or {}
    additional = parameters.get("additionalProperties", 1)
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, value in raw.items():
        schema = _param_schema(props, name)
        if schema is None:
            if not additional:
                errors[name] = NOT_DEFINED
            else:
                values[name] = value
            continue
        checked, err = _check_param(schema, value, name)
        if err:
            errors[name] = err
        else:
            values[name] = checked
    _add_missing(props, raw, values, errors)
    return values, errors


def _param_schema(props: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A parameter's schema, a numbered one (``net0``) taken from its family (``net[n]``)."""
    schema = props.get(name)
    if schema is None or name.endswith("[n]"):
        family = _family_schema(props, name)
        schema = family[1] if family else None
    return schema


def _check_param(schema: dict[str, Any], value: Any, name: str) -> tuple[Any, str | None]:
    if isinstance(value, list) and schema.get("type") != "array":
        if len(value) != 1:
            return None, f"type check ('{schema.get('type', 'string')}') failed - got ARRAY"
        value = value[0]
    if "oneOf" in schema:
        return value, None
    return check_value(schema, value, name)


def _add_missing(
    props: dict[str, Any], raw: dict[str, Any], values: dict[str, Any], errors: dict[str, str]
) -> None:
    """Errors for required parameters not given and for ``requires`` not met."""
    for name, schema in props.items():
        if name.endswith("[n]") or schema.get("optional") or "oneOf" in schema:
            continue
        if name not in raw:
            errors.setdefault(name, MISSING)
    for name, schema in props.items():
        required = schema.get("requires")
        if isinstance(required, str) and name in values and required not in raw:
            errors.setdefault(required, f"missing property - '{name}' requires this property")


# --------------------------------------------------------------------------- paths


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: tuple[str, _Node] | None = None
    template: str | None = None


class ApiSchema:
    """Path matching and endpoint lookup over the structure's ``paths``."""

    def __init__(self, structure: dict[str, Any] | None = None) -> None:
        self.structure = structure if structure is not None else load_structure()
        self.paths: dict[str, dict[str, Any]] = self.structure["paths"]
        self._root = _Node()
        for template in self.paths:
            node = self._root
            for seg in template.strip("/").split("/"):
                if seg.startswith("{") and seg.endswith("}"):
                    if node.param is None:
                        node.param = (seg[1:-1], _Node())
                    node = node.param[1]
                else:
                    node = node.literal.setdefault(seg, _Node())
            node.template = template
        self._root.template = "/" if "/" in self.paths else None

    def match(self, segments: list[str]) -> tuple[str, dict[str, str]] | None:
        """Match decoded path segments; ``(template, path_params)`` or None."""
        return self._match(self._root, segments, {})

    def _match(
        self, node: _Node, segs: list[str], params: dict[str, str]
    ) -> tuple[str, dict[str, str]] | None:
        if not segs:
            return (node.template, params) if node.template else None
        head, rest = segs[0], segs[1:]
        child = node.literal.get(head)
        if child is not None:
            found = self._match(child, rest, params)
            if found:
                return found
        if node.param is not None and head != "":
            name, sub = node.param
            found = self._match(sub, rest, {**params, name: head})
            if found:
                return found
            # An unencoded volume ID (``local:backup/vzdump-...``) spans segments.
            if name in GREEDY_PARAMS and rest and sub.template:
                return sub.template, {**params, name: "/".join(segs)}
        return None

    def endpoint(self, template: str, method: str) -> dict[str, Any] | None:
        return self.paths.get(template, {}).get(method)


# --------------------------------------------------------------------------- returns


def check_returns(schema: dict[str, Any], value: Any, where: str = "data") -> list[str]:
    """Problems of ``value`` against a ``returns`` schema (empty list: conforms)."""
    type_ = schema.get("type")
    if value is None:
        if type_ in (None, "null") or schema.get("optional"):
            return []
        return [f"{where}: null but type {type_}"]
    if type_ is None and "properties" in schema:
        type_ = "object"
    accepts = _RETURN_TYPES.get(type_ or "")
    if accepts is not None and not accepts(value):
        return [f"{where}: expected {type_}, got {value!r}"]
    problems = _constraint_problems(schema, value, where, type_)
    if type_ == "array":
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                problems += check_returns(items, item, f"{where}[{i}]")
    if type_ == "object":
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                problems += check_returns(sub, value[name], f"{where}.{name}")
            elif not sub.get("optional"):
                problems.append(f"{where}.{name}: missing")
    return problems


_RETURN_TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: False,
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: v in (0, 1, True, False),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _constraint_problems(
    schema: dict[str, Any], value: Any, where: str, type_: str | None
) -> list[str]:
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if type_ in ("integer", "number"):
        if "minimum" in schema and value < float(schema["minimum"]):
            problems.append(f"{where}: {value} below minimum {schema['minimum']}")
        if "maximum" in schema and value > float(schema["maximum"]):
            problems.append(f"{where}: {value} above maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema:
        regex = compile_pattern(schema["pattern"])
        if regex is not None and not regex.match(value):
            problems.append(f"{where}: {value!r} does not match {schema['pattern']}")
    return problems
