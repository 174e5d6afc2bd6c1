"""The official `anthropic` Python SDK against a running BurnCloud gateway.

Run by tests/tests/protocols.rs with ANTHROPIC_BASE_URL=http://ADDR and ANTHROPIC_API_KEY=sk-... of
a key whose group serves BURNCLOUD_TEST_MODEL (see sdk_common.py for the other settings). Plain
script: prints one line per check and exits non-zero at the first failure. Sends exactly six
billable requests: whole, streamed, and two tool rounds of two requests each.
"""

import sys

import anthropic

from sdk_common import (
    MODEL,
    TEXT,
    TOOL_RESULT,
    WEATHER_ARGS,
    WEATHER_SCHEMA,
    CheckFailed,
    expect,
    expect_usage,
    mock_calls_weather_next,
    run,
)

HELLO = [{"role": "user", "content": "Say hello"}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"name": "get_weather", "description": "Current weather of a city", "input_schema": WEATHER_SCHEMA}]


def client(api_key=None):
    kwargs = {"max_retries": 0, "timeout": 30.0}
    if api_key is not None:
        kwargs["api_key"] = api_key
    return anthropic.Anthropic(**kwargs)


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def a_message_returns_the_text_and_usage():
    m = client().messages.create(model=MODEL, max_tokens=256, messages=HELLO)
    expect(m.type == "message" and m.role == "assistant", f"not a message: {m!r}")
    expect(text_of(m) == TEXT, f"text {text_of(m)!r} != {TEXT!r}")
    expect(m.stop_reason == "end_turn", f"stop_reason {m.stop_reason!r}")
    expect_usage(m.usage.input_tokens, m.usage.output_tokens, "message usage")


def a_streamed_message_yields_the_text_in_order_and_the_usage():
    kinds = []
    with client().messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    expect(kinds and kinds[0] == "message_start", f"first event {kinds[:1]}")
    expect("message_stop" in kinds, f"no message_stop in {kinds}")
    expect(kinds.index("content_block_start") < kinds.index("content_block_stop"), f"block order {kinds}")
    expect(text_of(final) == TEXT, f"streamed text {text_of(final)!r} != {TEXT!r}")
    expect(final.stop_reason == "end_turn", f"stop_reason {final.stop_reason!r}")
    expect_usage(final.usage.input_tokens, final.usage.output_tokens, "streamed usage")


def answer_the_call(message, stream):
    """Checks `message` calls get_weather, then sends the tool result; returns the final message."""
    calls = [b for b in message.content if b.type == "tool_use"]
    expect(message.stop_reason == "tool_use", f"stop_reason {message.stop_reason!r}")
    expect(len(calls) == 1, f"tool calls: {message.content!r}")
    call = calls[0]
    expect(call.name == "get_weather" and call.input == WEATHER_ARGS, f"call {call!r}")
    expect(bool(call.id), "tool_use without id")
    expect_usage(message.usage.input_tokens, message.usage.output_tokens, "tool call usage")
    messages = QUESTION + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": TOOL_RESULT}]},
    ]
    if stream:
        with client().messages.stream(model=MODEL, max_tokens=256, messages=messages, tools=TOOLS) as s:
            return s.get_final_message()
    return client().messages.create(model=MODEL, max_tokens=256, messages=messages, tools=TOOLS)


def a_tool_round_trip_works():
    mock_calls_weather_next()
    first = client().messages.create(model=MODEL, max_tokens=256, messages=QUESTION, tools=TOOLS)
    final = answer_the_call(first, stream=False)
    expect(text_of(final) == TEXT, f"answer {text_of(final)!r}")
    expect_usage(final.usage.input_tokens, final.usage.output_tokens, "answer usage")


def a_streamed_tool_round_trip_works():
    mock_calls_weather_next()
    with client().messages.stream(model=MODEL, max_tokens=256, messages=QUESTION, tools=TOOLS) as s:
        first = s.get_final_message()
    final = answer_the_call(first, stream=True)
    expect(text_of(final) == TEXT, f"streamed answer {text_of(final)!r}")
    expect_usage(final.usage.input_tokens, final.usage.output_tokens, "streamed answer usage")


def a_bad_key_raises_authentication_error():
    try:
        client(api_key="sk-not-a-key-of-this-gateway").messages.create(model=MODEL, max_tokens=16, messages=HELLO)
    except anthropic.AuthenticationError as e:
        expect(e.status_code == 401, f"status {e.status_code}")
        body = e.body if isinstance(e.body, dict) else {}
        expect(body.get("type") == "error", f"body {e.body!r}")
        expect(body.get("error", {}).get("type") == "authentication_error", f"body {e.body!r}")
        return
    raise CheckFailed("a bad key was accepted")


CHECKS = [
    a_message_returns_the_text_and_usage,
    a_streamed_message_yields_the_text_in_order_and_the_usage,
    a_tool_round_trip_works,
    a_streamed_tool_round_trip_works,
    a_bad_key_raises_authentication_error,
]

if __name__ == "__main__":
    sys.exit(run(f"anthropic {anthropic.__version__} against {anthropic.Anthropic(api_key='x').base_url}", CHECKS))
