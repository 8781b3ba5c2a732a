"""benchmarks.halt_poll: the model of a KVM vCPU's halt polling that benchmarks/blk's
interrupt-driven driver waits with. Its window must move as kvm_vcpu_halt moves it
(Documentation/virt/kvm/halt-polling.rst), or the benchmark models a guest KVM never runs."""

from __future__ import annotations

import os
import select
import threading

from benchmarks.halt_poll import HaltPoll, HaltPollParams

US = 1000
PARAMS = HaltPollParams(max_ns=200 * US, grow=2, grow_start=10 * US, shrink=2)


def test_window_grows_from_grow_start_doubles_and_stops_at_halt_poll_ns():
    hp = HaltPoll(PARAMS)
    assert hp.window_ns == 0                      # a vCPU starts without polling
    steps = []
    for _ in range(7):
        hp._adapt(199 * US)                       # short halts the window missed
        steps.append(hp.window_ns // US)
    assert steps == [10, 20, 40, 80, 160, 200, 200]


def test_wakeup_inside_the_window_leaves_it():
    hp = HaltPoll(PARAMS)
    hp.window_ns = 40 * US
    hp._adapt(39 * US)
    assert hp.window_ns == 40 * US


def test_long_halt_shrinks_and_below_grow_start_drops_to_zero():
    hp = HaltPoll(PARAMS)
    hp.window_ns = 80 * US
    seen = []
    for _ in range(4):
        hp._adapt(5_000 * US)                     # longer than halt_poll_ns
        seen.append(hp.window_ns // US)
    assert seen == [40, 20, 10, 0]
    hp._adapt(5_000 * US)                         # no window: a long halt changes nothing
    assert hp.window_ns == 0


def test_halt_poll_ns_zero_never_polls():
    hp = HaltPoll(HaltPollParams(max_ns=0))
    for _ in range(3):
        hp._adapt(5 * US)
    assert hp.window_ns == 0


def _eventfd_poller():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return fd, poller


def test_wait_polls_inside_the_window_and_sleeps_without_one():
    fd, poller = _eventfd_poller()
    try:
        hp = HaltPoll(PARAMS)
        os.eventfd_write(fd, 1)
        assert hp.wait(poller, 1.0)                 # no window yet: a sleep (that returns)
        assert (hp.sleeps, hp.polled_wakeups) == (1, 0)
        # a short halt grows the window (one longer than 200 µs, if this process was
        # preempted, leaves it at 0)
        assert hp.window_ns in (0, 10 * US)
        os.eventfd_read(fd)
        hp.window_ns = 10**9                        # long enough to see the signal
        timer = threading.Timer(0.01, os.eventfd_write, (fd, 1))
        timer.start()
        assert hp.wait(poller, 5.0)
        timer.join()
        assert (hp.sleeps, hp.polled_wakeups) == (1, 1)
    finally:
        os.close(fd)


def test_wait_times_out_when_no_interrupt_comes():
    fd, poller = _eventfd_poller()
    try:
        hp = HaltPoll(PARAMS)
        hp.window_ns = 20 * US
        assert not hp.wait(poller, 0.02)
        assert hp.sleeps == 1
    finally:
        os.close(fd)


def test_parameters_come_from_the_kvm_module_or_kvm_defaults(tmp_path):
    for name, value in (("halt_poll_ns", 50000), ("halt_poll_ns_grow", 3),
                        ("halt_poll_ns_grow_start", 5000), ("halt_poll_ns_shrink", 0)):
        (tmp_path / name).write_text(f"{value}\n")
    params, where = HaltPollParams.from_host(tmp_path)
    assert params == HaltPollParams(max_ns=50000, grow=3, grow_start=5000, shrink=0)
    assert str(tmp_path) in where
    params, where = HaltPollParams.from_host(tmp_path / "absent")
    assert params == HaltPollParams() and "default" in where
    hp = HaltPoll(HaltPollParams(max_ns=50000, grow=3, grow_start=5000, shrink=0))
    hp.window_ns = 45000
    hp._adapt(60000)                              # shrink 0: straight to no polling
    assert hp.window_ns == 0


def test_polling_stops_when_another_task_wants_the_cpu():
    fd, poller = _eventfd_poller()
    try:
        asked = []
        hp = HaltPoll(PARAMS, contended=lambda: asked.append(1) or True)
        hp.window_ns = 10**9                        # would poll for a second
        timer = threading.Timer(0.05, os.eventfd_write, (fd, 1))
        timer.start()
        assert hp.wait(poller, 5.0)
        timer.join()
        assert (hp.sleeps, hp.polled_wakeups, len(asked)) == (1, 0, 1)   # 8 spins, one look
    finally:
        os.close(fd)


def test_runnable_tasks_reads_nr_running_against_the_cpus(tmp_path):
    from benchmarks.halt_poll import RunnableTasks

    loadavg = tmp_path / "loadavg"
    rt = RunnableTasks(str(loadavg))                  # absent: never contended
    assert not rt()
    cpus = os.cpu_count()
    loadavg.write_text(f"0.10 0.20 0.30 {cpus}/300 4242\n")
    rt = RunnableTasks(str(loadavg))
    assert not rt()
    loadavg.write_text(f"0.10 0.20 0.30 {cpus + 1}/300 4242\n")
    assert rt()
    rt.close()
    real = RunnableTasks()                              # the real /proc/loadavg parses
    try:
        assert real.fd >= 0 and isinstance(real(), bool)
    finally:
        real.close()


def test_an_interrupt_already_pending_is_no_sleep_and_leaves_the_window():
    fd, poller = _eventfd_poller()
    try:
        hp = HaltPoll(PARAMS)
        hp.window_ns = 40 * US
        os.eventfd_write(fd, 1)
        assert hp.wait(poller, 1.0)
        assert (hp.sleeps, hp.polled_wakeups, hp.window_ns) == (0, 1, 40 * US)
    finally:
        os.close(fd)
