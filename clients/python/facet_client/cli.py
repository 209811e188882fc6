"""``facet``: the command line of the Facet client.

    facet [--url URL] [--api-key KEY] [--json] generate PROMPT [--adapter ID] [--max-new-tokens N]
                                                        [--temperature T] [--seed S] [--stream]
    facet adapters upload FOLDER [--id ID]
    facet adapters list [--offset N] [--limit N]
    facet adapters get ID
    facet adapters rm ID

``--url`` / ``--api-key`` default to ``$FACET_URL`` / ``$FACET_API_KEY``. Errors print the
server's message on stderr and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from .client import DEFAULT_URL, Adapter, Client
from .errors import FacetError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facet", description="Facet adapter inference server client")
    parser.add_argument("--url", default=os.environ.get("FACET_URL", DEFAULT_URL), help="server URL")
    parser.add_argument("--api-key", default=os.environ.get("FACET_API_KEY"), help="bearer key")
    parser.add_argument("--json", action="store_true", help="print JSON (the server's objects)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")

    adapters = commands.add_parser("adapters", help="manage adapters (admin key)")
    sub = adapters.add_subparsers(dest="action", required=True)
    upload = sub.add_parser(
        "upload", help="upload a folder (adapter_config.json + adapter_model.safetensors)"
    )
    upload.add_argument("folder")
    upload.add_argument("--id", dest="adapter_id", default=None, help="adapter id (default: folder name)")
    listing = sub.add_parser("list", help="list adapters")
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--limit", type=int, default=50)
    get = sub.add_parser("get", help="one adapter")
    get.add_argument("adapter_id")
    rm = sub.add_parser("rm", help="delete an adapter")
    rm.add_argument("adapter_id")
    return parser


def _adapter_line(a: Adapter) -> str:
    return f"{a.adapter_id}\tv{a.version}\t{a.family}\t{a.status}\t{a.nbytes} B\t{','.join(a.residency)}"


def _generate(client: Client, args, out: TextIO) -> None:
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    if args.stream:
        with client.generate_stream(args.prompt, adapter=args.adapter, **options) as stream:
            for token in stream:
                if args.json:
                    out.write(json.dumps(dataclasses.asdict(token)) + "\n")
                else:
                    out.write(token.text)
                out.flush()
            result = stream.result
        if args.json and result is not None:
            out.write(json.dumps(result.raw) + "\n")
        elif not args.json:
            out.write("\n")
        return
    result = client.generate(args.prompt, adapter=args.adapter, **options)
    out.write((json.dumps(result.raw) if args.json else result.text) + "\n")


def _adapters(client: Client, args, out: TextIO) -> None:
    if args.action == "list":
        page = client.adapters.list(args.offset, args.limit)
        if args.json:
            body = {"adapters": [a.raw for a in page.adapters], "total": page.total}
            out.write(json.dumps(body) + "\n")
        else:
            for a in page.adapters:
                out.write(_adapter_line(a) + "\n")
            out.write(f"{len(page.adapters)} of {page.total} adapters\n")
        return
    if args.action == "upload":
        adapter = client.adapters.upload(args.folder, args.adapter_id)
    elif args.action == "get":
        adapter = client.adapters.get(args.adapter_id)
    else:
        adapter = client.adapters.delete(args.adapter_id)
    out.write((json.dumps(adapter.raw) if args.json else _adapter_line(adapter)) + "\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            if args.command == "generate":
                _generate(client, args, out)
            else:
                _adapters(client, args, out)
    except FacetError as exc:
        if args.json:
            body = {"error": {"status": exc.status, "type": exc.type, "message": exc.message}}
            if exc.where:
                body["error"]["where"] = exc.where
            err.write(json.dumps(body) + "\n")
        else:
            err.write(f"facet: {exc}\n")
        return 1
    except (OSError, ValueError) as exc:  # a missing adapter file, a bad argument combination
        err.write(f"facet: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
