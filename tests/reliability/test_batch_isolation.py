"""Isolation inside a mixed batch: a hostile adapter's rows never reach its neighbours' rows.

Every family's batched code selects each row's own slot parameters (gather / index_select /
per-slot segments, or a per-row loop in the fused kernels); nothing multiplies one slot's
parameters with another row's activations and masks the result away, where ``0 · inf = NaN``
would leak. Checked on the three serving paths: the fused CPU kernels (float32), the torch code
(``cpu_kernels=False``, the CUDA path) in float32, and the torch code in bfloat16.

* Method level: a slot table holding two well-formed adapters and, in the slot between them, a
  neighbour that is benign, at the largest accepted scale and magnitude, or poisoned outright
  (inf, -inf, NaN, 3e38: values validation refuses). Every other row is bit-identical to the run
  with the benign neighbour: same shapes, so the same operations in the same order, and per-row
  selection means no other value enters them. The well-formed rows also match the float64 dense
  oracle within the rounding bound of their reductions.
* End to end (tiny Llama engine): a well-formed request admitted in one batch with the largest
  accepted adapter of its own family (the same slot pool) generates exactly the tokens it does
  next to a benign one, and (float32) the greedy tokens of the merged model running it alone.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from adapters_store import StoreLimits
from adapters_store.validate import validate_upload
from server import kernels
from server.engine.requests import FinishEvent, SamplingParams, TokenEvent
from server.kernels.fast import fast_op
from server.methods import Group, batched_linear, get_method, stack_prepared
from tests.api.conftest import FAMILY_CONFIGS
from tests.conftest import make_tiny_llama, make_tokenizer
from tests.engine.helpers import TARGETS, assert_greedy_matches, make_engine, merged_copy, random_adapter
from tests.methods.cases import CASES

from .hostile import POISONS, largest_accepted, largest_accepted_config, poisoned

PATHS = {"kernels": torch.float32, "torch": torch.float32, "bf16": torch.bfloat16}
SHAPES = [(24, 24), (8, 24), (48, 24), (21, 15)]
N_ROWS = 14
ROWS = torch.tensor([0, 1, 3, 4, 6, 7, 9, 10, 12])  # rows 2, 5, 8, 11, 13 have no adapter
SLOTS = torch.tensor([0, 1, 2, 1, 0, 1, 2, 1, 0])  # slot 1: the neighbour under test
NEIGHBOUR_ROWS = ROWS[SLOTS == 1]
KEEP = torch.tensor([i for i in range(N_ROWS) if i not in set(NEIGHBOUR_ROWS.tolist())])


@pytest.fixture(scope="module")
def k():
    """The fused kernels; only a machine without a C++ compiler skips (a failed build fails)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the fused-kernel path does not exist here")
    from server.settings import Settings

    module = kernels.load(Settings().kernels_build_dir)
    assert module is not None, "a C++ compiler is present, so the kernels must build"
    return module


def _fits(case, shape) -> bool:
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    try:
        cfg.check_shape("m", *shape)
        method.param_specs(cfg, *shape)
    except Exception:
        return False
    return True


METHOD_CASES = [
    pytest.param(case, shape, id=f"{case.id}-{shape[0]}x{shape[1]}")
    for case in CASES
    for shape in SHAPES
    if _fits(case, shape)
]


def _prepared(method, cfg, params, weight, dtype, bias=None):
    """As the engine installs a slot: prepared from float32 (with the bias where the family's
    tables hold it, IA3), then cast to the serving dtype."""
    extra = {"bias": bias.float()} if method.prepare_uses_bias else {}
    out = method.prepare(cfg, params, weight.float(), **extra)
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in out.items()}


def _assert_near_oracle(y, x, adapters, weight, bias, method, dtype):
    """The well-formed rows of ``y`` against the float64 dense oracle ``x W'ᵀ + b'``.

    Each output is a sum of at most ``in + out`` rounded products (the base GEMM over ``in``, the
    adapter's reductions over ``in`` and ``out``, FFTs a log-depth share of those; in bfloat16 the
    rounded inputs too), each rounding within eps relative to the magnitudes summed:
    ``|err| <= 8 eps (in + out) max_j M_j`` with ``M = |x| |W'|ᵀ + |b'|``.
    """
    out_f, in_f = weight.shape
    eps = torch.finfo(dtype).eps
    for row, slot in zip(ROWS.tolist(), SLOTS.tolist(), strict=True):
        if slot == 1:
            continue
        cfg, params = adapters[slot]
        p64 = {n: t.double() if t.is_floating_point() else t for n, t in params.items()}
        w2, b2 = method.reference_weight(cfg, p64, weight.double(), bias.double())
        x64 = x[row].double()
        ref = x64 @ w2.T + b2
        mag = x64.abs() @ w2.abs().T + b2.abs()
        err = float((y[row].double() - ref).abs().max())
        tol = 8 * eps * (in_f + out_f) * float(mag.max())
        assert err <= tol, f"row {row} (slot {slot}) is {err:.3g} from the float64 oracle (bound {tol:.3g})"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case,shape", METHOD_CASES)
def test_neighbour_slot_never_reaches_other_rows(request, case, shape, path):
    dtype = PATHS[path]
    kern = request.getfixturevalue("k") if path == "kernels" else None
    out_f, in_f = shape
    method = get_method(case.family)
    cfg = method.parse_config(case.raw_config())
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias = torch.randn(out_f, generator=g)
    x = torch.randn(N_ROWS, in_f, generator=g)
    adapters = [(cfg, method.init_params(cfg, weight, "random", g)) for _ in range(3)]
    tables = [_prepared(method, c, p, weight, dtype, bias) for c, p in adapters]
    big_cfg = largest_accepted_config(case.family, case.raw_config())
    big = largest_accepted(case.family, case.raw_config(), {"m": shape}, {"m": weight}, seed=11)
    neighbours = {"accepted": _prepared(method, big_cfg, big.modules["m"], weight, dtype, bias)}
    neighbours |= {name: poisoned(tables[1], v) for name, v in POISONS.items()}
    sig = method.signature(cfg, out_f, in_f)
    w, b, xd = weight.to(dtype), bias.to(dtype), x.to(dtype)

    def run(neighbour_table):
        group = Group(method, sig, stack_prepared([tables[0], neighbour_table, tables[2]]), ROWS, SLOTS)
        if kern is not None:
            group.fused = {h: f for h in group.hooks if (f := fast_op(kern, method, sig, h)) is not None}
        with torch.inference_mode():
            return batched_linear(xd, w, b, [group])

    benign = run(tables[1])
    assert torch.isfinite(benign).all()
    _assert_near_oracle(benign, x, adapters, weight, bias, method, dtype)
    for name, table in neighbours.items():
        y = run(table)
        assert torch.equal(y[KEEP], benign[KEEP]), f"{name} neighbour changed other rows"
        assert not torch.equal(y[NEIGHBOUR_ROWS], benign[NEIGHBOUR_ROWS]), f"{name} neighbour not applied"


# ------------------------------------------------------------------------------------ end to end

E2E_PATHS = {
    "kernels": (torch.float32, True),
    "torch": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
}
PROMPT_W, PROMPT_N = [5, 17, 29, 41, 53], [7, 19, 31, 43, 55]  # one length: no padding either way
NEW_TOKENS = 6


def _run(engine, plan):
    """plan: [(prompt, adapter_id, max_new_tokens)], all admitted in the first step."""
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0), a) for p, a, n in plan]
    for _ in range(200):
        if not (engine.generator.num_running or engine.generator.num_waiting):
            break
        engine.generator.step()
    outs = []
    for req in reqs:
        events = req.sink.drain()
        assert isinstance(events[-1], FinishEvent), events[-1]
        outs.append((events[-1].finish_reason, [e.token_id for e in events if isinstance(e, TokenEvent)]))
    return outs


def _accepted(adapter, shapes, dtype, folder):
    """The adapter as the store's upload validation returns it: proof that it is accepted."""
    adapter.save(folder)
    config = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    return validate_upload(config, weights, shapes, StoreLimits(), table_dtype=dtype).adapter


@pytest.mark.parametrize("path", E2E_PATHS)
@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_well_formed_request_keeps_its_tokens_next_to_the_largest_accepted_adapter(
    request, tmp_path, family, path
):
    dtype, cpu_kernels = E2E_PATHS[path]
    if cpu_kernels:
        request.getfixturevalue("k")  # where a compiler exists the fused kernels must serve
    model = make_tiny_llama().to(dtype)
    engine, reference = make_engine(model, make_tokenizer(), cpu_kernels=cpu_kernels, merged_cache_bytes=0)
    assert (engine.planner.kernels is not None) == cpu_kernels
    shapes = engine.base.module_shapes
    weights = {p: m.base.weight for p, m in engine.base.modules.items()}
    raw = {"peft_type": family.upper(), "target_modules": TARGETS, **FAMILY_CONFIGS[family]}
    well = random_adapter(family, FAMILY_CONFIGS[family], shapes, weights, seed=1)
    benign = random_adapter(family, FAMILY_CONFIGS[family], shapes, weights, seed=2)
    hostile = _accepted(largest_accepted(family, raw, shapes, weights, seed=3), shapes, dtype, tmp_path)
    pools = set()
    for name, adapter in (("well", well), ("benign", benign), ("hostile", hostile)):
        engine.add_adapter(name, adapter)
        pools.add(id(engine.residency.device_entry((name, 1)).pool))
    assert len(pools) == 1  # one slot pool holding all three, the same in every run below

    # Admitted in one prefill; the neighbour stops after one token, so every later step of the
    # well-formed request has the same batch in both runs, whatever happens to the neighbour.
    next_to_benign = _run(engine, [(PROMPT_W, "well", NEW_TOKENS), (PROMPT_N, "benign", 1)])[0]
    next_to_hostile = _run(engine, [(PROMPT_W, "well", NEW_TOKENS), (PROMPT_N, "hostile", 1)])[0]
    assert next_to_benign[0] == next_to_hostile[0] == "length"
    assert next_to_hostile[1] == next_to_benign[1]
    if dtype == torch.float32:  # the merged model alone, greedy (near-ties within float32 rounding)
        alone = merged_copy(reference, well)
        assert_greedy_matches(next_to_hostile[1], alone, PROMPT_W, NEW_TOKENS, "next to the hostile")
        # Decoding side by side too, for as long as the hostile request runs.
        both = _run(engine, [(PROMPT_W, "well", NEW_TOKENS), (PROMPT_N, "hostile", NEW_TOKENS)])[0]
        assert both[0] == "length"
        assert_greedy_matches(both[1], alone, PROMPT_W, NEW_TOKENS, "decoding beside the hostile")


@pytest.mark.parametrize("in_f", [15, 16, 21, 575])
@pytest.mark.parametrize("n_rows", [14, 18, 33])
def test_a_non_finite_row_never_reaches_other_rows_of_a_shared_gemm(in_f, n_rows):
    """``rows_linear``, the shared GEMM of a mixed step: in bfloat16 with an odd input width and 17
    rows or more, oneDNN's AMX GEMM spreads one row's inf to other rows (see its docstring). Here the
    verdict is the same on every CPU: the other rows equal the all-finite run bit for bit."""
    from server.methods.batched import rows_linear

    g = torch.Generator().manual_seed(in_f + n_rows)
    w = torch.randn(21, in_f, generator=g).bfloat16()
    b = torch.randn(21, generator=g).bfloat16()
    x = torch.randn(n_rows, in_f, generator=g).bfloat16()
    with torch.inference_mode():
        clean = rows_linear(x, w, b)
        torch.testing.assert_close(
            clean, torch.nn.functional.linear(x, w, b), rtol=2**-7, atol=2**-7 * in_f**0.5
        )
        for bad in (float("inf"), float("nan")):
            poisoned = x.clone()
            poisoned[1] = bad
            y = rows_linear(poisoned, w, b)
            keep = [i for i in range(n_rows) if i != 1]
            assert torch.equal(y[keep], clean[keep]), f"{bad} in row 1 changed other rows"
            assert not torch.isfinite(y[1]).all()
