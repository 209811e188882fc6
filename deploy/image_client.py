"""Host-side helpers of deploy/test-image.sh, standard library only (the host needs no venv).

    python3 deploy/image_client.py lora DIR [--seed N]      # a random non-zero LoRA for SmolLM2-135M
    python3 deploy/image_client.py generate URL TOKEN JSON  # POST /generate, print the answer's text
    python3 deploy/image_client.py stream URL TOKEN OUT     # a streamed /generate, events to OUT

The LoRA is written by hand in the safetensors layout (8-byte header length, JSON header, raw
little-endian float32 data) so that the check needs neither torch nor safetensors on the host.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import urllib.request
from array import array
from pathlib import Path

# SmolLM2-135M: 30 layers, hidden 576, 3 key/value heads of 64 (v_proj: 576 -> 192).
LAYERS, HIDDEN, KV = 30, 576, 192
RANK = 4


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], array]]) -> None:
    """Write float32 tensors {name: (shape, values)} as a safetensors file."""
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        data = values.tobytes() if sys.byteorder == "little" else _swapped(values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            out.write(blob)


def _swapped(values: array) -> bytes:
    copy = array("f", values)
    copy.byteswap()
    return copy.tobytes()


def make_lora(folder: Path, seed: int) -> None:
    """A PEFT-format LoRA (q_proj, v_proj, r=4) with random non-zero factors."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(LAYERS):
        for module, out_features in (("q_proj", HIDDEN), ("v_proj", KV)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = array("f", (rng.uniform(-0.05, 0.05) or 0.01 for _ in range(RANK * HIDDEN)))
            b = array("f", (rng.uniform(-0.05, 0.05) or 0.01 for _ in range(out_features * RANK)))
            tensors[f"{key}.lora_A.weight"] = ([RANK, HIDDEN], a)
            tensors[f"{key}.lora_B.weight"] = ([out_features, RANK], b)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": RANK, "lora_alpha": 8}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def post(url: str, token: str, body: dict, timeout: float):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
    )
    return urllib.request.urlopen(request, timeout=timeout)


def generate(url: str, token: str, body: dict) -> None:
    with post(url + "/generate", token, body, timeout=300) as response:
        print(json.loads(response.read())["text"])


def stream(url: str, token: str, out: Path, body: dict) -> None:
    """Write each SSE line to OUT as it arrives (flushed), so the caller sees the first token."""
    response = post(url + "/generate", token, {**body, "stream": True}, timeout=300)
    with response, open(out, "w") as f:
        for line in response:
            f.write(line.decode())
            f.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lora = sub.add_parser("lora")
    lora.add_argument("folder", type=Path)
    lora.add_argument("--seed", type=int, default=0)
    for name in ("generate", "stream"):
        p = sub.add_parser(name)
        p.add_argument("url")
        p.add_argument("token")
        if name == "stream":
            p.add_argument("out", type=Path)
        p.add_argument("body", help="the /generate JSON body")
    args = parser.parse_args()
    if args.command == "lora":
        make_lora(args.folder, args.seed)
    elif args.command == "generate":
        generate(args.url, args.token, json.loads(args.body))
    else:
        stream(args.url, args.token, args.out, json.loads(args.body))


if __name__ == "__main__":
    main()
