"""How ``server.kernels.load`` falls back: the OpenMP build first, then a single-threaded build,
then none (the torch code). The compiler is replaced here; test_kernels.py builds the real one."""

from __future__ import annotations

from server import kernels


def _fake_builds(monkeypatch, fails_with_openmp: bool, fails_without: bool):
    calls = []

    def build(folder, cflags, ldflags, verbose):
        openmp = "-fopenmp" in cflags
        calls.append((openmp, "-fopenmp" in ldflags))
        if (openmp and fails_with_openmp) or (not openmp and fails_without):
            raise RuntimeError("Error building extension 'facet_adapters_cpu'")
        return f"module built {'with' if openmp else 'without'} OpenMP"

    monkeypatch.setattr(kernels, "_build", build)
    return calls


def test_the_openmp_build_is_tried_first_and_kept(monkeypatch, tmp_path):
    calls = _fake_builds(monkeypatch, fails_with_openmp=False, fails_without=False)
    assert kernels.load(tmp_path) == "module built with OpenMP"
    assert calls == [(True, True)]
    assert kernels.load(tmp_path) == "module built with OpenMP" and len(calls) == 1, "loaded once"


def test_a_compiler_without_openmp_still_gets_the_kernels(monkeypatch, tmp_path, caplog):
    calls = _fake_builds(monkeypatch, fails_with_openmp=True, fails_without=False)
    assert kernels.load(tmp_path) == "module built without OpenMP"
    assert calls == [(True, True), (False, False)]
    assert "building them single-threaded" in caplog.text


def test_no_build_at_all_serves_the_torch_code(monkeypatch, tmp_path, caplog):
    calls = _fake_builds(monkeypatch, fails_with_openmp=True, fails_without=True)
    assert kernels.load(tmp_path) is None
    assert len(calls) == 2
    assert "using the torch code" in caplog.text
