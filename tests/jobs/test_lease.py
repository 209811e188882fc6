"""Runner ids and their liveness, and the lease heartbeat (``server.jobs.lease``): no timing
asserts; the heartbeat is observed through events it sets."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from server.jobs.lease import Heartbeat, local_runner_id, runner_is_dead


def test_a_runner_on_this_host_is_dead_once_its_process_is_gone():
    me = local_runner_id()
    host_ns = me.rsplit(":", 1)[0]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process (until reused, which only makes it look alive)
    assert runner_is_dead(f"{host_ns}:{child.pid}", me) or os.path.exists(f"/proc/{child.pid}")
    assert not runner_is_dead(f"{host_ns}:{os.getppid()}", me)  # alive
    assert not runner_is_dead(f"other-host:{me.split(':')[1]}:{child.pid}", me)  # trusted: lease only
    assert not runner_is_dead("replica-b", me)  # a configured name: lease only
    assert runner_is_dead(me, me)  # an earlier runner of this very process
    assert runner_is_dead(None, me)  # a row from before leases


def test_the_heartbeat_renews_reports_a_cancel_once_and_stops_when_the_lease_is_lost():
    answers = iter([(True, False), (True, True), (True, True), (False, False)])
    renewals, cancelled, lost = [], threading.Event(), threading.Event()
    cancels = []

    def renew():
        renewals.append(1)
        return next(answers)

    def on_cancel():
        cancels.append(1)
        cancelled.set()

    with Heartbeat(renew, 0.001, on_lost=lost.set, on_cancel=on_cancel):
        assert lost.wait(30) and cancelled.is_set()
    assert len(renewals) == 4 and cancels == [1]  # no beat after the loss; one cancel call


def test_a_failing_renewal_is_retried_at_the_next_beat():
    calls = []
    held = threading.Event()

    def renew():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("index away")
        held.set()
        return True, False

    with Heartbeat(renew, 0.001, on_lost=lambda: None, on_cancel=lambda: None):
        assert held.wait(30)
    assert len(calls) >= 2
