"""The official `anthropic` package driving the gateway unchanged (base_url = gateway).

Run by tests/it/sdk.rs against a gateway in front of mock-llm; exits non-zero at the
first failed check. Environment: as for openai_sdk.py.
"""

import time

import anthropic

from gateway import BROKEN_MODEL, KEY, SLOW_KEY, URL, check, metric


def client(key=KEY, retries=0):
    return anthropic.Anthropic(api_key=key, base_url=URL, max_retries=retries)


# A whole message, with a system prompt and content blocks.
message = client().messages.create(
    model="llama3.1",
    max_tokens=64,
    system="be brief",
    messages=[{"role": "user", "content": [{"type": "text", "text": "hello claude sdk"}]}],
)
check(message.id.startswith("msg_"), "the id is a message id")
check(message.type == "message" and message.role == "assistant", "type and role")
check(message.content[0].type == "text" and message.content[0].text == "Echo: hello claude sdk", "the text block")
check(message.stop_reason == "end_turn", "stop_reason")
check(message.usage.input_tokens > 0 and message.usage.output_tokens > 0, "usage")

raw = client().messages.with_raw_response.create(
    model="llama3.1", max_tokens=64, messages=[{"role": "user", "content": "headers please"}]
)
check(raw.headers.get("x-cache") == "MISS", "X-Cache")
check(raw.headers.get("anthropic-ratelimit-requests-limit") is not None, "anthropic-ratelimit-requests-limit")
check(raw.headers.get("anthropic-ratelimit-requests-reset", "").endswith("Z"), "the reset is an RFC 3339 time")

# A stream through the SDK's helper, which reads every named event.
with client().messages.stream(
    model="llama3.1", max_tokens=64, messages=[{"role": "user", "content": "stream for claude"}]
) as stream:
    pieces = list(stream.text_stream)
    final = stream.get_final_message()
check("".join(pieces) == "Echo: stream for claude" and len(pieces) > 1, "text as it comes")
check(final.content[0].text == "Echo: stream for claude", "the final message")
check(final.stop_reason == "end_turn" and final.usage.output_tokens > 0, "stop_reason and usage at the end")

# The raw events, in Anthropic's order.
kinds = [
    event.type
    for event in client().messages.create(
        model="llama3.1", max_tokens=64, messages=[{"role": "user", "content": "raw events"}], stream=True
    )
]
check(kinds[0] == "message_start" and kinds[1] == "content_block_start", "the stream opens as Anthropic's")
check(kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], "and closes as Anthropic's")

# A hit replayed as a stream.
time.sleep(0.2)
with client().messages.stream(
    model="llama3.1", max_tokens=64, messages=[{"role": "user", "content": "stream for claude"}]
) as stream:
    check("".join(stream.text_stream) == "Echo: stream for claude", "a repeated stream is replayed")

# Tool use: the model's tool_use block, then a tool_result sent back with the SDK's own
# content blocks, whole and streamed through the SDK's helper (which parses the input JSON).
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
question = {"role": "user", "content": "weather in Rome?"}
used = client().messages.create(model="llama3.1", max_tokens=64, tools=TOOLS, messages=[question])
check(used.stop_reason == "tool_use", "stop_reason tool_use")
block = used.content[-1]
check(block.type == "tool_use" and block.name == "get_weather", "a tool_use block")
check(block.input == {"query": "weather in Rome?"}, "its input")
answered = client().messages.create(
    model="llama3.1",
    max_tokens=64,
    tools=TOOLS,
    messages=[
        question,
        {"role": "assistant", "content": used.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "25C"}]},
    ],
)
check(answered.content[0].text == "Tool get_weather said: 25C", "the tool_result reached the model")
with client().messages.stream(
    model="llama3.1", max_tokens=64, tools=TOOLS, messages=[{"role": "user", "content": "streamed rome?"}]
) as stream:
    final = stream.get_final_message()
check(final.stop_reason == "tool_use", "a streamed tool_use")
check(final.content[-1].type == "tool_use" and final.content[-1].input == {"query": "streamed rome?"},
      "its input, accumulated from input_json_delta")
try:
    client().messages.create(model="llama3.1", max_tokens=64, tools=TOOLS, messages=[question],
                             tool_choice={"type": "any"})
    check(False, "Ollama cannot force a call")
except anthropic.BadRequestError as error:
    check(error.status_code == 400 and "tool_choice" in error.message, "a forced call on Ollama names tool_choice")

# Errors as the SDK's own classes.
try:
    client(key="sk-wrong").messages.create(model="llama3.1", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    check(False, "a wrong key is refused")
except anthropic.AuthenticationError as error:
    check(error.status_code == 401, "AuthenticationError")
try:
    client().messages.create(model="llama3.1", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    check(False, "max_tokens 0 is refused")
except anthropic.BadRequestError as error:
    check("max_tokens" in error.message, "BadRequestError names max_tokens")

client(key=SLOW_KEY).messages.create(model="llama3.1", max_tokens=5, messages=[{"role": "user", "content": "first"}])
try:
    client(key=SLOW_KEY).messages.create(model="llama3.1", max_tokens=5, messages=[{"role": "user", "content": "second"}])
    check(False, "an empty bucket is refused")
except anthropic.RateLimitError as error:
    check(error.status_code == 429, "RateLimitError")
time.sleep(0.6)
client(key=SLOW_KEY).messages.create(model="llama3.1", max_tokens=5, messages=[{"role": "user", "content": "refill"}])
waited = client(key=SLOW_KEY, retries=3).messages.create(
    model="llama3.1", max_tokens=5, messages=[{"role": "user", "content": "after a wait"}]
)
check(waited.content[0].text == "Echo: after a wait", "the SDK retried after the 429")

before = metric('chat_requests_total{status="5xx"}')
try:
    client(retries=3).messages.create(model=BROKEN_MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    check(False, "the broken upstream fails")
except anthropic.InternalServerError as error:
    check(error.status_code == 502, "InternalServerError 502")
check(metric('chat_requests_total{status="5xx"}') - before == 1, "the SDK did not retry it")
print("all Anthropic SDK checks passed")
