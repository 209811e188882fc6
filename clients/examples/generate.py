"""Generate text with ``facet_client``, optionally through an adapter.

    python clients/examples/generate.py --base-url http://127.0.0.1:8000 --prompt "Hello" [--adapter ID]

The key comes from ``--api-key`` or ``$FACET_API_KEY``. Exits 1 on any error from the server.
"""

from __future__ import annotations

import argparse
import os
import sys

import _common  # noqa: F401  (puts facet_client on the path in a checkout)
from facet_client import Client, FacetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("FACET_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("FACET_API_KEY"))
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    args = parser.parse_args(argv)
    try:
        with Client(args.base_url, api_key=args.api_key) as facet:
            if args.stream:
                stream = facet.generate_stream(
                    args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens
                )
                for token in stream:
                    print(token.text, end="", flush=True)
                print()
                result = stream.result
            else:
                result = facet.generate(args.prompt, adapter=args.adapter, max_new_tokens=args.max_new_tokens)
                print(result.text)
    except FacetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print("error: the stream ended without a result", file=sys.stderr)
        return 1
    print(f"[{result.finish_reason}; {result.usage}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
