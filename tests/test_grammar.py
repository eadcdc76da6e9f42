"""JSON Schema → GBNF (hublabio.grammar): the rules it writes, and every keyword it cannot
enforce refused by name. tests/integration/test_structured_output.py runs the grammars in
llama.cpp and validates what the model writes."""

from __future__ import annotations

import pytest

from hublabio.grammar import SchemaError, json_grammar, literal


def rules(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines())


def test_any_object_for_json_object():
    r = rules(json_grammar(None))
    assert r["root"] == "object" and "value" in r and "string" in r


def test_properties_in_order_with_optional_ones_as_a_subset():
    r = rules(json_grammar({"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"}},
        "required": ["a"]}))
    assert r["root-obj"] == '"{" space root-a-kv ("," space root-opt-0)? "}" space'
    assert r["root-opt-0"] == 'root-b-kv ("," space root-opt-1)? | root-opt-1'
    assert r["root-opt-1"] == "root-c-kv"
    assert r["root-a-kv"] == '"\\"a\\"" space ":" space string'


def test_enums_consts_bounds_and_refs():
    r = rules(json_grammar({
        "$defs": {"leaf": {"type": "string", "maxLength": 3}},
        "type": "object", "properties": {
            "k": {"enum": ["x", 1, None]}, "c": {"const": "q\"z"},
            "xs": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "minItems": 1,
                   "maxItems": 4},
            "n": {"type": ["integer", "null"]}},
        "required": ["k", "c", "xs", "n"]}))
    assert r["root-k-kv"].endswith('("\\"x\\"" | "1" | "null") space')
    assert r["root-c-kv"].endswith('"\\"q\\\\\\"z\\"" space')
    assert r["ref-leaf"] == '"\\"" char{0,3} "\\"" space'
    assert r["root-xs-arr"] == '"[" space ref-leaf ("," space ref-leaf){0,3} "]" space'
    assert r["root-n-kv"].endswith("(integer | null)")


def test_recursion_through_a_ref():
    r = rules(json_grammar({"$defs": {"node": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}))
    assert r["root"] == "ref-node" and "ref-node" in r["ref-node-kids-arr"]


@pytest.mark.parametrize("schema,fragment", [
    ({"type": "string", "pattern": "^a+$"}, "schema: the keyword 'pattern' is not supported"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
     "schema.properties.n: the keyword 'minimum'"),
    ({"type": "string", "format": "email"}, "the keyword 'format'"),
    ({"allOf": [{"type": "string"}]}, "the keyword 'allOf'"),
    ({"not": {"type": "string"}}, "the keyword 'not'"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required: names a"),
    ({"$ref": "#/$defs/missing"}, "'#/$defs/missing' is not a definition"),
    ({"type": "decimal"}, "unknown type 'decimal'"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1},
     "maxItems is below minItems"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
     "additionalProperties: a schema together with properties"),
    ([1, 2], "schema: must be an object")])
def test_what_cannot_be_enforced_is_refused_by_name(schema, fragment):
    with pytest.raises(SchemaError, match=None) as err:
        json_grammar(schema)
    assert fragment in str(err.value)
    assert err.value.code == "protocol"


def test_literals_escape_what_gbnf_needs():
    assert literal('a"b\\c\n\x01') == '"a\\"b\\\\c\\n\\x01"'
