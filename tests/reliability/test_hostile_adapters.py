"""Hostile adapter values, refused at upload over HTTP with a 422 naming the field or tensor.

A real server (uvicorn on a loopback port, this process) on the tiny Llama. Covered:

* every family's config scalars: out of range (±1e39, zero and huge ranks and counts), not finite,
  and the wrong JSON type (``"8"`` and ``true`` are not numbers; ``1`` is not a boolean);
* ETHER/ETHER+ vectors whose norm is tiny for their size (normalising them gives no reflection);
* slot tables that ``prepare`` makes non-finite (scale folded into finite tensors), on a server
  serving float16, and the engine's install-time check behind the store's;
* the largest accepted adapter of every family is accepted (its rows may go wild: the isolation
  tests show its neighbours are untouched).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save

from adapters_store import AdapterStore, StoreLimits, ValidationError
from adapters_store.validate import validate_upload
from server.app import create_app, store_limits
from server.methods import ConfigError, WeightsError, get_method
from server.methods.adapter import KEY_PREFIX
from server.methods.base import MAX_RANK, MAX_SCALE
from server.methods.ether import MIN_RMS
from tests.api.conftest import FAMILY_CONFIGS, adapter_files
from tests.api.processes import server_thread
from tests.api.tiny_server import build_tiny, tiny_settings
from tests.engine.helpers import TARGETS

from .hostile import largest_accepted

BIG = 1e39  # finite in JSON and float64, inf in float32: accepted with 201 before
FIRST_MODULE = "model.layers.0.mlp.down_proj"  # the first adapted module in sorted order
KRONECKER = {"variant": "kronecker", "kron_factor": 4, "alpha": 1.0}


def _serve(stack: ExitStack, root, table_dtype: torch.dtype) -> dict:
    settings = tiny_settings(data_dir=root / "data")
    engine, store = build_tiny(settings)
    base = engine.base
    if table_dtype != torch.float32:  # as a server whose model is float16 builds its store
        store.close()
        store = AdapterStore(root / "f16", base.module_shapes, base.name, store_limits(settings), table_dtype)
    url = stack.enter_context(server_thread(create_app(settings, engine=engine, store=store)))
    return {"url": url, "base": base, "root": root}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with ExitStack() as stack:
        yield {
            "float32": _serve(stack, tmp_path_factory.mktemp("f32"), torch.float32),
            "float16": _serve(stack, tmp_path_factory.mktemp("f16"), torch.float16),
        }


@pytest.fixture(scope="module")
def server(servers):
    return servers["float32"]


def upload(url: str, adapter_id: str, config: bytes, weights: bytes) -> httpx.Response:
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    return httpx.post(url + "/adapters", data={"adapter_id": adapter_id}, files=files, timeout=60)


def refused(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in response.text
    return error


def _files(server, family: str, tmp_path, **config) -> tuple[bytes, bytes]:
    """A valid random upload of ``family``; ``config`` fields replace the config's."""
    cfg, weights = adapter_files(server["base"], family, tmp_path)
    return json.dumps({**json.loads(cfg), **config}).encode(), weights


# ------------------------------------------------------------------------------------ config scalars

WRONG_TYPE = ["8", True]
SCALARS = {  # family -> field -> values refused (each alone; the rest of the config is valid)
    "lora": {
        "lora_alpha": [BIG, -BIG, MAX_SCALE * 1.0001, -MAX_SCALE * 1.0001, *WRONG_TYPE],
        "r": [0, -1, MAX_RANK + 1, 10**30, 4.0, *WRONG_TYPE],
        "lora_dropout": [1.0, -0.1, BIG, "0.1", True],
        "qalora_group_size": [0, "16", True],
        "use_rslora": ["true", 1, 0],
        "ensure_weight_tying": ["false", 1],
        "format_version": ["1", True, 1.0],
        "inference_mode": ["true", 0],
    },
    "hut": {"r": [0, 10**6, 10**30, 3.0, *WRONG_TYPE], "use_scale_shift": ["true", 1]},
    "ether": {"n_blocks": [0, 3, 10**6, 10**30, 2.0, *WRONG_TYPE]},
    "dct": {
        "scaling": [BIG, -BIG, 0, MAX_SCALE * 2, *WRONG_TYPE],
        "n_frequency": [0, 10**6, 10**30, 20.0, *WRONG_TYPE],
        "delta": [1.5, -0.5, BIG, "0.7", True],
        "n_bands": [0, 65, "3", True],
        "selection_seed": [-1, 2**63, "42", True],
    },
    "surm": {"alpha": [BIG, -BIG, MAX_SCALE * 1.5, *WRONG_TYPE]},
}
SCALAR_CASES = [
    pytest.param(family, field, value, id=f"{family}-{field}-{value!r}")
    for family, fields in SCALARS.items()
    for field, values in fields.items()
    for value in values
]


@pytest.mark.parametrize("family,field,value", SCALAR_CASES)
def test_config_scalar_out_of_range_or_of_the_wrong_type_is_422_naming_it(
    server, tmp_path, family, field, value
):
    config, weights = _files(server, family, tmp_path, **{field: value})
    error = refused(upload(server["url"], "scalar", config, weights))
    assert error["where"].split(".")[0] == field, error


@pytest.mark.parametrize("value", [0, 10**6, "4", True, 4.0])
def test_kronecker_factor_out_of_range_or_of_the_wrong_type_is_422(server, tmp_path, value):
    config, weights = _files(server, "surm", tmp_path, **{**KRONECKER, "kron_factor": value})
    assert refused(upload(server["url"], "kron", config, weights))["where"] == "kron_factor"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_json_numbers_are_422(server, tmp_path, token):
    """JSON cannot carry NaN/inf except as non-standard tokens or overflowing literals: both are
    refused while parsing (``where`` is then the config itself)."""
    config, weights = _files(server, "lora", tmp_path, lora_alpha=123456789)
    config = config.replace(b"123456789", token.encode())
    error = refused(upload(server["url"], "nonfinite", config, weights))
    assert error["where"] == "config" and "JSON" in error["message"], error


FLOAT_FIELDS = [("lora", "lora_alpha"), ("lora", "lora_dropout"), ("dct", "scaling"), ("dct", "delta")]
FLOAT_FIELDS += [("surm", "alpha")]


@pytest.mark.parametrize("family,field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scalars_from_python_name_the_field(family, field, value):
    """The same fields given as Python floats (fine-tune requests, offline use): named."""
    raw = {"peft_type": family.upper(), "target_modules": TARGETS, **FAMILY_CONFIGS[family], field: value}
    with pytest.raises(ConfigError) as e:
        get_method(family).parse_config(raw)
    assert e.value.where == field


@pytest.mark.parametrize("family", [*FAMILY_CONFIGS, "surm-kronecker"])
def test_largest_accepted_adapter_is_accepted(server, tmp_path, family):
    """At the bounds: the scale at MAX_SCALE, every value at max_abs_value: 201, and it serves."""
    base = server["base"]
    fam, extra = ("surm", KRONECKER) if family == "surm-kronecker" else (family, FAMILY_CONFIGS[family])
    raw = {"peft_type": fam.upper(), "target_modules": TARGETS, **extra}
    weights = {p: m.base.weight for p, m in base.modules.items()}
    largest_accepted(fam, raw, base.module_shapes, weights, seed=1).save(tmp_path)
    config = (tmp_path / "adapter_config.json").read_bytes()
    response = upload(
        server["url"], f"big-{family}", config, (tmp_path / "adapter_model.safetensors").read_bytes()
    )
    assert response.status_code == 201, response.text
    body = {"prompt": "t1 t2", "max_new_tokens": 2}
    # Its own answer may be garbage or an error (its logits may overflow); the server carries on.
    httpx.post(server["url"] + "/generate", json={**body, "adapter": f"big-{family}"}, timeout=60).json()
    assert httpx.post(server["url"] + "/generate", json=body, timeout=60).status_code == 200
    assert httpx.delete(server["url"] + f"/adapters/big-{family}").status_code == 200


# -------------------------------------------------------------------------------- ETHER norms


def _ether_upload(server, tmp_path, norm: float) -> tuple[bytes, bytes, str]:
    """An ETHER+ upload whose first module's block 1 of ``ether_u_in`` has norm ``norm``."""
    config, weights = _files(server, "ether", tmp_path)
    tensors = st_load(weights)
    name = f"{KEY_PREFIX}{FIRST_MODULE}.ether_u_in"
    u = tensors[name]
    u[1] = u[1] / u[1].norm() * norm
    return config, save(tensors), name


@pytest.mark.parametrize("norm", [0.0, 1e-13, 1e-30, 0.99 * MIN_RMS])
def test_ether_vector_with_a_tiny_norm_is_422_naming_the_tensor(server, tmp_path, norm):
    config, weights, name = _ether_upload(server, tmp_path, norm * math.sqrt(32))  # blocks of 32
    error = refused(upload(server["url"], "tiny-norm", config, weights))
    assert error["where"] == name and "block 1" in error["message"], error


def test_ether_threshold_keeps_reflections_orthogonal():
    """At the accepted floor (RMS 1e-6) the float32 block is orthogonal to rounding; at the norm
    refused before (1e-13) it is not (u/max(|u|, 1e-12) is no unit vector)."""
    method = get_method("ether")
    cfg = method.parse_config(
        {"peft_type": "ETHER", "variant": "ether", "side": "in", "target_modules": ["m"]}
    )
    b = 32
    u = torch.randn(1, b, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(b)
    for norm, orthogonal in ((MIN_RMS * math.sqrt(b), True), (1e-13, False)):
        params = {"ether_u_in": u / u.norm() * norm}
        h = method.merged_weight(cfg, params, eye, None)[0]  # rows of I through the reflection
        err = float((h @ h.T - eye).abs().max())
        assert (err <= 16 * b * torch.finfo(torch.float32).eps) == orthogonal, (norm, err)
        accepted = True
        try:
            method.check_params(cfg, "m", params, b, b)
        except WeightsError:
            accepted = False
        assert accepted == orthogonal, norm


# ------------------------------------------------------------------------- non-finite slot tables


@pytest.mark.parametrize("family,table", [("lora", "Bt"), ("surm", "spec"), ("dct", "coef")])
def test_tables_non_finite_in_the_serving_dtype_are_422_naming_module_and_tensor(
    servers, tmp_path, family, table
):
    """Float16 serves up to 65504: the scale folded into values at the cap overflows there. The
    same upload is accepted by the float32 server (finite there)."""
    fp16, fp32 = servers["float16"], servers["float32"]
    base = fp16["base"]
    raw = {"peft_type": family.upper(), "target_modules": TARGETS, **FAMILY_CONFIGS[family]}
    weights = {p: m.base.weight for p, m in base.modules.items()}
    largest_accepted(family, raw, base.module_shapes, weights, seed=2).save(tmp_path)
    config = (tmp_path / "adapter_config.json").read_bytes()
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    error = refused(upload(fp16["url"], f"f16-{family}", config, data))
    assert error["where"] == f"{KEY_PREFIX}{FIRST_MODULE}", error
    assert f"serving table '{table}'" in error["message"] and "float16" in error["message"], error
    response = upload(fp32["url"], f"f16-{family}", config, data)
    assert response.status_code == 201, response.text
    assert httpx.delete(fp32["url"] + f"/adapters/f16-{family}").status_code == 200


def test_tables_non_finite_in_float32_are_refused_by_the_store(server, tmp_path):
    """With the magnitude cap raised, finite tensors times a finite scale overflow float32."""
    config, weights = _files(server, "lora", tmp_path, lora_alpha=MAX_SCALE, r=4)
    tensors = st_load(weights)
    for name in tensors:
        if name.endswith("lora_B.weight"):
            tensors[name].fill_(1e36)
    loose = StoreLimits(max_abs_value=1e37)
    with pytest.raises(ValidationError) as e:
        validate_upload(config, save(tensors), server["base"].module_shapes, loose)
    assert e.value.where == f"{KEY_PREFIX}{FIRST_MODULE}" and "'Bt'" in e.value.message


def test_engine_refuses_to_install_a_non_finite_table(tiny_llama):
    """Second line of defence: an adapter given to the engine directly (no store) whose tables
    overflow is refused at install, naming module and table; no slot pool is left behind."""
    from tests.engine.helpers import make_engine, random_adapter

    engine, _ = make_engine(*tiny_llama)
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    adapter = random_adapter("lora", {"r": 4, "lora_alpha": MAX_SCALE}, shapes, weights, seed=0)
    for params in adapter.modules.values():
        params["lora_B"].fill_(1e36)
    key = engine.add_adapter("overflowing", adapter)
    with pytest.raises(WeightsError) as e:
        engine.residency.device_entry(key)
    assert e.value.where.startswith(KEY_PREFIX) and e.value.where.removeprefix(KEY_PREFIX) in adapter.modules
    assert "'Bt'" in str(e.value) and "float32" in str(e.value)
    assert engine.residency.device_used == 0
