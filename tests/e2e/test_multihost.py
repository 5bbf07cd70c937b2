"""Several machines for real (issue 20): a PostgreSQL-backed Prefect server with an auth
string, workers on other "hosts" (network namespaces), work routed to each job's site.

One server and its workers for the whole module (tests/fixtures/multihost.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.multihost import BIG_DB, BIN, HERE, ZOMBIE_AFTER_SECONDS, MultiHost, netns_inode
from tests.fixtures.procs import restic_pids

pytestmark = pytest.mark.e2e


def trigger(mh: MultiHost, name: str, parameters: dict | None = None) -> Any:
    """Create a flow run from a deployment: what the UI's Run button does."""

    async def create(client: Any) -> Any:
        dep = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(dep.id, parameters=parameters or {})

    return mh.client(create)


def read_run(mh: MultiHost, run_id: Any) -> Any:
    return mh.client(lambda c: c.read_flow_run(run_id))


def wait_run(mh: MultiHost, run_id: Any, until: Any = None, timeout: float = 240) -> Any:
    """Poll the run until ``until(run)`` (default: a final state)."""
    until = until or (lambda r: r.state is not None and r.state.is_final())
    deadline = time.monotonic() + timeout
    while True:
        run = read_run(mh, run_id)
        if until(run):
            return run
        if time.monotonic() > deadline:
            logs = {s: w.log_path.read_text()[-2000:] for s, w in mh.workers.items()}
            raise AssertionError(f"run {run_id} is {run.state and run.state.name} after "
                                 f"{timeout}s; worker logs: {logs}")
        time.sleep(0.5)


def history(mh: MultiHost, run_id: Any, expect_log: str = "", wait: float = 30) -> tuple:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async def read(client: Any) -> tuple:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        return logs, arts

    deadline = time.monotonic() + wait
    while True:
        logs, arts = mh.client(read)
        if expect_log in "\n".join(x.message for x in logs) or time.monotonic() > deadline:
            return logs, arts
        time.sleep(0.5)


def table(artifact: Any) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


# -- the set-up itself -----------------------------------------------------------------


def test_an_unauthenticated_client_is_refused_and_the_history_is_in_postgresql(multihost):
    from prefect.exceptions import PrefectHTTPStatusError

    with pytest.raises(PrefectHTTPStatusError) as err:
        multihost.client(lambda c: c.read_deployments(), auth=False)
    assert err.value.response.status_code == 401
    assert multihost.client(lambda c: c.read_deployments())  # with the auth string: fine
    pg = multihost.lab.postgres
    tables = pg.psql_super("SELECT count(*) FROM pg_tables WHERE tablename = 'flow_run';",
                           db="prefect").strip()
    assert tables == "1"


def test_nothing_listens_beyond_loopback_and_the_fixture_veths(multihost):
    from labkeeper import process

    allowed = {"127.0.0.1", "::1", multihost.shared_ip,
               *(ns.host_ip for ns in multihost.hosts.values())}
    s3_port = int(multihost.lab.s3.endpoint.rsplit(":", 1)[1].split("/")[0])
    mine = {multihost.server.port, multihost.lab.postgres.port, multihost.lab.sshd.port,
            s3_port}
    out = process.run(("ss", "-Hltn"), timeout=30).stdout
    for line in out.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        if int(port) in mine:
            assert host.strip("[]") in allowed, line


def test_each_site_check_runs_on_its_sites_worker_with_its_own_view_of_the_network(multihost):
    runs = {site: trigger(multihost, f"site-check/site-check{'' if site == 'core' else '-' + site}")
            for site in ("core", "nas", HERE)}
    for site, run in runs.items():
        done = wait_run(multihost, run.id)
        assert done.state.is_completed(), (site, done.state.message)
        assert done.work_queue_name == site
        _logs, arts = history(multihost, run.id, expect_log="site-check:")
        rows = table(next(a for a in arts if a.key == "site-check"))
        assert {r["site"] for r in rows} == {site}
        netns = {r["netns"] for r in rows}
        want = multihost.hosts[site].inode if site in multihost.hosts else None
        assert netns == {f"net:[{want or netns_inode()}]"}
        reach = {r["part"] for r in rows if r["reachable"]}
        if site == "core":
            assert reach == {"database:appdb", "database:mhbig", "repository:lab-repo"}
        elif site == "nas":
            assert reach == {"host:filer", "repository:lab-repo"}
        else:
            assert reach == {"database:appdb", "database:mhbig", "repository:lab-repo",
                             "host:filer"}


# -- real jobs on their sites ------------------------------------------------------------


def _ran_on(mh: MultiHost, run_id: Any) -> set[str]:
    """The sites whose worker log shows it submitted the run."""
    return {site for site, w in mh.workers.items() if str(run_id) in w.log_path.read_text()}


def _all_text(mh: MultiHost, run: Any) -> str:
    logs, arts = history(mh, run.id)
    return "\n".join([json.dumps(run.parameters), *(x.message for x in logs),
                      *(json.dumps(a.data) for a in arts), *(str(a.description) for a in arts)])


def test_backups_run_on_their_sites_worker_and_secrets_stay_on_it(multihost):
    mh = multihost
    pg = trigger(mh, "pg_backup/nightly-pg-backup", {"databases": ["appdb"]})
    files = trigger(mh, "path_backup/nightly-path-backup")
    pg, files = wait_run(mh, pg.id), wait_run(mh, files.id)
    assert pg.state.is_completed(), pg.state.message
    assert files.state.is_completed(), files.state.message
    assert (pg.work_queue_name, files.work_queue_name) == ("core", "nas")
    assert _ran_on(mh, pg.id) == {"core"}
    assert _ran_on(mh, files.id) == {"nas"}
    _logs, arts = history(mh, pg.id, expect_log="pg_backup:")
    rows = table(next(a for a in arts if a.key == "pg-backup"))
    assert "appdb" in {r["database"] for r in rows}
    assert BIG_DB not in {r["database"] for r in rows}  # the run's selection held
    # secrets: each worker holds only its own; no run carries the other's (nor its own)
    key_line = mh.secrets["nas"].splitlines()[1]
    pg_text, files_text = _all_text(mh, pg), _all_text(mh, files)
    for text in (pg_text, files_text):
        assert key_line not in text and mh.secrets["core"] not in text
    core_env = Path(f"/proc/{mh.workers['core'].pid}/environ").read_bytes()
    nas_env = Path(f"/proc/{mh.workers['nas'].pid}/environ").read_bytes()
    assert key_line.encode() not in core_env and b"MH_SSH_KEY" not in core_env
    assert mh.secrets["core"].encode() not in nas_env and b"MH_PG_PASSWORD" not in nas_env
    assert b"MH_PG_PASSWORD" in core_env and b"MH_SSH_KEY" in nas_env


def test_a_job_for_a_site_without_a_worker_stays_late_and_status_says_so(multihost):
    mh = multihost
    run = trigger(mh, "site-check/site-check-offsite")
    try:
        wait_run(mh, run.id, until=lambda r: r.state is not None and r.state.name == "Late",
                 timeout=120)
        res = mh.run(str(BIN / "labkeeper"), "status", "--lab", str(mh.inventory_path),
                     "--json", check=False, timeout=300)
        rows = json.loads(res.stdout)
        row = next(r for r in rows if r["section"] == "runs" and run.name in r["target"])
        assert row["state"] == "late"
        assert "no live worker polls queue offsite" in row["detail"]
        assert res.returncode != 0
        assert read_run(mh, run.id).state.name == "Late"  # nobody took it meanwhile
    finally:
        mh.client(lambda c: c.delete_flow_run(run.id))


def test_overlapping_backups_into_one_repository_never_run_two_writers_at_once(multihost):
    from labkeeper import restic

    mh = multihost
    first = trigger(mh, "pg_backup/nightly-pg-backup", {"databases": ["appdb"]})
    second = trigger(mh, "pg_backup/nightly-pg-backup", {"databases": ["appdb"]})
    files = trigger(mh, "path_backup/nightly-path-backup")
    done = [wait_run(mh, r.id, timeout=400) for r in (first, second, files)]
    assert all(r.state.is_completed() for r in done), [r.state.message for r in done]
    a, b = sorted(done[:2], key=lambda r: r.start_time)
    assert a.end_time <= b.start_time, "two backups of one job ran at once"
    states = mh.client(lambda c: c.read_flow_run_states(b.id))
    assert "AwaitingConcurrencySlot" in {s.name for s in states}
    # the nas worker's restic wrote at the same time as core's: restic's shared locks
    restic.run_restic(mh.lab.repo, restic.check_argv(mh.lab.repo), timeout=300)


# -- failures of a host and of the server ------------------------------------------------


def _big_series(mh: MultiHost) -> set[str]:
    return {"labkeeper", f"db:{mh.hosts['core'].host_ip}/{BIG_DB}", "kind:pg_dump"}


def _complete_big_dumps(mh: MultiHost) -> list[Any]:
    from labkeeper import restic
    from labkeeper.pg_backup import complete_dumps

    snaps = restic.snapshots(mh.lab.repo)
    return [s for s in complete_dumps(snaps) if _big_series(mh) <= set(s.tags)]


def test_a_host_killed_mid_backup_crashes_its_run_notifies_and_the_next_run_converges(
        multihost):
    from prefect.client.schemas.objects import StateType

    mh = multihost
    ns = mh.hosts["core"]
    before = len(_complete_big_dumps(mh))
    run = trigger(mh, "pg_backup/nightly-pg-backup", {"databases": [BIG_DB]})
    deadline = time.monotonic() + 240
    while True:  # restic is writing the dump, inside the core "host"
        writers = [p for p in restic_pids(b"backup") if netns_inode(p) == ns.inode]
        if writers:
            break
        state = read_run(mh, run.id).state
        assert not state.is_final(), f"finished before it could be killed: {state.name}"
        assert time.monotonic() < deadline, "no restic backup started in the core host"
        time.sleep(0.05)
    killed = ns.kill_all()  # the host dies: its worker, the flow run, pg_dump, restic
    assert mh.workers["core"].pid in killed
    crashed = wait_run(mh, run.id, timeout=ZOMBIE_AFTER_SECONDS + 180)
    assert crashed.state.type == StateType.CRASHED, crashed.state.name
    deadline = time.monotonic() + 120
    while not any(str(run.id) in b for b in mh.inbox.bodies):
        assert time.monotonic() < deadline, f"no crash notification: {mh.inbox.bodies}"
        time.sleep(0.5)
    assert len(_complete_big_dumps(mh)) == before  # nothing half-written counts
    mh.start_worker("core")  # the host is back
    again = wait_run(mh, trigger(mh, "pg_backup/nightly-pg-backup",
                                 {"databases": [BIG_DB]}).id, timeout=400)
    assert again.state.is_completed(), again.state.message
    assert len(_complete_big_dumps(mh)) == before + 1


def test_server_restarted_mid_run_the_run_finishes_and_the_history_is_kept(multihost):
    from prefect.client.schemas.filters import FlowRunFilter

    mh = multihost
    before = mh.client(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter()))
    run = trigger(mh, "pg_backup/nightly-pg-backup", {"databases": [BIG_DB]})
    wait_run(mh, run.id, until=lambda r: r.state is not None and r.state.is_running())
    mh.server.stop()
    mh.server.start(timeout=180)
    done = wait_run(mh, run.id, timeout=400)
    assert done.state.is_completed(), done.state.message
    logs, _arts = history(mh, run.id, expect_log="pg_backup:")
    assert any("pg_backup:" in x.message for x in logs)
    after = {r.id for r in mh.client(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter()))}
    assert {r.id for r in before} <= after
    # the worker reconnected: a new run on its queue completes
    check = wait_run(mh, trigger(mh, "site-check/site-check").id)
    assert check.state.is_completed()
