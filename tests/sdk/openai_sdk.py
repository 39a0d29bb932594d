"""The official `openai` package driving the gateway unchanged (base_url = gateway/v1).

Run by tests/it/sdk.rs against a gateway in front of mock-llm; exits non-zero at the
first failed check. Environment: GATEWAY_URL, GATEWAY_KEY (ample bucket), SLOW_KEY (a
bucket of one token refilling at 2/s), METERED_KEY (a tier of METERED_TOKENS tokens per
minute), SPENT_KEY (a tier with a daily budget of 200 tokens), GEMINI_MODEL_WITHOUT_KEY (a model whose upstream
is not configured, so the gateway answers 502).
"""

import json
import math
import re
import time

import openai

from gateway import BROKEN_MODEL, KEY, METERED_KEY, METERED_TOKENS, SLOW_KEY, SPENT_KEY, URL, check, metric


def client(key=KEY, retries=0):
    return openai.OpenAI(api_key=key, base_url=f"{URL}/v1", max_retries=retries)


# A whole completion.
answer = client().chat.completions.create(
    model="llama3.1",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello sdk"}],
    max_tokens=50,
    temperature=0.2,
)
check(answer.id.startswith("chatcmpl-"), "the id is a chat completion id")
check(answer.choices[0].message.content == "Echo: hello sdk", "the content is the answer")
check(answer.choices[0].finish_reason == "stop", "finish_reason")
check(answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0, "usage adds up")
check(answer.model == "llama3.1", "the model")

# The raw response carries the gateway's headers.
raw = client().chat.completions.with_raw_response.create(
    model="llama3.1", messages=[{"role": "user", "content": "headers please"}]
)
check(raw.headers.get("x-cache") == "MISS", "X-Cache on the raw response")
check(raw.headers.get("x-ratelimit-limit-requests") is not None, "x-ratelimit-limit-requests")
check(raw.parse().choices[0].message.content == "Echo: headers please", "the parsed raw response")

# Streams, with and without usage.
pieces, usage, finish = [], None, None
for chunk in client().chat.completions.create(
    model="llama3.1",
    messages=[{"role": "user", "content": "stream with usage"}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    elif chunk.usage:
        usage = chunk.usage
check("".join(pieces) == "Echo: stream with usage", "a streamed answer, chunk by chunk")
check(len(pieces) > 1, "more than one chunk")
check(finish == "stop", "the stream's finish_reason")
check(usage is not None and usage.completion_tokens > 0, "the usage chunk")

chunks = list(
    client().chat.completions.create(
        model="llama3.1", messages=[{"role": "user", "content": "stream without usage"}], stream=True
    )
)
check(all(c.usage is None for c in chunks), "no usage without include_usage")
check("".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: stream without usage", "text")

# A cached answer replayed as a stream.
time.sleep(0.2)
replayed = client().chat.completions.with_raw_response.create(
    model="llama3.1", messages=[{"role": "user", "content": "stream without usage"}], stream=True
)
check(replayed.headers.get("x-cache") == "HIT", "a repeated stream is a hit")
text = "".join(c.choices[0].delta.content or "" for c in replayed.parse() if c.choices)
check(text == "Echo: stream without usage", "the hit replays as a stream")

# Models.
ids = [m.id for m in client().models.list()]
check("llama3.1" in ids and "fast" in ids, "the models list")
check(client().models.retrieve("llama3.1").owned_by == "ollama", "one model")
try:
    client().models.retrieve("no-such-model")
    check(False, "an unknown model is refused")
except openai.NotFoundError as error:
    check(error.code == "model_not_found", "an unknown model is NotFoundError model_not_found")

# Tool calling: the model's call, then its result sent back (the SDK's own message object
# appended as it is), whole and streamed through the SDK's accumulating stream helper.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
question = {"role": "user", "content": "weather in Lisbon?"}
called = client().chat.completions.create(model="llama3.1", messages=[question], tools=TOOLS)
choice = called.choices[0]
check(choice.finish_reason == "tool_calls" and choice.message.content is None, "finish_reason tool_calls, no text")
call = choice.message.tool_calls[0]
check(call.type == "function" and call.function.name == "get_weather", "the tool call")
check(json.loads(call.function.arguments) == {"query": "weather in Lisbon?"}, "its arguments")
answered = client().chat.completions.create(
    model="llama3.1",
    tools=TOOLS,
    messages=[question, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "22C"}],
)
check(answered.choices[0].message.content == "Tool get_weather said: 22C", "the tool's result reached the model")
with client().chat.completions.stream(
    model="llama3.1", messages=[{"role": "user", "content": "streamed weather?"}], tools=TOOLS
) as stream:
    final = stream.get_final_completion()
streamed_call = final.choices[0].message.tool_calls[0]
check(streamed_call.function.name == "get_weather", "a streamed tool call, accumulated by the SDK")
check(json.loads(streamed_call.function.arguments) == {"query": "streamed weather?"}, "with its arguments")
check(final.choices[0].finish_reason == "tool_calls", "the streamed finish_reason")
try:
    client().chat.completions.create(model="llama3.1", messages=[question], tools=TOOLS, tool_choice="required")
    check(False, "Ollama cannot force a call")
except openai.BadRequestError as error:
    check(error.param == "tool_choice" and error.code == "unsupported_parameter", "a forced call on Ollama names tool_choice")

# Errors as the SDK's own classes.
try:
    client(key="sk-wrong").chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "x"}])
    check(False, "a wrong key is refused")
except openai.AuthenticationError as error:
    check(error.status_code == 401 and "API key" in error.message, "AuthenticationError")
try:
    client().chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "x"}], temperature=5)
    check(False, "a bad temperature is refused")
except openai.BadRequestError as error:
    check(error.param == "temperature", "BadRequestError names the param")
try:
    client().chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "x"}], n=3)
    check(False, "n > 1 is refused")
except openai.BadRequestError as error:
    check(error.param == "n", "n > 1 is a 400 naming n")

# Token limits (contract §13): the token headers as the SDK's raw response exposes them. A
# fresh key's bucket is charged the reservation, ceil(prompt bytes / 4) + max_tokens; the
# next request finds the first settled to its real usage (the rest refunded).
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$|^0s$")
prompt = "count my tokens please"
first = client(key=METERED_KEY).chat.completions.with_raw_response.create(
    model="llama3.1", messages=[{"role": "user", "content": prompt}], max_tokens=400
)
reserved = math.ceil(len(prompt) / 4) + 400
check(int(first.headers["x-ratelimit-limit-tokens"]) == METERED_TOKENS, "x-ratelimit-limit-tokens is the tier's")
left = int(first.headers["x-ratelimit-remaining-tokens"])
# The bucket refills METERED_TOKENS / 60 per second, so a few ms may add a token back.
check(0 <= left - (METERED_TOKENS - reserved) <= 2, f"remaining-tokens {left} = limit - reservation {reserved}")
check(GO_DURATION.match(first.headers["x-ratelimit-reset-tokens"]) is not None, "reset-tokens is a Go duration")
used = first.parse().usage.total_tokens
check(0 < used < reserved, f"the answer used {used} of {reserved} reserved")
time.sleep(0.3)  # the reconciliation is written after the answer, never before it
second = client(key=METERED_KEY).chat.completions.with_raw_response.create(
    model="llama3.1", messages=[{"role": "user", "content": prompt + " again"}], max_tokens=400
)
reserved_again = math.ceil(len(prompt + " again") / 4) + 400
left = int(second.headers["x-ratelimit-remaining-tokens"])
floor = METERED_TOKENS - used - reserved_again
check(floor <= left <= floor + METERED_TOKENS // 60 + 2, f"remaining-tokens {left}: the first settled to {used}")

# A budget that cannot cover the reservation: RateLimitError insufficient_quota, which the
# SDK does not retry (x-should-retry: false), even when allowed to.
client(key=SPENT_KEY).chat.completions.create(
    model="llama3.1", messages=[{"role": "user", "content": "small"}], max_tokens=100
)
before = metric('rate_limit_denials_total{reason="budget"}')
try:
    client(key=SPENT_KEY, retries=3).chat.completions.create(
        model="llama3.1", messages=[{"role": "user", "content": "large"}], max_tokens=300
    )
    check(False, "the budget refuses the request")
except openai.RateLimitError as error:
    check(error.status_code == 429 and error.code == "insufficient_quota", "RateLimitError insufficient_quota")
    check(error.response.headers.get("x-should-retry") == "false", "x-should-retry: false")
check(metric('rate_limit_denials_total{reason="budget"}') - before == 1, "the SDK did not retry a spent budget")

# 429: the SDK's RateLimitError without retries; with retries it waits out retry-after-ms.
client(key=SLOW_KEY).chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "first"}])
try:
    client(key=SLOW_KEY).chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "second"}])
    check(False, "an empty bucket is refused")
except openai.RateLimitError as error:
    check(error.status_code == 429 and error.code == "rate_limit_exceeded", "RateLimitError")
    wait_ms = int(error.response.headers["retry-after-ms"])
    check(1 <= wait_ms <= 500, f"retry-after-ms {wait_ms}")
time.sleep(0.6)
client(key=SLOW_KEY).chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "refill"}])
started = time.monotonic()
waited = client(key=SLOW_KEY, retries=3).chat.completions.create(
    model="llama3.1", messages=[{"role": "user", "content": "after a wait"}]
)
elapsed = time.monotonic() - started
check(waited.choices[0].message.content == "Echo: after a wait", "the SDK retried after the 429")
check(0.2 <= elapsed < 5, f"it waited for the refill ({elapsed:.2f}s)")

# A 502 after the gateway's own retries says x-should-retry: false, which the SDK obeys.
before = metric('chat_requests_total{status="5xx"}')
try:
    client(retries=3).chat.completions.create(model=BROKEN_MODEL, messages=[{"role": "user", "content": "x"}])
    check(False, "the broken upstream fails")
except openai.InternalServerError as error:
    check(error.status_code == 502, "InternalServerError 502")
check(metric('chat_requests_total{status="5xx"}') - before == 1, "the SDK did not retry it")
print("all OpenAI SDK checks passed")
