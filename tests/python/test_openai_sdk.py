"""The official `openai` Python SDK against a running BurnCloud gateway.

Run by tests/tests/gateway.rs with OPENAI_BASE_URL=http://ADDR/v1 and OPENAI_API_KEY=sk-... of a key
whose group serves BURNCLOUD_TEST_MODEL (chat) and BURNCLOUD_TEST_EMBEDDING_MODEL, behind the
project's mock upstream answering with BURNCLOUD_TEST_PROMPT_TOKENS / BURNCLOUD_TEST_COMPLETION_TOKENS.
Plain script: prints one line per check and exits non-zero at the first failure.
"""

import os
import sys

import openai

MODEL = os.environ.get("BURNCLOUD_TEST_MODEL", "gpt-x")
EMBEDDING_MODEL = os.environ.get("BURNCLOUD_TEST_EMBEDDING_MODEL", "embed-x")
PROMPT_TOKENS = int(os.environ.get("BURNCLOUD_TEST_PROMPT_TOKENS", "0"))
COMPLETION_TOKENS = int(os.environ.get("BURNCLOUD_TEST_COMPLETION_TOKENS", "0"))
MESSAGES = [{"role": "user", "content": "Say hello"}]


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def client(api_key=None):
    kwargs = {"max_retries": 0, "timeout": 30.0}
    if api_key is not None:
        kwargs["api_key"] = api_key
    return openai.OpenAI(**kwargs)


def non_stream_chat_returns_content_and_usage():
    r = client().chat.completions.create(model=MODEL, messages=MESSAGES)
    content = r.choices[0].message.content
    expect(isinstance(content, str) and content, f"empty content: {r!r}")
    expect(r.usage is not None, f"no usage: {r!r}")
    expect(r.usage.prompt_tokens == PROMPT_TOKENS, f"prompt_tokens {r.usage.prompt_tokens} != {PROMPT_TOKENS}")
    expect(
        r.usage.completion_tokens == COMPLETION_TOKENS,
        f"completion_tokens {r.usage.completion_tokens} != {COMPLETION_TOKENS}",
    )


def streamed_chat_yields_chunks_and_final_usage():
    stream = client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    expect(len(pieces) >= 1, "no content chunks")
    expect("".join(pieces), "the streamed content is empty")
    expect(usage is not None, "no usage chunk although include_usage was set")
    expect(usage.prompt_tokens == PROMPT_TOKENS, f"streamed prompt_tokens {usage.prompt_tokens} != {PROMPT_TOKENS}")
    expect(
        usage.completion_tokens == COMPLETION_TOKENS,
        f"streamed completion_tokens {usage.completion_tokens} != {COMPLETION_TOKENS}",
    )


def embeddings_return_one_vector_per_input():
    r = client().embeddings.create(model=EMBEDDING_MODEL, input=["first", "second"])
    expect(len(r.data) == 2, f"{len(r.data)} embeddings for 2 inputs")
    expect(all(len(d.embedding) > 0 for d in r.data), "an empty embedding vector")


def model_list_includes_the_chat_model():
    ids = [m.id for m in client().models.list()]
    expect(MODEL in ids, f"{MODEL} not in {ids}")


def a_bad_key_raises_authentication_error():
    try:
        client(api_key="sk-not-a-key-of-this-gateway").chat.completions.create(model=MODEL, messages=MESSAGES)
    except openai.AuthenticationError as e:
        expect(e.status_code == 401, f"status {e.status_code}")
        return
    raise CheckFailed("a bad key was accepted")


CHECKS = [
    non_stream_chat_returns_content_and_usage,
    streamed_chat_yields_chunks_and_final_usage,
    embeddings_return_one_vector_per_input,
    model_list_includes_the_chat_model,
    a_bad_key_raises_authentication_error,
]


def main():
    print(f"openai {openai.__version__} against {os.environ.get('OPENAI_BASE_URL')}")
    for check in CHECKS:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way
            print(f"FAIL {check.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok   {check.__name__}")
    print(f"all {len(CHECKS)} SDK checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
