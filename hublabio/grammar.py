"""JSON Schema → a llama.cpp grammar (GBNF), for structured output.

`json_grammar(schema)` returns a grammar whose every sentence is JSON that the schema accepts;
sampling under it (SamplingOptions.grammar) makes the model's answer such a sentence.
`json_grammar(None)` is any JSON object (OpenAI's `json_object`).

Supported, and enforced by the grammar: `type` (one or a list), `properties`, `required`,
`additionalProperties` (false, or a schema when there are no `properties`), `items`,
`prefixItems`, `minItems`/`maxItems`, `minLength`/`maxLength`, `enum`, `const`, `anyOf`,
`oneOf` (as anyOf), `$ref` into `$defs`/`definitions` (recursion too). Annotations that do not
constrain (`title`, `description`, `default`, `examples`, `$schema`, `$id`, `strict`) are
ignored. Anything else (`pattern`, `format`, `minimum`, `not`, `allOf`, ...) is a SchemaError
naming the keyword and where it is, never silently dropped. Properties come in the schema's
order. Whitespace between tokens is bounded, so a model cannot loop on blanks.
"""

from __future__ import annotations

import json
import re

from hublabio.errors import ProtocolError

MAX_SCHEMA_RULES = 1000

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "strict", "deprecated", "readOnly", "writeOnly"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "number": set(), "integer": set(), "boolean": set(), "null": set(),
}
_GENERAL = {"type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions"}

_PRIMITIVES = {
    "space": '| " " | "\\n" [ \\t]{0,20}',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" space',
    "integer": '("-"? ([0-9] | [1-9] [0-9]{0,15})) space',
    "number": '("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? '
              '([eE] [-+]? [0-9]{1,3})? space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? '
              '"}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
}
_DEPS = {"string": ("char", "space"), "integer": ("space",), "number": ("space",),
         "boolean": ("space",), "null": ("space",),
         "value": ("object", "array", "string", "number", "boolean", "null"),
         "object": ("space", "string", "value"), "array": ("space", "value")}


class SchemaError(ProtocolError):
    """A schema this converter cannot turn into a grammar; the message names what and where."""


def json_grammar(schema: dict | None) -> str:
    """The GBNF grammar for `schema` (None: any JSON object)."""
    conv = _Converter(schema if schema is not None else {"type": "object"})
    conv.rules["root"] = conv.visit(conv.root, "root", "schema")
    return _format(conv.rules)


def tool_call_grammar(tools: list[tuple[str, dict]], *, allow_answer: bool) -> str:
    """JSON that calls one of `tools` ((name, parameters schema) pairs):
    `{"tool_call": {"name": NAME, "arguments": {...}}}`, its arguments valid for that tool's
    schema; with `allow_answer`, also `{"response": "text"}` (answer without a tool)."""
    rules: dict[str, str] = {}
    calls = []
    for i, (name, params) in enumerate(tools):
        conv = _Converter(params, rules=rules, prefix=f"tool{i}-")
        args = conv.visit(params, f"tool{i}-args", f"tools[{i}].function.parameters")
        calls.append(f'"{{" space "\\"name\\"" space ":" space '
                     f'{literal(json.dumps(name, ensure_ascii=False))} space "," space '
                     f'"\\"arguments\\"" space ":" space {args} "}}" space')
    conv = _Converter({}, rules=rules)
    conv.primitive("space")
    call = conv.add("tool-call", " | ".join(calls))
    alts = [f'"{{" space "\\"tool_call\\"" space ":" space {call} "}}" space']
    if allow_answer:
        alts.append(f'"{{" space "\\"response\\"" space ":" space {conv.primitive("string")} '
                    '"}" space')
    rules["root"] = " | ".join(alts)
    return _format(rules)


def _format(rules: dict[str, str]) -> str:
    return "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    if c == "\t":
        return "\\t"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02X}"
    return c


class _Converter:
    def __init__(self, root, *, rules: dict[str, str] | None = None, prefix: str = ""):
        if not isinstance(root, dict):
            raise SchemaError(f"schema: must be an object, got {type(root).__name__}")
        self.root = root
        self.rules: dict[str, str] = {} if rules is None else rules  # shared between tools
        self.prefix = prefix  # of this schema's $ref rules (each tool has its own $defs)
        self.refs: dict[str, str] = {}  # "$ref" -> rule name

    def add(self, name: str, body: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        key, i = base, 1
        while key in self.rules and self.rules[key] != body:
            i += 1
            key = f"{base}-{i}"
        if len(self.rules) >= MAX_SCHEMA_RULES:
            raise SchemaError(f"schema: needs more than {MAX_SCHEMA_RULES} grammar rules")
        self.rules[key] = body
        return key

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _DEPS.get(name, ()):
                self.primitive(dep)
        return name

    def visit(self, s, name: str, where: str) -> str:
        """The grammar expression for schema `s` (found at `where`)."""
        if s is True or s == {}:
            return self.primitive("value")
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {s!r:.40}")
        self.check_keywords(s, where)
        if "$ref" in s:
            return self.ref(s["$ref"], where)
        if "const" in s:
            return self.constant(s["const"]) + " space"
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise SchemaError(f"{where}.enum: must be a non-empty array")
            return "(" + " | ".join(self.constant(v) for v in s["enum"]) + ") space"
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError(f"{where}.{key}: must be a non-empty array")
                return "(" + " | ".join(self.visit(a, f"{name}-{i}", f"{where}.{key}[{i}]")
                                        for i, a in enumerate(alts)) + ")"
        kind = s.get("type")
        if isinstance(kind, list):  # one branch per type, with the keywords that type takes
            return "(" + " | ".join(
                self.visit({**{k: v for k, v in s.items() if k in _BY_TYPE[t]}, "type": t},
                           f"{name}-{t}", where) for t in kind) + ")"
        if kind is None:
            return self.primitive("value")
        if kind == "object":
            return self.object(s, name, where)
        if kind == "array":
            return self.array(s, name, where)
        if kind == "string" and ("minLength" in s or "maxLength" in s):
            lo, hi = self.bounds(s, "minLength", "maxLength", where)
            self.primitive("char")
            self.primitive("space")
            return '"\\"" ' + self.repeat("char", lo, hi) + ' "\\"" space'
        return self.primitive(kind)

    def check_keywords(self, s: dict, where: str) -> None:
        kind = s.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        for k in kinds:
            if k not in _BY_TYPE:
                raise SchemaError(f"{where}.type: unknown type {k!r}")
        allowed = _ANNOTATIONS | _GENERAL
        for k in kinds or _BY_TYPE:
            allowed |= _BY_TYPE[k]
        for key in s:
            if key not in allowed:
                raise SchemaError(f"{where}: the keyword {key!r} is not supported in structured "
                                  "output (supported: type, properties, required, "
                                  "additionalProperties, items, prefixItems, minItems, maxItems, "
                                  "minLength, maxLength, enum, const, anyOf, oneOf, $ref)")

    def ref(self, ref, where: str) -> str:
        if not isinstance(ref, str):
            raise SchemaError(f"{where}.$ref: must be a string")
        if ref in self.refs:
            return self.refs[ref]
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref)
        target = (self.root.get(m.group(1)) or {}).get(m.group(2)) if m else None
        if target is None:
            raise SchemaError(f"{where}.$ref: {ref!r} is not a definition in this schema "
                              "(#/$defs/NAME or #/definitions/NAME)")
        name = self.add(f"{self.prefix}ref-{m.group(2)}", "")  # reserve it first: recursion
        self.refs[ref] = name
        self.rules[name] = self.visit(target, name, ref)
        return name

    def constant(self, value) -> str:
        return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def object(self, s: dict, name: str, where: str) -> str:
        props = s.get("properties", {})
        extra = s.get("additionalProperties", False if props else True)
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties: must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise SchemaError(f"{where}.required: names a property that properties does not "
                              f"define: {[r for r in required if r not in props] or required}")
        if not props:
            if extra is False:
                return '"{" space "}" space'
            if extra is True or extra == {}:
                return self.primitive("object")
            value = self.visit(extra, f"{name}-value", f"{where}.additionalProperties")
            self.primitive("string")
            return self.add(f"{name}-map", f'"{{" space ( string ":" space {value} '
                                            f'("," space string ":" space {value})* )? "}}" space')
        if extra not in (True, False):
            raise SchemaError(f"{where}.additionalProperties: a schema together with "
                              "properties is not supported (use false)")
        self.primitive("space")
        kv = {k: self.add(f"{name}-{k}-kv", literal(json.dumps(k, ensure_ascii=False))
                          + ' space ":" space '
                          + self.visit(v, f"{name}-{k}", f"{where}.properties.{k}"))
              for k, v in props.items()}
        req = [kv[k] for k in props if k in required]
        opt = [kv[k] for k in props if k not in required]
        tail = None  # any ordered subset of the optional properties, at least one
        for i in range(len(opt) - 1, -1, -1):
            body = opt[i] if tail is None else f'{opt[i]} ("," space {tail})? | {tail}'
            tail = self.add(f"{name}-opt-{i}", body)
        if req:
            inner = ' "," space '.join(req) + (f' ("," space {tail})?' if tail else "")
        else:
            inner = f"{tail}?"
        return self.add(f"{name}-obj", f'"{{" space {inner} "}}" space')

    def array(self, s: dict, name: str, where: str) -> str:
        self.primitive("space")
        if "prefixItems" in s:
            items = s["prefixItems"]
            if not isinstance(items, list) or "items" in s and s["items"] is not False:
                raise SchemaError(f"{where}.prefixItems: must be an array, with items false or "
                                  "absent")
            parts = [self.visit(it, f"{name}-{i}", f"{where}.prefixItems[{i}]")
                     for i, it in enumerate(items)]
            return '"[" space ' + ' "," space '.join(parts) + ' "]" space'
        item = self.visit(s.get("items", True), f"{name}-item", f"{where}.items")
        lo, hi = self.bounds(s, "minItems", "maxItems", where)
        if hi == 0:
            return '"[" space "]" space'
        more = self.repeat(f'("," space {item})', max(lo - 1, 0),
                           None if hi is None else hi - 1)
        seq = f"{item} {more}"
        return self.add(f"{name}-arr", f'"[" space {seq if lo else f"({seq})?"} "]" space')

    @staticmethod
    def bounds(s: dict, lo_key: str, hi_key: str, where: str) -> tuple[int, int | None]:
        lo, hi = s.get(lo_key, 0), s.get(hi_key)
        for key, v in ((lo_key, lo), (hi_key, hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  or v > 10_000):
                raise SchemaError(f"{where}.{key}: must be an integer in [0, 10000]")
        if hi is not None and hi < lo:
            raise SchemaError(f"{where}: {hi_key} is below {lo_key}")
        return lo, hi

    @staticmethod
    def repeat(item: str, lo: int, hi: int | None) -> str:
        if hi is None:
            return f"{item}{{{lo},}}" if lo else f"{item}*"
        return f"{item}{{{lo},{hi}}}"
