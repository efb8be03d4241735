"""`schema=`: a pydantic model or a JSON-schema dict, turned once into the strict JSON schema that
providers' structured-output modes take, and every answer checked against it.

Strict means what OpenAI's strict mode and Anthropic's structured outputs need: every property required,
`additionalProperties: false` on every object, `$ref`s only to the schema's own `$defs`, an object at the
root. A pydantic model's answers are validated by the model itself (so `.parsed` is an instance, with its
validators run); a dict schema's by the small validator here, which knows the keywords strict schemas use
and refuses the others up front (a ConfigError before any call, never a check silently skipped).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

# Keywords a dict schema may use: the ones the validator below checks, and annotations it may ignore.
_CHECKED = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "oneOf",
    "allOf", "$ref", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minLength", "maxLength", "pattern", "minItems", "maxItems",
}  # fmt: skip
_ANNOTATIONS = {
    "title", "description", "default", "examples", "format", "$defs", "$schema", "$id", "discriminator",
}  # fmt: skip
_DROPPED = ("default", "discriminator")  # meaningless once every field is required; strict modes refuse them
_NAME = re.compile(r"[^a-zA-Z0-9_-]")


class Invalid(ValueError):
    """An answer that does not match its schema; `errors` are readable lines ("bullets.1: ...")."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, eq=False)
class Schema:
    """A `schema=` argument, compiled: the strict JSON schema, a name for it, and how to validate."""

    json: dict[str, Any]  # the strict JSON schema sent to providers (and hashed into the round key)
    name: str  # ^[a-zA-Z0-9_-]{1,64}$, as OpenAI's json_schema.name wants
    model: type | None  # the pydantic model; None for a dict schema

    def validate(self, text: str) -> Any:
        """The validated answer (a model instance, or the dict); Invalid with its errors otherwise."""
        text = _unfenced(text)
        if self.model is not None:
            import pydantic

            try:
                return self.model.model_validate_json(text)
            except pydantic.ValidationError as e:
                raise Invalid([_pydantic_error(err) for err in e.errors()]) from None
        try:
            value = json.loads(text)
        except ValueError as e:
            raise Invalid([f"the answer is not valid JSON: {e}"]) from None
        errors: list[str] = []
        _check(value, self.json, self.json, "", errors)
        if errors:
            raise Invalid(errors)
        return value


def compile_schema(schema: Any) -> Schema:
    """The Schema for a pydantic v2 model class or a JSON-schema dict; ConfigError for anything else."""
    if isinstance(schema, type):
        import pydantic

        if issubclass(schema, pydantic.BaseModel):
            return _from_model(schema)
    if isinstance(schema, Mapping):
        try:
            key = json.dumps(schema, allow_nan=False)  # key order kept: it is the order of the answer
        except (TypeError, ValueError) as e:
            raise ConfigError(f"schema: a JSON-schema dict must be plain JSON ({e})") from None
        return _from_dict(key)
    what = f"an instance of {type(schema).__name__}" if not isinstance(schema, type) else repr(schema)
    raise ConfigError(f"schema must be a pydantic model class or a JSON-schema dict, not {what}")


@functools.lru_cache(maxsize=256)
def _from_model(model: type) -> Schema:
    import pydantic

    try:
        raw = model.model_json_schema()
    except (pydantic.PydanticUserError, pydantic.errors.PydanticInvalidForJsonSchema) as e:
        raise ConfigError(f"schema {model.__name__}: pydantic cannot make it a JSON schema ({e})") from None
    return Schema(_strict_root(raw, model.__name__), _name(model.__name__), model)


@functools.lru_cache(maxsize=256)
def _from_dict(key: str) -> Schema:
    raw = json.loads(key)
    name = str(raw.get("title") or "response")
    for path, node in nodes(raw, name):
        unknown = sorted(set(node) - _CHECKED - _ANNOTATIONS)
        if unknown:
            raise ConfigError(
                f"schema field {path!r}: {unknown[0]!r} is not a keyword pocketbatch can check in a dict "
                "schema; remove it or pass a pydantic model instead"
            )
    return Schema(_strict_root(raw, name), _name(name), None)


def _name(title: str) -> str:
    return _NAME.sub("_", title)[:64] or "response"


def _strict_root(raw: dict, name: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError("schema must be a JSON object")
    defs = raw.get("$defs", {})
    if not isinstance(defs, dict):
        raise ConfigError("schema: $defs must be an object of named schemas")
    root = {k: v for k, v in raw.items() if k not in ("$defs", "$schema")}
    if "$ref" in root:  # a self-referencing pydantic model: its root is a $ref to its own definition
        root = {**_resolve(raw, root["$ref"], name), **{k: v for k, v in root.items() if k != "$ref"}}
    strict = _strict(root, name, raw)
    if strict.get("type") != "object":
        raise ConfigError(
            f"schema {name}: the root must be an object (providers' structured output needs one); "
            "wrap other values in a model with one field"
        )
    if defs:
        strict["$defs"] = {def_name: _strict(d, def_name, raw) for def_name, d in defs.items()}
    return strict


def _strict(node: Any, path: str, root: dict) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"schema field {path!r}: a schema must be a JSON object, not {node!r}")
    out = {k: v for k, v in node.items() if k not in _DROPPED}
    if "$ref" in out:
        _resolve(root, out["$ref"], path)  # a dangling or external $ref fails now, not at the provider
        others = set(out) - {"$ref", "title", "description"}
        if others:
            raise ConfigError(f"schema field {path!r}: $ref next to {sorted(others)[0]!r} is not supported")
        return {"$ref": out["$ref"]}  # strict modes refuse siblings; the definition keeps its own docs
    if "oneOf" in out:  # pydantic's discriminated unions; strict modes take anyOf (the model still decides)
        out["anyOf"] = out.pop("oneOf")
    for key in ("anyOf", "allOf"):
        if key in out:
            if not isinstance(out[key], list) or not out[key]:
                raise ConfigError(f"schema field {path!r}: {key} must be a non-empty list")
            out[key] = [_strict(v, path, root) for v in out[key]]
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if "object" in types or "properties" in out:
        props = out.get("properties", {})
        extra = out.get("additionalProperties", None if not props else False)
        if extra is not False:
            raise ConfigError(
                f"schema field {path!r}: an object with free-form keys (dict[str, ...], or "
                "additionalProperties) cannot be a strict schema; give it named fields (a model), or use a "
                "list of key/value objects"
            )
        out["properties"] = {k: _strict(v, _join(path, k), root) for k, v in props.items()}
        out["required"] = list(props)  # strict: every field answered (optional ones may be null)
        out["additionalProperties"] = False
    if "items" in out:
        out["items"] = _strict(out["items"], f"{path}[]", root)
    if "prefixItems" in out:
        out["prefixItems"] = [_strict(v, f"{path}[{i}]", root) for i, v in enumerate(out["prefixItems"])]
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _resolve(root: dict, ref: Any, path: str) -> dict:
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        raise ConfigError(f"schema field {path!r}: only $refs to the schema's own $defs work, not {ref!r}")
    target = root.get("$defs", {}).get(ref[len("#/$defs/") :])
    if not isinstance(target, dict):
        raise ConfigError(f"schema field {path!r}: $ref {ref!r} names no definition in $defs")
    return target


def nodes(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every (field path, schema node) of a schema, definitions included: for providers' checks."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from nodes(sub, _join(path, name))
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key) or []:
            yield from nodes(sub, path)
    for name, sub in (schema.get("$defs") or {}).items():
        yield from nodes(sub, name)


def refuse(
    schema: dict,
    provider: str,
    keywords: Mapping[str, str],
    rule: Callable[[dict], str | None] | None = None,
) -> None:
    """ConfigError naming the first field that uses a keyword the provider refuses (keyword -> why), or
    that `rule(node)` objects to; for Provider.check_schema."""
    root = str(schema.get("title") or "response")  # the model's name, as compile_schema's errors say
    for path, node in nodes(schema, root):
        why = next((f"{k!r} ({reason})" for k, reason in keywords.items() if k in node), None)
        why = why or (rule(node) if rule else None)
        if why:
            raise ConfigError(f"{provider} cannot take this schema: field {path!r} uses {why}")


def is_recursive(schema: dict) -> bool:
    """True when a definition refers back to itself, directly or through others."""
    defs = schema.get("$defs") or {}
    refs = {name: _refs(d) for name, d in defs.items()}

    def reaches(start: str, seen: set[str]) -> bool:
        for ref in refs.get(start, ()):
            if ref == start or ref in seen:
                return True
            if reaches(ref, seen | {ref}):
                return True
        return False

    return any(reaches(name, {name}) for name in defs)


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"][len("#/$defs/") :]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for k, v in node.items() if k != "$defs"))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


# --- checking an answer ------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n```\s*$", re.S)


def _unfenced(text: str) -> str:
    # Providers without structured output (the prompt fallback) often wrap JSON in a Markdown fence.
    text = text.strip()
    m = _FENCE.match(text)
    return m.group(1) if m else text


def _pydantic_error(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in err.get("loc", ()))
    return f"{loc or '(root)'}: {err.get('msg', 'invalid')}"


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _type_name(value: Any) -> str:
    return next((t for t in ("null", "boolean", "integer", "number", "string", "array", "object")
                 if _JSON_TYPES[t](value)), type(value).__name__)  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (_type_name(a) == _type_name(b) == "number" and a == b)


def _check(value: Any, node: dict, root: dict, path: str, errors: list[str]) -> None:
    where = path or "(root)"
    if "$ref" in node:
        node = _resolve(root, node["$ref"], path)
    if "const" in node and not _same(value, node["const"]):
        errors.append(f"{where}: must be {node['const']!r}")
        return
    if "enum" in node and not any(_same(value, option) for option in node["enum"]):
        errors.append(f"{where}: must be one of {node['enum']!r}")
        return
    if "anyOf" in node or "oneOf" in node:
        variants = node.get("anyOf") or node.get("oneOf")
        if not any(not _errors_of(value, v, root, path) for v in variants):
            errors.append(f"{where}: matches none of the allowed shapes")
            return
    for sub in node.get("allOf", ()):
        _check(value, sub, root, path, errors)
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_JSON_TYPES.get(k, lambda v: False)(value) for k in kinds):
            errors.append(f"{where}: expected {' or '.join(kinds)}, got {_type_name(value)}")
            return
    if isinstance(value, dict):
        props = node.get("properties", {})
        for name in node.get("required", ()):
            if name not in value:
                errors.append(f"{_join(path, name)}: field required")
        extra = node.get("additionalProperties", True)
        for name, sub in value.items():
            if name in props:
                _check(sub, props[name], root, _join(path, name), errors)
            elif extra is False:
                errors.append(f"{where}: unexpected field {name!r}")
            elif isinstance(extra, dict):
                _check(sub, extra, root, _join(path, name), errors)
    elif isinstance(value, list):
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(f"{where}: needs at least {node['minItems']} items, has {len(value)}")
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(f"{where}: takes at most {node['maxItems']} items, has {len(value)}")
        if isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                _check(item, node["items"], root, f"{path}.{i}" if path else str(i), errors)
    elif isinstance(value, str):
        if "minLength" in node and len(value) < node["minLength"]:
            errors.append(f"{where}: needs at least {node['minLength']} characters")
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(f"{where}: takes at most {node['maxLength']} characters")
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(f"{where}: does not match the pattern {node['pattern']!r}")
    elif _JSON_TYPES["number"](value):
        bounds = (
            ("minimum", lambda b: value >= b, "≥"),
            ("maximum", lambda b: value <= b, "≤"),
            ("exclusiveMinimum", lambda b: value > b, ">"),
            ("exclusiveMaximum", lambda b: value < b, "<"),
        )
        for key, ok, sign in bounds:
            if key in node and not ok(node[key]):
                errors.append(f"{where}: must be {sign} {node[key]}")
        if node.get("multipleOf") and (value / node["multipleOf"]) % 1:
            errors.append(f"{where}: must be a multiple of {node['multipleOf']}")


def _errors_of(value: Any, node: dict, root: dict, path: str) -> list[str]:
    errors: list[str] = []
    _check(value, node, root, path, errors)
    return errors


# --- a deterministic answer, for the offline provider and the emulators ---------------------------------

_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "12:00:00",
    "duration": "P1D",
    "email": "someone@example.com",
    "hostname": "example.com",
    "uri": "https://example.com/",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


def example(schema: dict, seed: str = "") -> Any:
    """A value matching a strict schema, the same for the same (schema, seed): strings tell their field
    and a digest of the seed apart, lists have two items. Patterns are not followed."""
    return _example(schema, schema, seed, "", 0)


def _example(node: dict, root: dict, seed: str, path: str, depth: int) -> Any:
    if "$ref" in node:
        node = _resolve(root, node["$ref"], path)
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return node["enum"][0]
    variants = node.get("anyOf") or node.get("oneOf")
    if variants:  # the first that is not null, unless recursion has gone deep enough to stop at null
        usable = [v for v in variants if v.get("type") != "null"] or variants
        pick = variants[0] if depth > 3 and len(usable) < len(variants) else usable[0]
        return _example(pick, root, seed, path, depth + 1)
    kind = node.get("type")
    kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
    digest = hashlib.sha256(f"{seed}\0{path}".encode()).hexdigest()[:6]
    if kind == "object" or "properties" in node:
        return {
            name: _example(sub, root, seed, _join(path, name), depth + 1)
            for name, sub in node.get("properties", {}).items()
        }
    if kind == "array":
        n = max(node.get("minItems", 0), min(2, node.get("maxItems", 2)))
        if depth > 3:  # a recursive schema ends somewhere
            n = node.get("minItems", 0)
        items = node.get("items") or {"type": "string"}
        return [_example(items, root, seed, f"{path}.{i}", depth + 1) for i in range(n)]
    if kind == "string":
        if node.get("format") == "uuid":
            return str(_uuid(digest))
        label = next((p for p in reversed(path.split(".")) if p and not p.isdigit()), "text")
        text = _FORMATS.get(node.get("format", ""), f"{label} {digest}")
        low, high = node.get("minLength", 0), node.get("maxLength")
        text = text.ljust(low, "x")
        return text[:high] if high is not None else text
    if kind in ("integer", "number"):
        low = node["minimum"] if "minimum" in node else node.get("exclusiveMinimum", -1) + 1
        high = node["maximum"] if "maximum" in node else node.get("exclusiveMaximum", low + 11) - 1
        low = min(low, high)
        step = node.get("multipleOf")
        if step:  # the first multiple of step from low
            first = step * math.ceil(low / step)
            return int(first) if kind == "integer" else first
        value = math.ceil(low) + int(digest, 16) % max(1, math.floor(high) - math.ceil(low) + 1)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return int(digest, 16) % 2 == 0
    return None


def _uuid(digest: str) -> str:
    import uuid

    return str(uuid.UUID(hashlib.md5(digest.encode()).hexdigest()))  # an id, not security
