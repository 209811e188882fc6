"""Intra-op threads: the engine thread and training jobs' own threads are parallel, others serial."""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine import threads
from server.engine.requests import SamplingParams

from .helpers import make_engine


@pytest.fixture
def configured():
    before = threads._count
    threads.configure(3)
    yield 3
    threads.configure(before)


def test_run_parallel_runs_in_a_thread_of_its_own_with_the_configured_count(configured):
    def probe(x):
        return x + 1, threading.current_thread().name, torch.get_num_threads()

    value, name, n = threads.run_parallel(probe, 41, name="facet-test-job")
    assert value == 42 and name == "facet-test-job" and n == configured
    assert not any(t.name == "facet-test-job" for t in threading.enumerate())  # its pool is gone


def test_run_parallel_raises_what_the_function_raised(configured):
    def boom():
        raise ValueError("from the job")

    with pytest.raises(ValueError, match="from the job"):
        threads.run_parallel(boom)


def test_serial_leaves_this_thread_one_intra_op_thread():
    seen = []

    def worker():
        threads.serial()
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]


def test_the_engine_thread_runs_with_the_configured_count(tiny_llama, configured):
    model, tok = tiny_llama
    engine, _ = make_engine(model, tok)
    forward = engine.generator.forward
    seen = []

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(*args, **kwargs)

    engine.generator.forward = recording
    engine.start()
    try:
        events = list(engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0)).sink)
    finally:
        engine.stop()
    assert events[-1].finish_reason == "length"
    assert seen and all(s == ("facet-engine", configured) for s in seen)
