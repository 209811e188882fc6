"""Fine-tune an adapter on the server, wait for it, then generate with it.

    python clients/examples/fine_tune.py --base-url http://127.0.0.1:8000 --adapter-id my-lora \\
        --data train.jsonl [--method lora] [--config '{"r": 8}'] [--max-steps 100] --prompt "..."

``train.jsonl`` holds ``{"prompt", "completion"}`` or ``{"messages"}`` records, one a line; it is
uploaded to the server's ``/files`` first (``--data`` may also be the id of a file uploaded before,
``file-...``). Without ``--data`` a few toy records are sent inline. Needs an admin key
(``--api-key`` / ``$FACET_API_KEY``). Exits 1 if the job fails, is cancelled, or does not finish
within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common  # noqa: F401  (puts facet_client on the path in a checkout)
from facet_client import Client, FacetError

TOY = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": "Translate to French: dog", "completion": " chien"},
    {"prompt": "Translate to French: house", "completion": " maison"},
    {"prompt": "Translate to French: book", "completion": " livre"},
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("FACET_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("FACET_API_KEY"))
    parser.add_argument("--adapter-id", default="example-lora")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--config", type=json.loads, default=None, help='family config JSON, e.g. {"r": 8}')
    parser.add_argument("--data", default=None, help="training JSONL file or file id (default: toy records)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    parser.add_argument("--prompt", default="Translate to French: cat")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    hyperparameters = {"max_steps": args.max_steps}
    if args.learning_rate is not None:
        hyperparameters["learning_rate"] = args.learning_rate
    try:
        with Client(args.base_url, api_key=args.api_key) as facet:
            job = facet.fine_tunes.create(
                args.adapter_id,
                args.method,
                method_config=args.config,
                training_data=None if args.data else TOY,
                training_file=args.data,
                hyperparameters=hyperparameters,
            )
            print(f"job {job.id}: {job.status}", file=sys.stderr)
            deadline = time.monotonic() + args.timeout
            for event in facet.fine_tunes.watch(job.id, poll_interval=0.2):
                if event.type == "step":
                    d = event.data
                    print(f"  step {d['step']}/{d.get('total_steps')} loss {d.get('loss')}", file=sys.stderr)
                else:
                    print(f"  {event.type} {event.data or ''}", file=sys.stderr)
                if time.monotonic() > deadline:
                    break
            remaining = max(0.0, deadline - time.monotonic())
            done = facet.fine_tunes.wait(job.id, timeout=remaining)  # raises if failed / cancelled
            print(f"trained {done.adapter_id} in {done.step} steps (loss {done.loss})", file=sys.stderr)
            out = facet.generate(args.prompt, adapter=done.adapter_id, max_new_tokens=args.max_new_tokens)
            print(out.text)
    except FacetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable --data file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
