"""Shared plumbing of the SDK scripts in this folder: settings from the environment, checks, the
mock upstream's control API, and the runner that prints one line per check.

The scripts are run by tests/tests/protocols.rs against a running BurnCloud gateway in front of the
project's mock upstream (BURNCLOUD_TEST_MOCK_URL), which answers BURNCLOUD_TEST_TEXT with
BURNCLOUD_TEST_PROMPT_TOKENS / BURNCLOUD_TEST_COMPLETION_TOKENS of usage.
"""

import json
import os
import sys
import urllib.request

MODEL = os.environ.get("BURNCLOUD_TEST_MODEL", "model-x")
MOCK_URL = os.environ.get("BURNCLOUD_TEST_MOCK_URL", "")
TEXT = os.environ.get("BURNCLOUD_TEST_TEXT", "")
PROMPT_TOKENS = int(os.environ.get("BURNCLOUD_TEST_PROMPT_TOKENS", "0"))
COMPLETION_TOKENS = int(os.environ.get("BURNCLOUD_TEST_COMPLETION_TOKENS", "0"))
WEATHER_ARGS = {"city": "Paris"}
TOOL_RESULT = "18C and sunny"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def expect_usage(prompt, completion, where):
    expect(prompt == PROMPT_TOKENS, f"{where}: prompt tokens {prompt} != {PROMPT_TOKENS}")
    expect(completion == COMPLETION_TOKENS, f"{where}: completion tokens {completion} != {COMPLETION_TOKENS}")


def mock_calls_weather_next():
    """Makes the mock upstream answer the next request with a get_weather call."""
    body = json.dumps({"tool_call": {"name": "get_weather", "arguments": WEATHER_ARGS}, "times": 1}).encode()
    req = urllib.request.Request(
        f"{MOCK_URL}/_mock/behaviour", data=body, method="PUT", headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        expect(resp.status == 200, f"PUT /_mock/behaviour: HTTP {resp.status}")


def run(title, checks):
    print(title)
    for check in checks:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way
            print(f"FAIL {check.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok   {check.__name__}")
    print(f"all {len(checks)} SDK checks passed")
    return 0
