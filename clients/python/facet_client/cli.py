"""``facet``: the command line of the Facet client.

    facet [--url URL] [--api-key KEY] [--json] generate PROMPT [--adapter ID] [--max-new-tokens N]
                                                        [--temperature T] [--seed S] [--stream]
    facet adapters upload FOLDER [--id ID]
    facet adapters list [--offset N] [--limit N]
    facet adapters get ID
    facet adapters rm ID
    facet files upload PATH [--purpose fine-tune]     (JSONL; the server checks every line)
    facet files list
    facet files get ID
    facet files content ID
    facet files delete ID
    facet fine-tune create --adapter-id ID --method lora --training-file PATH|FILE_ID
                           [--validation-file PATH|FILE_ID] [--method-config JSON]
                           [--hyperparameters JSON] [--max-steps N] [--target-modules M,...] [--watch]
    facet fine-tune list [--offset N] [--limit N]
    facet fine-tune get ID
    facet fine-tune events ID [--after SEQ]
    facet fine-tune watch ID          (a progress bar on stderr; exit 1 unless it succeeds)
    facet fine-tune cancel ID

A local ``--training-file`` / ``--validation-file`` is uploaded to ``/files`` first (as ``files
upload`` does) and the job refers to it by id; a ``file-...`` id that is not a local path is used
as is. ``--data``, ``--validation-data`` and ``--config`` are the older names of these options.

``--url`` / ``--api-key`` default to ``$FACET_URL`` / ``$FACET_API_KEY``. Errors print the
server's message on stderr and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from ._ops import DEFAULT_URL
from .errors import FacetError
from .models import Adapter, FineTune, TrainingFile
from .sync import Client


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facet", description="Facet adapter inference server client")
    parser.add_argument("--url", default=os.environ.get("FACET_URL", DEFAULT_URL), help="server URL")
    parser.add_argument("--api-key", default=os.environ.get("FACET_API_KEY"), help="bearer key")
    parser.add_argument("--json", action="store_true", help="print JSON (the server's objects)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="start a Facet server here: facet serve [--port 8000 ...]")

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
    upload.add_argument("--no-progress", action="store_true", help="no upload progress bar")

    ft = commands.add_parser("fine-tune", help="train adapters on the server (admin key)")
    sub = ft.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="start a fine-tune job")
    create.add_argument("--adapter-id", required=True, help="id the trained adapter is stored under")
    create.add_argument("--method", required=True, help="adapter family: lora, hut, ether, dct, surm")
    create.add_argument(
        "--training-file", "--data", dest="training_file", required=True,
        help="training JSONL: a local path (uploaded to /files first) or a file id (file-...)",
    )  # fmt: skip
    create.add_argument(
        "--validation-file", "--validation-data", dest="validation_file", default=None,
        help="validation JSONL: a local path or a file id",
    )  # fmt: skip
    create.add_argument(
        "--method-config", "--config", dest="method_config", type=_json_object, default=None,
        help='family config JSON, e.g. {"r": 8}',
    )  # fmt: skip
    create.add_argument("--hyperparameters", type=_json_object, default=None, help="hyperparameters JSON")
    create.add_argument("--max-steps", type=int, default=None, help="sets hyperparameters.max_steps")
    create.add_argument("--target-modules", default=None, help="comma-separated (default: all)")
    create.add_argument("--watch", action="store_true", help="then watch it like `fine-tune watch`")
    listing = sub.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--limit", type=int, default=50)
    for name, text in (("get", "one job"), ("watch", "follow a job to its end"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    events = sub.add_parser("events", help="a job's events")
    events.add_argument("job_id")
    events.add_argument("--after", type=int, default=None, help="only events after this seq")
    for p in (create, sub.choices["watch"]):
        p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    files = commands.add_parser("files", help="JSONL training files on the server (admin key)")
    sub = files.add_subparsers(dest="action", required=True)
    upload = sub.add_parser("upload", help="upload a JSONL file (its id is a fine-tune's --training-file)")
    upload.add_argument("path")
    upload.add_argument("--purpose", default="fine-tune", help="only fine-tune for now")
    upload.add_argument("--no-progress", action="store_true", help="no upload progress bar")
    sub.add_parser("list", help="every file, newest first")
    for name, text, aliases in (
        ("get", "one file", []),
        ("content", "print a file's JSONL", []),
        ("delete", "delete a file (jobs made from it keep their data)", ["rm"]),
    ):
        sub.add_parser(name, help=text, aliases=aliases).add_argument("file_id")
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _job_line(j: FineTune) -> str:
    steps = f"{j.step}/{j.total_steps}" if j.total_steps else str(j.step)
    loss = f"loss {j.loss:.4g}" if j.loss is not None else "-"
    extra = [f"epoch {j.epoch + 1}"] if j.epoch is not None else []
    if j.val_loss is not None:
        extra.append(f"val_loss {j.val_loss:.4g}")
    if j.eta_s is not None and not j.done:
        extra.append(f"eta {_duration(j.eta_s)}")
    tail = "".join(f"\t{x}" for x in extra) + (f"\t{j.error}" if j.error else "")
    return f"{j.id}\t{j.status}\t{j.adapter_id}\t{j.method}\tstep {steps}\t{loss}{tail}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _file_line(f: TrainingFile) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.created_at))
    return f"{f.id}\t{f.filename}\t{f.records} records\t{f.bytes} B\t{f.purpose}\t{created}"


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


def _adapters(client: Client, args, out: TextIO, err: TextIO) -> None:
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
        if args.no_progress or args.json:
            adapter = client.adapters.upload(args.folder, args.adapter_id)
        else:
            from tqdm import tqdm

            with tqdm(unit="B", unit_scale=True, desc="upload", file=err, leave=False) as bar:
                adapter = client.adapters.upload(args.folder, args.adapter_id, progress=bar.update)
    elif args.action == "get":
        adapter = client.adapters.get(args.adapter_id)
    else:
        adapter = client.adapters.delete(args.adapter_id)
    out.write((json.dumps(adapter.raw) if args.json else _adapter_line(adapter)) + "\n")


def _watch(client: Client, job_id: str, args, out: TextIO, err: TextIO) -> int:
    """Follow the job; JSON lines of its events with ``--json``, else a step bar on stderr."""
    bar = None
    if not (args.json or args.no_progress):
        from tqdm import tqdm

        job = client.fine_tunes.get(job_id)
        bar = tqdm(total=job.total_steps, initial=job.step, unit="step", desc=job.adapter_id, file=err)
    try:
        for event in client.fine_tunes.watch(job_id, poll_interval=args.poll_interval):
            if args.json:
                out.write(json.dumps(dataclasses.asdict(event)) + "\n")
                out.flush()
            elif event.type == "step":
                step, total = event.data.get("step", 0), event.data.get("total_steps")
                epoch, loss = event.data.get("epoch"), event.data.get("loss")
                if bar is not None:
                    if total and bar.total != total:
                        bar.total = total
                    bar.update(max(0, step - bar.n))
                    postfix = {"loss": f"{loss:.4g}"} if loss is not None else {}
                    if epoch is not None:
                        postfix["epoch"] = epoch + 1
                    bar.set_postfix(postfix, refresh=False)
                else:
                    at = f" epoch {epoch + 1}" if epoch is not None else ""
                    out.write(f"step {step}/{total}{at} loss {loss}\n")
            elif event.type in ("eval", "checkpoint", "paused", "requeued", "resumed", "cancel_requested"):
                line = f"{event.type}: {json.dumps(event.data)}"
                if bar is not None:
                    bar.write(line, file=err)
                else:
                    out.write(line + "\n")
    finally:
        if bar is not None:
            bar.close()
    job = client.fine_tunes.get(job_id)
    if not args.json:
        out.write(_job_line(job) + "\n")
    if job.status != "succeeded":
        message = job.error or f"the job ended {job.status}"
        if args.json:
            body = {"error": {"status": 0, "type": f"fine_tune_{job.status}", "message": message}}
            err.write(json.dumps(body) + "\n")
        else:
            err.write(f"facet: fine-tune {job.id} {job.status}: {message}\n")
        return 1
    return 0


def _fine_tune(client: Client, args, out: TextIO, err: TextIO) -> int:
    ft = client.fine_tunes
    if args.action == "list":
        page = ft.list(args.offset, args.limit)
        if args.json:
            out.write(json.dumps({"jobs": [j.raw for j in page.jobs], "total": page.total}) + "\n")
        else:
            for j in page.jobs:
                out.write(_job_line(j) + "\n")
            out.write(f"{len(page.jobs)} of {page.total} jobs\n")
        return 0
    if args.action == "events":
        events = ft.events(args.job_id, args.after)
        if args.json:
            out.write(json.dumps({"events": [dataclasses.asdict(e) for e in events]}) + "\n")
        else:
            for e in events:
                out.write(f"{e.seq}\t{e.type}\t{json.dumps(e.data)}\n")
        return 0
    if args.action == "watch":
        return _watch(client, args.job_id, args, out, err)
    if args.action == "create":
        hp = dict(args.hyperparameters or {})
        if args.max_steps is not None:
            hp["max_steps"] = args.max_steps
        targets = args.target_modules.split(",") if args.target_modules else None
        job = ft.create(
            args.adapter_id,
            args.method,
            method_config=args.method_config,
            target_modules=targets,
            training_file=args.training_file,
            hyperparameters=hp or None,
            validation_file=args.validation_file,
        )
        out.write((json.dumps(job.raw) if args.json else _job_line(job)) + "\n")
        out.flush()
        return _watch(client, job.id, args, out, err) if args.watch else 0
    job = ft.get(args.job_id) if args.action == "get" else ft.cancel(args.job_id)
    out.write((json.dumps(job.raw) if args.json else _job_line(job)) + "\n")
    return 0


def _files(client: Client, args, out: TextIO, err: TextIO) -> None:
    files = client.files
    if args.action == "list":
        found = files.list()
        if args.json:
            out.write(json.dumps({"object": "list", "data": [f.raw for f in found]}) + "\n")
        else:
            for f in found:
                out.write(_file_line(f) + "\n")
            out.write(f"{len(found)} files\n")
        return
    if args.action == "content":
        out.write(files.content(args.file_id))
        return
    if args.action in ("delete", "rm"):
        gone = files.delete(args.file_id)
        out.write((json.dumps(gone.raw) if args.json else f"deleted {gone.id}\t{gone.filename}") + "\n")
        return
    if args.action == "get":
        file = files.get(args.file_id)
    elif args.no_progress or args.json:
        file = files.create(args.path, args.purpose)
    else:
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="upload", file=err, leave=False) as bar:
            file = files.create(args.path, args.purpose, progress=bar.update)
    out.write((json.dumps(file.raw) if args.json else _file_line(file)) + "\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after "serve" is the server's own settings flags
        try:
            from server.__main__ import main as serve_main
        except ImportError:
            print("facet serve needs the Facet server installed (make serve, or pip install -e .)", file=err)
            return 1
        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            if args.command == "generate":
                _generate(client, args, out)
            elif args.command == "fine-tune":
                return _fine_tune(client, args, out, err)
            elif args.command == "files":
                _files(client, args, out, err)
            else:
                _adapters(client, args, out, err)
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
