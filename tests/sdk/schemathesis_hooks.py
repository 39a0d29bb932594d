"""schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): what a JSON Schema cannot
say about a valid chat body, made true of every *positive* case before it is sent, so that
"valid data is accepted" tests the door and not the generator's luck:

- a named tool_choice names one of the tools;
- a tool result answers a call of an earlier assistant turn;
- an assistant's tool-call arguments are a JSON object as text;
- a request that forces a tool call or asks for strict tools goes to a model whose upstream
  can honour it (Gemini): which upstream serves a model is configuration, not schema, and
  Ollama's 400 for these is documented in the schema's description.

Negative cases are left alone: they must be refused as generated."""

import json

import schemathesis

GEMINI = "gemini-2.5-flash"


def is_gemini(model):
    lower = model.strip().lower() if isinstance(model, str) else ""
    return lower in ("online", "gemini", "fast") or lower.startswith("gemini-")


def is_json_object(text):
    if not text.strip():
        return True
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    path = context.operation.path if context.operation is not None else ""
    if path == "/v1/chat/completions":
        fix_openai(case.body)
    elif path == "/v1/messages":
        fix_anthropic(case.body)
    return case


def fix_openai(body):
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and tools:
        name = choice["function"]["name"]
        if all(t["function"]["name"] != name for t in tools):
            tools[0]["function"]["name"] = name
    messages = body.get("messages")
    if isinstance(messages, list):
        fixed, call_ids = [], set()
        for message in messages:
            if message.get("role") == "assistant":
                for call in message.get("tool_calls") or []:
                    if not is_json_object(call["function"]["arguments"]):
                        call["function"]["arguments"] = "{}"
                    call_ids.add(call["id"])
            if message.get("role") == "tool" and not message["tool_call_id"]:
                message["tool_call_id"] = "call_0"
            if message.get("role") == "tool" and message["tool_call_id"] not in call_ids:
                call_id = message["tool_call_id"]
                fixed.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
                call_ids.add(call_id)
            fixed.append(message)
        body["messages"] = fixed
    forced = choice == "required" or isinstance(choice, dict)
    strict = any(t["function"].get("strict") for t in tools)
    if tools and (forced or strict) and not is_gemini(body.get("model")):
        body["model"] = GEMINI


def fix_anthropic(body):
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and tools:
        if all(t["name"] != choice["name"] for t in tools):
            tools[0]["name"] = choice["name"]
    messages = body.get("messages")
    if isinstance(messages, list):
        fixed, call_ids = [], set()
        for message in messages:
            blocks = message.get("content") if isinstance(message.get("content"), list) else []
            if message.get("role") == "assistant":
                call_ids.update(b["id"] for b in blocks if b.get("type") == "tool_use")
            else:
                for block in blocks:
                    if block.get("type") == "tool_result" and not block["tool_use_id"]:
                        block["tool_use_id"] = "toolu_0"
                orphans = [b["tool_use_id"] for b in blocks
                           if b.get("type") == "tool_result" and b["tool_use_id"] not in call_ids]
                if orphans:
                    fixed.append({"role": "assistant", "content": [
                        {"type": "tool_use", "id": i, "name": "f", "input": {}} for i in orphans]})
                    call_ids.update(orphans)
            fixed.append(message)
        body["messages"] = fixed
    forced = isinstance(choice, dict) and choice.get("type") in ("any", "tool")
    if tools and forced and not is_gemini(body.get("model")):
        body["model"] = GEMINI
