"""The process runner against real processes: exit codes, timeouts, pipefail, EOF ownership."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

from labkeeper import process
from labkeeper.errors import (
    CommandError,
    CommandNotFound,
    CommandTimeout,
    PipelineError,
    is_transient,
)
from labkeeper.process import ExitCode, ExitCodeTable, Stage
from labkeeper.secrets import REDACTOR, register
from tests.fixtures.procs import gone, io_bytes, start_time
from tests.fixtures.waiting import wait_until

PY = sys.executable


def test_successful_command_returns_frozen_result_with_output():
    res = process.run(("echo", "hello"), timeout=5)
    assert res.returncode == 0 and res.stdout == "hello\n" and res.ok
    with pytest.raises(AttributeError):
        res.returncode = 1  # type: ignore[misc]


def test_nonzero_exit_raises_typed_error_with_code_and_stderr_tail():
    script = "import sys\nfor i in range(50): print('line', i, file=sys.stderr)\nsys.exit(4)"
    with pytest.raises(CommandError) as info:
        process.run((PY, "-c", script), timeout=10)
    err = info.value
    assert err.returncode == 4
    assert "unknown exit code 4" in err.meaning
    assert err.stderr_tail.splitlines()[-1] == "line 49"
    assert len(err.stderr_tail.splitlines()) == process.STDERR_TAIL_LINES
    assert not is_transient(err)


def test_exit_code_table_maps_warning_and_transient_codes():
    table = ExitCodeTable("tool", {0: ExitCode("ok", "ok"), 3: ExitCode("partial", "warning"),
                                   11: ExitCode("locked", "transient")})
    res = process.run((PY, "-c", "raise SystemExit(3)"), timeout=10, codes=table)
    assert res.warning and res.ok and res.meaning == "partial"
    with pytest.raises(CommandError) as info:
        process.run((PY, "-c", "raise SystemExit(11)"), timeout=10, codes=table)
    assert is_transient(info.value) and info.value.meaning == "locked"


def test_check_false_returns_failed_result_instead_of_raising():
    res = process.run(("false",), timeout=5, check=False)
    assert res.returncode == 1 and not res.ok


def test_timeout_kills_the_process_group_and_raises_transient_timeout():
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        # The child spawns a grandchild; both must die with the group.
        process.run(("sh", "-c", "sleep 30 & sleep 30"), timeout=0.5)
    assert time.monotonic() - started < 5
    assert is_transient(info.value)


def test_missing_program_raises_command_not_found():
    with pytest.raises(CommandNotFound):
        process.run(("labkeeper-no-such-program",), timeout=5)


@pytest.mark.parametrize("bad", ["echo hi", b"echo", (), ("echo", None)])
def test_argv_must_be_a_tuple_of_strings(bad):
    with pytest.raises((TypeError, ValueError)):
        process.run(bad, timeout=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, None])
def test_timeout_is_required_and_positive(timeout):
    with pytest.raises(ValueError, match="timeout"):
        process.run(("true",), timeout=timeout)  # type: ignore[arg-type]


def test_streaming_line_callbacks_see_every_line_as_it_arrives():
    seen: list[str] = []
    process.run((PY, "-c", "for i in range(1000): print(i)"), timeout=10,
                on_stdout_line=seen.append)
    assert seen == [str(i) for i in range(1000)]


def test_input_is_fed_to_stdin():
    res = process.run(("wc", "-c"), timeout=5, input=b"x" * 100_000)
    assert res.stdout.strip() == "100000"


def test_secret_values_are_masked_in_result_and_error_but_reach_the_child_by_env():
    secret = "s3cr3t-value-for-runner-test"
    register(secret)
    script = ("import os,sys; v=os.environ['TOKEN']; print(v); print(v, file=sys.stderr);"
              " sys.exit(2)")
    with pytest.raises(CommandError) as info:
        process.run((PY, "-c", script), timeout=10, env={"TOKEN": secret})
    assert secret not in str(info.value) and secret not in info.value.stderr_tail
    assert "********" in info.value.stderr_tail
    res = process.run((PY, "-c", script), timeout=10, env={"TOKEN": secret}, check=False)
    assert secret not in res.stdout and secret not in res.stderr
    assert secret in REDACTOR


def test_pipeline_streams_bytes_between_stages_intact(tmp_path: Path):
    data = os.urandom(5 * 1024 * 1024)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    res = process.pipeline([("cat", str(src)), ("sha256sum",)], timeout=20)
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert res.bytes_relayed == (len(data),)


def test_three_stage_pipeline_succeeds_only_when_all_stages_do(tmp_path: Path):
    res = process.pipeline([("seq", "1", "100000"), ("grep", "7"), ("wc", "-l")], timeout=20)
    assert int(res.stdout) == sum("7" in str(i) for i in range(1, 100001))


def _consumer_script(marker: Path) -> str:
    # Counts bytes and records whether it ever saw a clean EOF.
    return (
        "import sys\n"
        "n = 0\n"
        "while True:\n"
        "    b = sys.stdin.buffer.read(65536)\n"
        "    if not b: break\n"
        "    n += len(b)\n"
        f"open({str(marker)!r}, 'w').write(str(n))\n"
    )


def test_producer_killed_mid_stream_fails_pipeline_and_consumer_never_sees_eof(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    producer = ("sh", "-c", "head -c 3000000 /dev/zero; kill -9 $$")
    with pytest.raises(PipelineError) as info:
        process.pipeline([producer, (PY, "-c", _consumer_script(marker))], timeout=20)
    err = info.value
    assert err.first.argv[0] == "sh"
    assert err.first.returncode == -9
    assert not marker.exists(), "the consumer saw a clean EOF of a truncated stream"
    consumer_err = [f for f in err.failures if f.argv[0] == PY]
    assert consumer_err and "stage 1 (sh) failed" in consumer_err[0].meaning


def test_producer_failing_with_exit_code_never_gives_consumer_eof(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    producer = ("sh", "-c", "echo partial; echo 'pg_dump: error: connection lost' >&2; exit 1")
    with pytest.raises(PipelineError) as info:
        process.pipeline([producer, (PY, "-c", _consumer_script(marker))], timeout=20)
    assert info.value.first.returncode == 1
    assert "connection lost" in str(info.value)
    assert not marker.exists()


def test_producer_killed_externally_while_streaming_is_detected(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    pidfile = tmp_path / "pid"
    tmp = tmp_path / "pid.tmp"
    producer = (PY, "-c",
                f"import os,sys,time\nopen({str(tmp)!r},'w').write(str(os.getpid()))\n"
                f"os.replace({str(tmp)!r}, {str(pidfile)!r})\n"  # whole, or not there
                "while True:\n    sys.stdout.buffer.write(b'x'*65536); sys.stdout.flush();"
                          " time.sleep(0.01)")
    import threading

    killed: list[int] = []

    def killer() -> None:
        wait_until(pidfile.exists, timeout=60, what="the producer's pid file")
        pid = int(pidfile.read_text())
        # streaming: it wrote 4x a pipe's capacity, so the consumer has been reading
        wait_until(lambda: io_bytes(pid, "wchar") >= 4 << 16, timeout=60,
                   what="the producer to stream")
        os.kill(pid, 9)
        killed.append(pid)

    t = threading.Thread(target=killer)
    t.start()
    with pytest.raises(PipelineError) as info:
        process.pipeline([producer, (PY, "-c", _consumer_script(marker))], timeout=120)
    t.join()
    assert killed, "the producer was not killed"
    assert info.value.first.returncode == -9
    assert not marker.exists()


def test_consumer_exiting_early_fails_the_pipeline_and_stops_the_producer():
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        process.pipeline([("yes",), ("head", "-n", "1")], timeout=20)
    assert time.monotonic() - started < 10
    producer = info.value.failures[0]
    assert producer.argv == ("yes",)
    assert "stopped reading" in producer.meaning


def test_consumer_failing_is_reported_as_the_cause_and_producer_is_stopped():
    with pytest.raises(PipelineError) as info:
        process.pipeline([("yes",),
                          ("sh", "-c", "read x; echo 'Fatal: wrong password' >&2; exit 12")],
                         timeout=20)
    assert info.value.first.returncode == 12
    assert "wrong password" in str(info.value)


def test_pipeline_timeout_kills_every_stage_and_is_transient(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        process.pipeline([("sleep", "30"), (PY, "-c", _consumer_script(marker))], timeout=0.5)
    assert time.monotonic() - started < 6
    assert is_transient(info.value)
    assert isinstance(info.value.first, CommandTimeout)
    assert not marker.exists()


def test_stage_environment_is_per_stage():
    res = process.pipeline(
        [Stage(("sh", "-c", 'printf %s "$A"'), env={"A": "one"}),
         Stage(("sh", "-c", 'cat; printf %s "-$A"'), env={"A": "two"})],
        timeout=10,
    )
    assert res.stdout == "one-two"


def test_children_do_not_inherit_our_argv_secrets_because_argv_has_none(tmp_path: Path):
    # The runner logs argv redacted; argv itself must never carry secrets, so a
    # secret passed by env is absent from /proc/<pid>/cmdline while it runs.
    secret = "argv-check-secret-9f8e7d"
    register(secret)
    out = tmp_path / "cmdline"
    script = f"import os; open({str(out)!r}, 'wb').write(open('/proc/self/cmdline','rb').read())"
    process.run((PY, "-c", script), timeout=10, env={"S": secret})
    assert secret.encode() not in out.read_bytes()


def _environ_of(path: Path) -> dict[str, str]:
    pairs = [e.split(b"=", 1) for e in path.read_bytes().split(b"\0") if e]
    return {k.decode(): v.decode() for k, v in pairs}


_DUMP_ENVIRON = "import sys; open(sys.argv[1], 'wb').write(open('/proc/self/environ', 'rb').read())"


def test_a_secret_in_our_environment_is_absent_from_a_childs_environ(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LK_WORKER_SECRET", "worker-env-secret-5a4b3c")
    monkeypatch.setenv("LC_TIME", "C.UTF-8")
    out = tmp_path / "environ"
    process.run((PY, "-c", _DUMP_ENVIRON, str(out)), timeout=10, env={"GIVEN": "yes"})
    env = _environ_of(out)
    assert "LK_WORKER_SECRET" not in env
    assert b"worker-env-secret-5a4b3c" not in out.read_bytes()
    assert env["GIVEN"] == "yes"  # what the caller passes arrives
    assert env["PATH"] == os.environ["PATH"] and env["LC_TIME"] == "C.UTF-8"


def test_pipeline_stages_and_coprocesses_do_not_inherit_a_secret_either(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LK_WORKER_SECRET", "worker-env-secret-6d7e8f")
    out = tmp_path / "environ"
    process.pipeline([("echo", "x"), (PY, "-c", _DUMP_ENVIRON, str(out))], timeout=10)
    assert b"worker-env-secret-6d7e8f" not in out.read_bytes()
    co_out = tmp_path / "co-environ"
    co = process.Coprocess((PY, "-c", _DUMP_ENVIRON, str(co_out)))
    assert co.close(timeout=10) == 0
    environ = co_out.read_bytes()
    assert b"worker-env-secret-6d7e8f" not in environ and b"PATH=" in environ


def test_a_variable_named_in_labkeeper_child_env_is_passed_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GOMAXPROCS", "1")
    monkeypatch.setenv(process.EXTRA_ENV_VARIABLE, "GOMAXPROCS")
    out = tmp_path / "environ"
    process.run((PY, "-c", _DUMP_ENVIRON, str(out)), timeout=10)
    assert _environ_of(out)["GOMAXPROCS"] == "1"


def test_timed_out_command_fails_even_if_it_exits_zero_on_sigterm():
    with pytest.raises(CommandTimeout):
        process.run(("sh", "-c", 'trap "exit 0" TERM; sleep 5 & wait'), timeout=0.5)


def test_output_beyond_the_capture_limit_is_cut_and_flagged():
    res = process.run(("head", "-c", str(process.CAPTURE_LIMIT + 5_000_000), "/dev/zero"),
                      timeout=20)
    assert res.truncated
    assert len(res.stdout) <= process.CAPTURE_LIMIT


def test_children_left_holding_the_pipes_do_not_hang_the_runner():
    started = time.monotonic()
    res = process.run(("sh", "-c", "sleep 60 & echo done"), timeout=30)
    assert res.stdout == "done\n"
    assert time.monotonic() - started < process.LINGER_GRACE + 3


def test_input_and_stdin_fd_together_are_refused():
    with pytest.raises(ValueError, match="either"):
        process.run(("cat",), timeout=5, input=b"x", stdin_fd=0)


# -- end-of-stream gate, stall timeout, coprocess ------------------------------------------

TRAILER = b"-- stream complete\n"


def _trailer_gate(tail: bytes, nbytes: int) -> str | None:
    return None if tail.endswith(TRAILER) else f"no trailer in the last {len(tail)} bytes"


def test_gate_refusing_a_cleanly_exited_producer_withholds_eof_and_reports_the_refusal(
        tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    producer = Stage(("sh", "-c", "head -c 200000 /dev/zero; exit 0"), eof_gate=_trailer_gate)
    stages = [producer, Stage((PY, "-c", _consumer_script(marker)))]
    res = process.pipeline(stages, timeout=20, check=False)
    assert not marker.exists(), "the consumer saw EOF of a stream the gate refused"
    assert res.refused == ("no trailer in the last 4096 bytes",)
    assert res.eof_given == (False,) and res.bytes_relayed == (200000,)
    assert res.cause == 0 and not res.ok
    prod, cons = res.stages
    assert prod.returncode == 0 and prod.outcome == "permanent"
    assert prod.meaning == "refused at end of stream: no trailer in the last 4096 bytes"
    assert cons.returncode == -9 and "refused at end of stream" in cons.meaning
    with pytest.raises(PipelineError) as info:
        process.pipeline(stages, timeout=20)
    assert info.value.first.argv[0] == "sh" and not is_transient(info.value)
    assert "refused at end of stream: no trailer" in str(info.value)


def test_gate_accepting_the_stream_gives_eof_and_sees_its_tail_and_length(tmp_path: Path):
    data = os.urandom(3 * 1024 * 1024) + TRAILER
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    seen: list[tuple[bytes, int]] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        seen.append((tail, nbytes))
        return _trailer_gate(tail, nbytes)

    res = process.pipeline([Stage(("cat", str(src)), eof_gate=gate), ("sha256sum",)],
                           timeout=20)
    # sha256sum prints only after EOF: the consumer got its end-of-stream.
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert seen == [(data[-process.GATE_TAIL_BYTES:], len(data))]
    assert res.eof_given == (True,) and res.refused == (None,)
    assert res.bytes_relayed == (len(data),) and res.cause is None and res.ok


def _counting_splice(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None
                     ) -> list[int]:
    """os.splice, counting the bytes it moves; raising EINVAL once ``fail_after`` calls
    have moved data (0: at the first call)."""
    real = os.splice
    moved: list[int] = []

    def splice(src: int, dst: int, count: int, *args: object) -> int:
        if fail_after is not None and len(moved) >= fail_after:
            raise OSError(22, "Invalid argument")
        n = real(src, dst, count, *args)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", splice)
    return moved


def test_gated_relay_splices_all_but_the_streams_end_and_the_gate_sees_the_true_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = os.urandom(24 * 1024 * 1024) + TRAILER
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    moved = _counting_splice(monkeypatch)
    seen: list[tuple[bytes, int]] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        seen.append((tail, nbytes))
        return _trailer_gate(tail, nbytes)

    res = process.pipeline([Stage(("cat", str(src)), eof_gate=gate), ("sha256sum",)],
                           timeout=60)
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert seen == [(data[-process.GATE_TAIL_BYTES:], len(data))]
    # zero-copy for the bulk: at most a few tails' worth went through userspace per burst
    assert sum(moved) >= 0.9 * len(data), f"spliced {sum(moved)} of {len(data)}"
    assert res.bytes_relayed == (len(data),) and res.eof_given == (True,)


def test_gated_relay_where_splice_is_refused_copies_and_still_gates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = os.urandom(2 * 1024 * 1024) + TRAILER
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    moved = _counting_splice(monkeypatch, fail_after=0)
    seen: list[int] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        seen.append(nbytes)
        return _trailer_gate(tail, nbytes)

    res = process.pipeline([Stage(("cat", str(src)), eof_gate=gate), ("sha256sum",)],
                           timeout=60)
    assert moved == []
    assert res.stdout.split()[0] == hashlib.sha256(data).hexdigest() and seen == [len(data)]


def test_gated_relay_whose_splice_breaks_mid_stream_withholds_eof(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    marker = tmp_path / "consumer-saw-eof"
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(8 * 1024 * 1024) + TRAILER)
    moved = _counting_splice(monkeypatch, fail_after=1)
    stages = [Stage(("cat", str(src)), eof_gate=_trailer_gate),
              ("sh", "-c", f"cat >/dev/null && touch {marker}")]
    res = process.pipeline(stages, timeout=60, check=False)
    assert len(moved) == 1
    assert not marker.exists(), "the consumer saw EOF of a stream the relay lost track of"
    assert res.eof_given == (False,) and not res.ok
    assert res.refused[0] is not None and "splice stopped working" in res.refused[0]


def test_gate_is_not_consulted_when_the_producer_fails(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"
    called: list[int] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        called.append(nbytes)
        return None

    producer = Stage(("sh", "-c", "printf partial; exit 1"), eof_gate=gate)
    with pytest.raises(PipelineError) as info:
        process.pipeline([producer, (PY, "-c", _consumer_script(marker))], timeout=20)
    assert called == [] and not marker.exists()
    assert info.value.first.returncode == 1


def test_gate_raising_counts_as_a_refusal(tmp_path: Path):
    marker = tmp_path / "consumer-saw-eof"

    def gate(tail: bytes, nbytes: int) -> str | None:
        raise RuntimeError("gate broke")

    res = process.pipeline([Stage(("echo", "x"), eof_gate=gate),
                            (PY, "-c", _consumer_script(marker))], timeout=20, check=False)
    assert res.refused == ("gate error: gate broke",) and not marker.exists()


def test_gate_on_the_last_stage_is_refused():
    with pytest.raises(ValueError, match="eof_gate"):
        process.pipeline([("true",), Stage(("cat",), eof_gate=_trailer_gate)], timeout=5)


@pytest.mark.parametrize("gated", [False, True], ids=["splice", "gated"])
def test_consumer_that_stops_reading_is_killed_after_the_stall_timeout_as_transient(
        tmp_path: Path, gated: bool):
    marker = tmp_path / "consumer-saw-eof"
    # Reads a little, then hangs without reading (a backend that went away).
    consumer = (PY, "-c", f"import sys,time\nsys.stdin.buffer.read(1000)\n"
                          f"time.sleep(60)\nopen({str(marker)!r}, 'w').write('eof')\n")
    producer = Stage(("head", "-c", "50000000", "/dev/zero"),
                     eof_gate=_trailer_gate if gated else None)
    started = time.monotonic()
    res = process.pipeline([producer, consumer], timeout=30, stall_timeout=1.0, check=False)
    assert time.monotonic() - started < 8
    assert res.stalled and not res.timed_out and res.eof_given == (False,)
    prod, cons = res.stages
    assert cons.returncode == -9 and cons.outcome == "transient"
    assert cons.meaning == f"killed: stalled: stage 2 ({PY}) accepted no data for 1s"
    assert prod.outcome == "transient" and prod.meaning.startswith("killed: stalled")
    assert not marker.exists()
    with pytest.raises(PipelineError) as info:
        process.pipeline([producer, consumer], timeout=30, stall_timeout=1.0)
    assert is_transient(info.value) and "stalled" in str(info.value)


def test_a_slow_producer_is_not_a_stall():
    # No byte moves for longer than stall_timeout, but the consumer is not to blame.
    res = process.pipeline([("sh", "-c", "sleep 1.5; echo done"), ("cat",)], timeout=20,
                           stall_timeout=0.5)
    assert res.stdout == "done\n" and not res.stalled and res.eof_given == (True,)


def test_coprocess_talks_over_pipes_and_closes_cleanly():
    cp = process.Coprocess((PY, "-u", "-c",
                            "import sys\nfor line in sys.stdin: print(line.strip().upper())\n"
                            "print('bye', file=sys.stderr)"))
    cp.stdin.write(b"hello\n")
    cp.stdin.flush()
    assert cp.stdout.readline() == b"HELLO\n"
    assert cp.close(timeout=10) == 0
    res = cp.result()
    assert res.ok and res.stderr == "bye\n"


def test_coprocess_kill_stops_its_process_group_and_missing_program_is_not_found():
    cp = process.Coprocess(("sh", "-c", "sleep 60 & sleep 60"))
    assert cp.wait(timeout=0.2) is None
    assert cp.close(kill=True) == -9
    with pytest.raises(CommandNotFound):
        process.Coprocess(("labkeeper-no-such-program",))



def _autogroup_nice(pid: int) -> int | None:
    """The niceness of ``pid``'s autogroup; None where autogroup scheduling does not
    apply to it (no such kernel feature, or the process sits in a CPU cgroup of its
    own, where the kernel shows an empty file and shares CPU by cgroup instead)."""
    try:
        fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    except OSError:
        return None
    return int(fields[-1]) if fields else None


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_a_niced_coprocess_yields_in_its_own_autogroup_until_given_full_priority():
    """Each child starts its own session, and with autogroup scheduling every session
    is a group sharing the CPU equally: niceness alone would leave a niced child a
    whole group's share. Its group gets the niceness too; ours does not change; once
    its work is what the run waits for, it is back at normal priority. (Inside a CPU
    cgroup autogroup does not apply: the child's own niceness is what counts there,
    and that part is checked everywhere.)"""
    ours = _autogroup_nice(os.getpid())
    cp = process.Coprocess(("cat",), nice=19)
    plain = process.Coprocess(("cat",))
    try:
        wait_until(lambda: Path(f"/proc/{cp.pid}/exe").resolve().name == "cat",
                   timeout=10, what="the niced child to exec cat")
        wait_until(lambda: Path(f"/proc/{plain.pid}/exe").resolve().name == "cat",
                   timeout=10, what="the plain child to exec cat")
        assert _nice(cp.pid) == 19 and _nice(plain.pid) == 0
        if ours is not None:
            assert _autogroup_nice(cp.pid) == 19
            assert _autogroup_nice(plain.pid) == 0
            assert _autogroup_nice(os.getpid()) == ours
        cp.full_priority()  # its work is now on the critical path
        if ours is not None:
            assert _autogroup_nice(cp.pid) == 0
        if os.geteuid() == 0:  # lowering a thread's niceness takes CAP_SYS_NICE
            assert _nice(cp.pid) == 0
    finally:
        cp.close(kill=True)
        plain.close(kill=True)


def test_a_consumer_never_sees_end_of_stream_when_the_runner_itself_is_killed(tmp_path):
    """SIGKILL of the process running a pipeline (OOM killer, a worker killed): the
    consumer is killed with it (pdeathsig) instead of reading a clean EOF and, like
    restic, finalizing whatever it got."""
    import signal
    import subprocess

    eof_seen = tmp_path / "consumer-saw-eof"
    got_data = tmp_path / "consumer-got-data"  # holds the consumer's pid
    producer_pid = tmp_path / "producer-pid"
    # The consumer says when the producer's data reached it (mid-stream: the producer
    # keeps its end open), reads on to end-of-stream and records whether it got one.
    consumer_sh = (f"head -c 4 >/dev/null && echo $$ > {got_data}.tmp && "
                   f"mv {got_data}.tmp {got_data}; cat >/dev/null; touch {eof_seen}")
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from labkeeper import process
producer = process.Stage(("sh", "-c", "echo $$ > {producer_pid}; printf data; exec sleep 300"))
consumer = process.Stage(("sh", "-c", {consumer_sh!r}))
process.pipeline([producer, consumer], timeout=600)
"""
    runner = subprocess.Popen((PY, "-c", script), start_new_session=True)
    try:
        wait_until(got_data.exists, timeout=60, what="the consumer to get the data")
        consumer = int(got_data.read_text())
        consumer_started = start_time(consumer)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(10)
        # The consumer ends either way: killed with its runner, or at the end-of-stream
        # our death gave it (the relay's end of its stdin closed), after the touch. Once
        # it is gone, eof_seen is final: no time window to guess.
        wait_until(lambda: gone(consumer, consumer_started), timeout=60,
                   what="the consumer to end after its runner")
        assert not eof_seen.exists(), "the consumer read a clean end-of-stream"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(producer_pid.read_text()), signal.SIGKILL)  # its own session
