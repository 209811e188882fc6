"""Chat with a Facet adapter through OpenAI's own Python client (``pip install openai``).

    python clients/examples/openai_chat.py --base-url http://127.0.0.1:8000 --model ADAPTER_ID \\
        --message "Hi there"

Facet serves the OpenAI API under ``/v1``; ``model`` is an adapter id, or the base model's name for
no adapter. The key comes from ``--api-key`` or ``$FACET_API_KEY``. Exits 1 on any API error.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("FACET_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("FACET_API_KEY"))
    parser.add_argument("--model", required=True, help="adapter id, or the base model's name")
    parser.add_argument("--message", default="Say hello.")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args(argv)

    # The OpenAI client insists on a key; a server without auth ignores whatever is sent.
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "none")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}
    ]
    try:
        if args.stream:
            stream = client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.max_tokens, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
            print()
        else:
            reply = client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.max_tokens
            )
            print(reply.choices[0].message.content)
            print(f"[{reply.choices[0].finish_reason}; {reply.usage}]", file=sys.stderr)
    except openai.OpenAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
