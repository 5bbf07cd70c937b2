"""Off-site copies: SFTP from the node (the lab's sshd) into S3 multipart uploads (moto)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.vzdump import vzdump_flow
from labkeeper import b2, offsite
from labkeeper.errors import LabkeeperError, ServiceError, is_transient
from labkeeper.locallab.ports import wait_for_port
from labkeeper.locallab.s3 import LocalS3, moto_server_path
from labkeeper.locallab.services import Service
from labkeeper.pvesim.api import set_rootfs_dir
from labkeeper.ssh import SshPool, SshTarget
from tests.fixtures.waiting import wait_until
from tests.integration.test_vzdump_support import VzEnv, archives, job, vzdump_tasks

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VzEnv]:
    e = VzEnv(lab, tmp_path_factory.mktemp("offsite"))
    try:
        yield e
    finally:
        e.stop()


def _big_guest(env: VzEnv, tag: str, node: str, tmp: Path, mib: int = 10) -> int:
    (vmid,) = env.guests(tag, {node: 1})
    root = tmp / f"rootfs-{vmid}"
    root.mkdir()
    (root / "data.bin").write_bytes(os.urandom(mib * 1024 * 1024))
    set_rootfs_dir(env.sim, vmid, root)
    return vmid


def _objects(s3_target: b2.S3Target, prefix: str) -> list[offsite.RemoteObject]:
    return offsite.list_objects(b2.client(s3_target), s3_target.bucket, prefix)


def test_offsite_copy_has_size_and_sha256_metadata_and_keeps_the_last_n(env: VzEnv, tmp_path,
                                                                        prefect_harness):
    vmid = _big_guest(env, "offa", "pve2", tmp_path)
    prefix = "vz-a/"
    path = env.inventory([job("offa", "offa", offsite={"repository": "lab-repo",
                                                        "prefix": prefix, "keep_last": 1})])
    first = vzdump_flow(job="offa", lab=str(path), return_state=True)
    assert first.is_completed(), first.message
    row = first.result()[0]
    assert row["offsite"] == "copied"
    target = env.lab.s3.target()
    (obj,) = _objects(target, prefix)
    assert obj.key == offsite.object_key(prefix, vmid, row["archive"])
    local = next(a for a in archives(env.sim, vmid) if a["volid"] == row["archive"])
    file = env.workdir / "pvesim" / "storage" / "pve2" / "local" / row["archive"].split(":")[1]
    assert obj.size == local["size"] == file.stat().st_size > 8 * 1024 * 1024  # multipart
    assert obj.metadata["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert obj.metadata["size"] == str(obj.size)
    assert obj.etag.endswith("-2")
    second = vzdump_flow(job="offa", lab=str(path), return_state=True, force=True)
    assert second.is_completed(), second.message
    assert second.result()[0]["offsite"] == "copied, 1 old removed"
    (newest,) = _objects(target, prefix)
    assert newest.key == offsite.object_key(prefix, vmid, second.result()[0]["archive"])


def _restart_on_same_port(s3: LocalS3) -> None:
    s3.service = Service("moto_server",
                         (moto_server_path(), "-H", s3.host, "-p", str(s3.port)),
                         log_path=s3.workdir / "moto.log")
    s3.service.start()
    wait_for_port(s3.host, s3.port, timeout=30)
    b2.create_bucket(s3.target())


def test_s3_stopped_during_an_upload_leaves_no_object_and_a_retry_completes(
        env: VzEnv, tmp_path: Path, prefect_harness):
    vmid = _big_guest(env, "offb", "pve1", tmp_path, mib=20)
    path = env.inventory([job("offb", "offb")])
    state = vzdump_flow(job="offb", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    row = state.result()[0]
    file = env.workdir / "pvesim" / "storage" / "pve1" / "local" / row["archive"].split(":")[1]
    s3 = LocalS3(tmp_path / "own-s3")
    s3.start()
    try:
        client = b2.client(s3.target(), timeout=5)
        key = offsite.object_key("vz-b/", vmid, row["archive"])
        from labkeeper.inventory import load_inventory

        inv = load_inventory(str(path))

        def stop_s3(part: int, sent: int) -> None:
            if part == 1:
                s3.stop()

        with SshPool() as pool:
            ssh = pool.get(offsite.node_ssh_target(inv, "pve1"))
            with pytest.raises(ServiceError) as err:
                offsite.copy_archive(ssh, client, s3.bucket, path=str(file), key=key,
                                     size=row["size"], vmid=vmid, volid=row["archive"],
                                     ctime=0, on_part=stop_s3)
            assert is_transient(err.value)
            _restart_on_same_port(s3)
            assert offsite.head(client, s3.bucket, key) is None
            done = offsite.copy_archive(ssh, client, s3.bucket, path=str(file), key=key,
                                        size=row["size"], vmid=vmid, volid=row["archive"],
                                        ctime=0)
            again = offsite.copy_archive(ssh, client, s3.bucket, path=str(file), key=key,
                                         size=row["size"], vmid=vmid, volid=row["archive"],
                                         ctime=0)
        assert done.status == "copied" and done.parts == 3
        assert again.status == "present"
        obj = offsite.head(client, s3.bucket, key)
        assert obj is not None and offsite.is_verified(obj)
        assert obj.metadata["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert offsite.incomplete_uploads(client, s3.bucket, "vz-b/") == []
    finally:
        s3.stop()


def _api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url
    return str(url)


def test_a_rerun_after_the_flow_was_killed_mid_run_converges(env: VzEnv, tmp_path: Path,
                                                             prefect_harness):
    vmids = env.guests("killy", {"pve3": 4})
    prefix = "vz-k/"
    path = env.inventory([job("killy", "killy", schedule="0 0 * * *",
                              offsite={"repository": "lab-repo", "prefix": prefix,
                                       "keep_last": 2})])
    code = ("from flows.vzdump import vzdump_flow; "
            f"vzdump_flow(job='killy', lab={str(path)!r})")
    child_env = {**os.environ, "PREFECT_API_URL": _api_url(), "PYTHONPATH": str(REPO_ROOT)}
    env.sim.task_duration = 0.6
    try:
        child = subprocess.Popen([sys.executable, "-c", code], env=child_env, cwd=REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        def into_the_next_guests_vzdump() -> bool:
            assert child.poll() is None, "the flow finished before it could be killed"
            waiting = [v for v in vmids if not archives(env.sim, v)]
            return len(waiting) < len(vmids) and any(
                t["status"] == "running" for t in vzdump_tasks(env.sim, waiting))

        # a guest is backed up (its upload maybe under way), the next one's vzdump runs
        wait_until(into_the_next_guests_vzdump, timeout=120,
                   what="a guest backed up and the next one's vzdump running")
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        done_before = sum(len(archives(env.sim, v)) for v in vmids)
        assert 1 <= done_before < len(vmids)
    finally:
        env.sim.task_duration = 0.05
    state = vzdump_flow(job="killy", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    rows = {r["vmid"]: r for r in state.result()}
    assert "skipped" in {r["status"] for r in rows.values()}
    for vmid in vmids:
        assert len(archives(env.sim, vmid)) == 1, f"duplicate backups of {vmid}"
        assert rows[vmid]["offsite"] in ("copied", "present")
    target = env.lab.s3.target()
    objs = _objects(target, prefix)
    assert sorted(o.key for o in objs) == sorted(
        offsite.object_key(prefix, v, rows[v]["archive"]) for v in vmids)
    assert all(offsite.is_verified(o) for o in objs)
    assert offsite.incomplete_uploads(b2.client(target), target.bucket, prefix) == []


def _host_files(root: Path, vmid: int) -> list[str]:
    folder = root / str(vmid)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_offsite_copy_to_an_ssh_host_has_a_sha256_sidecar_and_keeps_the_last_n(
        env: VzEnv, tmp_path: Path, prefect_harness):
    vmid = _big_guest(env, "offh", "pve3", tmp_path, mib=3)
    dest = tmp_path / "nas"
    path = env.inventory([job("offh", "offh", offsite={"host": "labhost", "path": str(dest),
                                                        "keep_last": 1})])
    first = vzdump_flow(job="offh", lab=str(path), return_state=True)
    assert first.is_completed(), first.message
    row = first.result()[0]
    assert row["offsite"] == "copied"
    name = row["archive"].split("/")[-1]
    assert _host_files(dest, vmid) == [name, name + ".sha256"]
    node_file = env.workdir / "pvesim" / "storage" / "pve3" / "local" / row["archive"].split(":")[1]
    copy = dest / str(vmid) / name
    assert copy.read_bytes() == node_file.read_bytes()
    assert copy.stat().st_mode & 0o077 == 0
    check = subprocess.run(("sha256sum", "-c", name + ".sha256"), cwd=copy.parent,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    again = vzdump_flow(job="offh", lab=str(path), return_state=True)
    assert again.is_completed(), again.message
    assert again.result()[0]["status"] == "skipped"
    assert again.result()[0]["offsite"] == "present"
    forced = vzdump_flow(job="offh", lab=str(path), return_state=True, force=True)
    assert forced.is_completed(), forced.message
    assert forced.result()[0]["offsite"] == "copied, 1 old removed"
    newest = forced.result()[0]["archive"].split("/")[-1]
    assert newest != name
    assert _host_files(dest, vmid) == [newest, newest + ".sha256"]


def test_an_ssh_host_copy_cut_off_half_way_counts_as_nothing_and_the_next_one_completes(
        env: VzEnv, tmp_path: Path, prefect_harness):
    from labkeeper.inventory import load_inventory

    vmid = _big_guest(env, "offc", "pve2", tmp_path, mib=6)
    path = env.inventory([job("offc", "offc")])
    state = vzdump_flow(job="offc", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    row = state.result()[0]
    src = env.workdir / "pvesim" / "storage" / "pve2" / "local" / row["archive"].split(":")[1]
    dest = tmp_path / "nas"
    folder = str(dest / str(vmid))
    inv = load_inventory(str(path))
    host_target = SshTarget.from_spec(inv.ssh_target("labhost"))
    with SshPool() as pool:
        node = pool.get(offsite.node_ssh_target(inv, "pve2"))
        host = pool.get(host_target)

        def drop_connection(sent: int) -> None:
            if sent >= 2 * 1024 * 1024:
                host.close()  # the link to the NAS goes down mid-copy

        with pytest.raises(LabkeeperError) as err:
            offsite.copy_archive_to_host(node, host, path=str(src), dest_dir=folder,
                                         size=row["size"], on_progress=drop_connection)
        assert is_transient(err.value), err.value
        # nothing counts as a copy: no archive under its name, no sidecar
        assert not (dest / str(vmid) / src.name).exists()
        assert not (dest / str(vmid) / (src.name + ".sha256")).exists()
        host = pool.get(host_target)  # reconnects
        done = offsite.copy_archive_to_host(node, host, path=str(src), dest_dir=folder,
                                            size=row["size"])
        again = offsite.copy_archive_to_host(node, host, path=str(src), dest_dir=folder,
                                             size=row["size"])
        assert (done.status, again.status) == ("copied", "present")
        assert _host_files(dest, vmid) == [src.name, src.name + ".sha256"]  # no partial left
        assert (dest / str(vmid) / src.name).read_bytes() == src.read_bytes()
        # an old copy without a sidecar (a crash between rename and sidecar) is not
        # counted and retention removes it; a file that is not ours stays
        older = dest / str(vmid) / "vzdump-lxc-1-2020_01_01-00_00_00.tar.zst"
        older.write_bytes(b"half")
        (dest / str(vmid) / "README").write_text("keep me")
        kept, deleted = offsite.apply_host_retention(host, folder, keep_last=2,
                                                     max_age_days=None)
        assert kept == [src.name] and deleted == [older.name]
    assert _host_files(dest, vmid) == ["README", src.name, src.name + ".sha256"]


def test_an_unusable_offsite_host_path_fails_the_guest_loudly_without_retrying(
        env: VzEnv, tmp_path: Path, prefect_harness):
    (vmid,) = env.guests("offbad", {"pve1": 1})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the off-site directory should be")
    path = env.inventory([job("offbad", "offbad", offsite={
        "host": "labhost", "path": str(blocker / "offsite")})])
    started = time.monotonic()
    state = vzdump_flow(job="offbad", lab=str(path), return_state=True)
    assert time.monotonic() - started < 30  # a permanent error: no 2+4+8 s of retries
    assert state.is_failed()
    (row,) = state.result(raise_on_failure=False).rows
    assert row["offsite"] == "failed" and row["status"] == "failed"
    assert "offsite host labhost: cannot prepare" in row["detail"]
    assert row["archive"] and len(archives(env.sim, vmid)) == 1  # the backup itself is kept
