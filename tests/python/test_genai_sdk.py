"""The official `google-genai` Python SDK against a running BurnCloud gateway.

Run by tests/tests/protocols.rs with BURNCLOUD_TEST_BASE_URL=http://ADDR and BURNCLOUD_TEST_KEY=sk-...
of a key whose group serves BURNCLOUD_TEST_MODEL (see sdk_common.py for the other settings). Plain
script: prints one line per check and exits non-zero at the first failure. Sends exactly six
billable requests: whole, streamed, and two tool rounds of two requests each.
"""

import os
import sys

from google import genai
from google.genai import errors, types

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

BASE_URL = os.environ.get("BURNCLOUD_TEST_BASE_URL", "")
KEY = os.environ.get("BURNCLOUD_TEST_KEY", "")
QUESTION = "What is the weather in Paris?"
TOOLS_CONFIG = types.GenerateContentConfig(
    tools=[
        types.Tool(
            function_declarations=[
                types.FunctionDeclaration(
                    name="get_weather", description="Current weather of a city", parameters_json_schema=WEATHER_SCHEMA
                )
            ]
        )
    ],
    automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
)


_CLIENTS = {}


def client(api_key=None):
    """One client per key, kept alive: a google-genai client closes its connections once dropped."""
    key = api_key or KEY
    if key not in _CLIENTS:
        _CLIENTS[key] = genai.Client(
            api_key=key,
            http_options={"base_url": BASE_URL, "api_version": "v1beta", "timeout": 30_000},
        )
    return _CLIENTS[key]


def expect_stop(response, where):
    reason = response.candidates[0].finish_reason
    expect(reason == types.FinishReason.STOP, f"{where}: finish_reason {reason!r}")


def expect_response_usage(usage, where):
    expect(usage is not None, f"{where}: no usage_metadata")
    expect_usage(usage.prompt_token_count, usage.candidates_token_count, where)


def a_generation_returns_the_text_and_usage():
    r = client().models.generate_content(model=MODEL, contents="Say hello")
    expect(r.text == TEXT, f"text {r.text!r} != {TEXT!r}")
    expect_stop(r, "generation")
    expect_response_usage(r.usage_metadata, "generation usage")


def a_streamed_generation_yields_the_text_and_usage_last():
    chunks = list(client().models.generate_content_stream(model=MODEL, contents="Say hello"))
    expect(len(chunks) >= 1, "no chunks")
    text = "".join(c.text or "" for c in chunks)
    expect(text == TEXT, f"streamed text {text!r} != {TEXT!r}")
    expect_stop(chunks[-1], "last chunk")
    expect_response_usage(chunks[-1].usage_metadata, "streamed usage")


def answer_the_call(calls, model_content, stream):
    """Checks `calls` is one get_weather call, then sends the function response; returns the text."""
    expect(len(calls) == 1, f"function calls: {calls!r}")
    call = calls[0]
    expect(call.name == "get_weather" and call.args == WEATHER_ARGS, f"call {call!r}")
    response = types.Part.from_function_response(name=call.name, response={"result": TOOL_RESULT})
    if call.id:
        response.function_response.id = call.id
    contents = [
        types.Content(role="user", parts=[types.Part.from_text(text=QUESTION)]),
        model_content,
        types.Content(role="user", parts=[response]),
    ]
    if stream:
        chunks = list(client().models.generate_content_stream(model=MODEL, contents=contents, config=TOOLS_CONFIG))
        expect_response_usage(chunks[-1].usage_metadata, "streamed answer usage")
        return "".join(c.text or "" for c in chunks)
    r = client().models.generate_content(model=MODEL, contents=contents, config=TOOLS_CONFIG)
    expect_response_usage(r.usage_metadata, "answer usage")
    return r.text


def a_function_call_round_trip_works():
    mock_calls_weather_next()
    r = client().models.generate_content(model=MODEL, contents=QUESTION, config=TOOLS_CONFIG)
    expect_stop(r, "function call")
    expect_response_usage(r.usage_metadata, "function call usage")
    text = answer_the_call(r.function_calls or [], r.candidates[0].content, stream=False)
    expect(text == TEXT, f"answer {text!r}")


def a_streamed_function_call_round_trip_works():
    mock_calls_weather_next()
    chunks = list(client().models.generate_content_stream(model=MODEL, contents=QUESTION, config=TOOLS_CONFIG))
    calls = [c for chunk in chunks for c in (chunk.function_calls or [])]
    expect_response_usage(chunks[-1].usage_metadata, "streamed function call usage")
    parts = [p for chunk in chunks if chunk.candidates for p in (chunk.candidates[0].content.parts or [])]
    model_content = types.Content(role="model", parts=[p for p in parts if p.function_call])
    text = answer_the_call(calls, model_content, stream=True)
    expect(text == TEXT, f"streamed answer {text!r}")


def a_bad_key_raises_unauthenticated():
    try:
        client(api_key="sk-not-a-key-of-this-gateway").models.generate_content(model=MODEL, contents="Say hello")
    except errors.ClientError as e:
        expect(e.code == 401, f"code {e.code}")
        expect(e.status == "UNAUTHENTICATED", f"status {e.status!r}")
        return
    raise CheckFailed("a bad key was accepted")


CHECKS = [
    a_generation_returns_the_text_and_usage,
    a_streamed_generation_yields_the_text_and_usage_last,
    a_function_call_round_trip_works,
    a_streamed_function_call_round_trip_works,
    a_bad_key_raises_unauthenticated,
]

if __name__ == "__main__":
    sys.exit(run(f"google-genai {genai.__version__} against {BASE_URL}", CHECKS))
