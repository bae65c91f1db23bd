"""What `make run` does with what earlier runs left (serve.run.lifecycle.decide_start, pure) and how it knows the app
that answers /readyz is the one it deployed (serve.run.main.is_this_app)."""

import os
import subprocess
import sys

from serve.run.lifecycle import Proc, RunRecord, RunSeen, decide_start, proc_alive, read_records, record_path
from serve.run.main import is_this_app

NOW = 1_800_000_000.0


def seen(run_id="r1", wrapper=False, supervisor=False, alive=(), started=NOW - 120):
    rec = RunRecord(run_id=run_id, wrapper=Proc(4242, 1.0), supervisor=Proc(4243, 1.0), config="/x/deploy.yaml",
                    port=8000, started_at=started)
    return RunSeen(f"/state/run-{run_id}.json", rec, wrapper, supervisor, tuple(alive))


def test_nothing_there_starts_clean():
    p = decide_start([], [], None, None, NOW)
    assert p.refuse is None and not p.stop and not p.forget and not p.remove_stale_file and not p.messages


def test_a_live_make_run_is_refused_with_its_pid_and_the_fix():
    p = decide_start([seen(wrapper=True, supervisor=True, alive=(10, 11))], [], None, None, NOW)
    assert p.refuse and "wrapper pid 4242" in p.refuse and "port 8000" in p.refuse and "120 s ago" in p.refuse
    assert "kill 4242" in p.refuse and not p.stop


def test_an_orphan_is_stopped_and_named():
    p = decide_start([seen(alive=(31, 30, 32))], [], None, None, NOW)
    assert p.stop == (("r1", (30, 31, 32)),) and p.forget == ("/state/run-r1.json",)
    assert "pids 30, 31, 32" in p.messages[0] and "wrapper pid 4242" in p.messages[0]
    # the orphan's cluster file goes with it: nothing else backs it once the orphan is stopped
    assert decide_start([seen(alive=(30,))], [], None, "127.0.0.1:6379", NOW).remove_stale_file


def test_a_run_still_stopping_is_waited_for():
    p = decide_start([seen(supervisor=True, alive=(30,))], [], None, None, NOW)
    assert p.wait_for == ("r1",) and not p.stop


def test_a_record_with_nothing_alive_is_forgotten_silently():
    p = decide_start([seen()], [], None, None, NOW)
    assert p.forget == ("/state/run-r1.json",) and not p.stop and not p.messages


def test_a_cluster_started_on_purpose_is_used_and_never_stopped():
    p = decide_start([], [(100, "gcs_server"), (101, "raylet")], None, "127.0.0.1:6379", NOW)
    assert not p.stop and not p.remove_stale_file
    assert "did not start" in p.messages[0] and "gcs_server 100" in p.messages[0] and "left running" in p.messages[0]
    p = decide_start([], [], "ray://head:10001", None, NOW)
    assert "RAY_ADDRESS=ray://head:10001" in p.messages[0] and not p.stop


def test_a_stale_cluster_file_is_removed_only_without_a_live_cluster():
    assert decide_start([], [], None, "10.0.0.1:6379", NOW).remove_stale_file
    assert not decide_start([], [(1, "raylet")], None, "10.0.0.1:6379", NOW).remove_stale_file


def test_readiness_is_the_app_this_start_deployed():
    t0 = NOW
    assert is_this_app({"app": {"run_id": "abc", "built_at": t0 - 500}}, "abc", t0)
    assert not is_this_app({"app": {"run_id": "old", "built_at": t0 + 5}}, "abc", t0)  # an older run's app
    # a cluster that does not pass our environment on: the build time tells
    assert is_this_app({"app": {"run_id": None, "built_at": t0 + 3}}, "abc", t0)
    assert not is_this_app({"app": {"run_id": None, "built_at": t0 - 60}}, "abc", t0)
    assert not is_this_app({"status": "ready", "detail": {}}, "abc", t0)  # an app of a version without identity


def test_records_round_trip_and_pid_reuse_is_not_alive(tmp_path):
    rec = RunRecord(run_id="r9", wrapper=Proc(os.getpid(), 0.0), processes=[Proc(1, 2.0)], config="c", port=1)
    rec.write(record_path("r9", str(tmp_path)))
    (tmp_path / "run-broken.json").write_text("{nope")
    [(path, back)] = read_records(str(tmp_path))
    assert back == rec and path.endswith("run-r9.json")
    assert not proc_alive(Proc(os.getpid(), 0.0))  # the same pid with another start time: another process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not proc_alive(Proc(int(dead.stdout), 0.0))
