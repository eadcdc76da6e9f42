"""OpenAI tool calling for the HTTP API, on models whose chat template knows no tools.

The small GGUFs this project runs (SmolLM2, Gemma 3 270M) have chat templates without a tool
syntax, so tools use a documented grammar-based format instead:
- a system message lists the tools (name, description, parameters schema) and asks for JSON;
- sampling runs under hublabio.grammar.tool_call_grammar: the answer is either
  `{"tool_call": {"name": NAME, "arguments": {...}}}`, its arguments valid for that tool's
  parameters schema, or, when the model may answer without a tool (`tool_choice` "auto"),
  `{"response": "text"}`;
- the JSON comes back in OpenAI's shape: `message.tool_calls` (one call per turn) with
  finish_reason "tool_calls", or `message.content`.
Earlier turns travel as the template can carry them: an assistant's tool call as that JSON, a
`role: "tool"` result as a user turn naming the call. `tool_choice`: "auto" (default), "none"
(no tool, plain answer), "required" (a call), or {"type": "function", "function": {"name"}}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hublabio.grammar import SchemaError, tool_call_grammar

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class ToolsError(ValueError):
    """A tools field that cannot be used; `param` names it (the HTTP layer makes it a 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[Tool, ...]
    choice: str            # "auto" | "required" | a tool's name (forced)

    def grammar(self) -> str:
        chosen = [t for t in self.tools if self.choice in ("auto", "required")
                  or t.name == self.choice]
        try:
            return tool_call_grammar([(t.name, t.parameters) for t in chosen],
                                     allow_answer=self.choice == "auto")
        except SchemaError as exc:
            raise ToolsError(str(exc), "tools") from None

    def system_text(self) -> str:
        first = self.tools[0].name if self.choice in ("auto", "required") else self.choice
        lines = ["You have these tools:"]
        for t in self.tools:
            lines.append(f"- {t.name}: {t.description or '(no description)'} Its arguments "
                         f"follow this JSON Schema: {json.dumps(t.parameters, ensure_ascii=False)}")
        lines.append("To use a tool, reply with only a JSON object naming it and giving its "
                     f'arguments, for example {{"tool_call": {{"name": "{first}", "arguments": '
                     "{...}}}.")
        if self.choice == "auto":
            lines.append("When the user's question needs a tool, call it. When it does not, "
                         'reply with {"response": ...} holding your answer to the user.')
        return "\n".join(lines)

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation with the tools' system text (after any system text of its own)."""
        if messages and messages[0]["role"] == "system":
            head = {"role": "system",
                    "content": messages[0]["content"] + "\n\n" + self.system_text()}
            return [head, *messages[1:]]
        return [{"role": "system", "content": self.system_text()}, *messages]

    def answer(self, text: str, finish_reason: str, call_id: str) -> dict:
        """OpenAI's message (content or tool_calls) and finish_reason for the model's JSON."""
        try:
            obj = json.loads(text)
        except ValueError:  # cut short by max_tokens: what there is, as text
            return {"message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason}
        call = obj.get("tool_call") if isinstance(obj, dict) else None
        if isinstance(call, dict):
            return {"message": {"role": "assistant", "content": None, "tool_calls": [{
                        "id": call_id, "type": "function", "function": {
                            "name": call["name"],
                            "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]},
                    "finish_reason": "tool_calls"}
        return {"message": {"role": "assistant", "content": obj.get("response", text)},
                "finish_reason": finish_reason}


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's tools and tool_choice as a plan (None: answer without tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise ToolsError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolsError("tools must be a non-empty array", "tools")
    parsed = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ToolsError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                             "{...}}", f"tools[{i}]")
        name, params = fn.get("name"), fn.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolsError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -",
                             f"tools[{i}].function.name")
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolsError(f"tools[{i}].function.parameters must be an object schema",
                             f"tools[{i}].function.parameters")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ToolsError(f"tools[{i}].function.description must be a string",
                             f"tools[{i}].function.description")
        parsed.append(Tool(name, desc, params or {"type": "object"}))
    if len({t.name for t in parsed}) != len(parsed):
        raise ToolsError("tools: two tools have the same name", "tools")
    if choice in (None, "auto"):
        kind = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        kind = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("function"), dict):
        kind = choice["function"].get("name")
        if kind not in {t.name for t in parsed}:
            raise ToolsError(f"tool_choice names {kind!r}, which is not in tools", "tool_choice")
    else:
        raise ToolsError('tool_choice must be "auto", "none", "required" or {"type": '
                         '"function", "function": {"name": ...}}', "tool_choice")
    return ToolPlan(tuple(parsed), kind)


def template_messages(messages: list) -> list[dict]:
    """OpenAI messages with tool calls and tool results, as a template without tools can take
    them (see the module doc)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Result of tool call {m['tool_call_id']}: "
                                                   f"{m['content']}"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            call = m["tool_calls"][0]["function"]
            try:
                args = json.loads(call["arguments"])
            except ValueError:
                args = call["arguments"]
            out.append({"role": "assistant", "content": json.dumps(
                {"tool_call": {"name": call["name"], "arguments": args}}, ensure_ascii=False)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
