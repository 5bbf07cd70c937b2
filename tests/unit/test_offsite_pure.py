"""Pure parts of labkeeper.offsite: keys, part sizes, ETags, retention."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from labkeeper import offsite as off
from labkeeper.errors import ServiceError
from labkeeper.inventory import Offsite

SHA = "a" * 64


def obj(key: str, t: float, size: int = 10, meta: dict | None = None) -> off.RemoteObject:
    m = {"size": str(size), "sha256": SHA, "ctime": str(t)} if meta is None else meta
    return off.RemoteObject(key, size, t, m)


def test_object_key_is_prefix_vmid_and_the_archive_name():
    assert off.object_key("vzdump/", 101, "local:backup/vzdump-lxc-101-x.tar.zst") == \
        "vzdump/101/vzdump-lxc-101-x.tar.zst"


def test_part_size_is_at_least_8_mib_and_keeps_under_the_part_limit():
    assert off.part_size(1) == 8 * off.MiB
    big = 200 * 1024**3
    size = off.part_size(big)
    assert size % off.MiB == 0 and big / size <= off.MAX_PARTS


def test_multipart_etag_is_md5_of_part_md5s():
    parts = [b"a" * 10, b"b" * 3]
    md5s = [hashlib.md5(p).digest() for p in parts]
    assert off.multipart_etag(md5s) == hashlib.md5(b"".join(md5s)).hexdigest() + "-2"


def test_sha256sum_output_is_parsed_and_garbage_refused():
    assert off.parse_sha256sum(f"{SHA}  /x/y.tar.zst\n", "/x/y.tar.zst") == SHA
    with pytest.raises(ServiceError):
        off.parse_sha256sum("sha256sum: /x: No such file", "/x")


def test_only_objects_with_matching_metadata_are_verified():
    assert off.is_verified(obj("k", 1))
    assert not off.is_verified(obj("k", 1, meta={}))
    assert not off.is_verified(obj("k", 1, size=10, meta={"size": "9", "sha256": SHA}))


def test_retention_keeps_the_newest_verified_and_deletes_unverified():
    objs = [obj("a", 1), obj("b", 2), obj("c", 3), obj("junk", 4, meta={})]
    keep, delete = off.retention_plan(objs, keep_last=2, max_age_days=None, now=10)
    assert keep == ["c", "b"] and delete == ["a", "junk"]


def test_retention_keeps_copies_younger_than_max_age_too():
    day = 86400.0
    objs = [obj("old", 0), obj("mid", 5 * day), obj("new", 9 * day)]
    keep, delete = off.retention_plan(objs, keep_last=1, max_age_days=7, now=10 * day)
    assert keep == ["new", "mid"] and delete == ["old"]


# ---------------------------------------------------------------------- SSH host target

A = "vzdump-lxc-101-2025_01_01-01_00_00.tar.zst"
B = "vzdump-lxc-101-2025_01_02-01_00_00.tar.zst"
C = "vzdump-lxc-101-2025_01_03-01_00_00.tar.zst"


def test_the_sidecar_is_a_sha256sum_line_and_reads_back():
    text = off.sidecar_text(SHA, A)
    assert text == f"{SHA}  {A}\n"
    assert off.parse_sidecar(text, A) == SHA
    assert off.parse_sidecar(f"{SHA} *{A}\n", A) == SHA  # binary-mode marker
    assert off.parse_sidecar(text, B) is None
    assert off.parse_sidecar("not a digest  " + A, A) is None


def test_host_retention_keeps_the_newest_good_copies_and_drops_unverified_ones():
    day = 86400.0
    entries = [off.HostEntry(n, 10, i * day) for i, n in enumerate((A, B, C))]
    entries += [off.HostEntry(n + off.SIDECAR, 80, 0) for n in (A, B)]
    # C has no sidecar: its copy never finished, it does not count and goes
    keep, delete = off.host_plan(entries, {A: SHA, B: SHA}, keep_last=1, max_age_days=None,
                                 now=10 * day)
    assert keep == [B]
    assert delete == [A + off.SIDECAR, A, C]  # a sidecar goes before its archive


def test_host_retention_clears_stale_partials_and_orphan_sidecars_but_no_other_file():
    now = 100 * 3600.0
    entries = [off.HostEntry(A, 10, 0), off.HostEntry(A + off.SIDECAR, 80, 0),
               off.HostEntry(B + off.SIDECAR, 80, 0),  # its archive is gone
               off.HostEntry(off.partial_name(C), 5, now - off.PARTIAL_MAX_AGE - 1),
               off.HostEntry(off.partial_name(B), 5, now - 60),  # a copy may be writing it
               off.HostEntry("README", 5, 0), off.HostEntry("notes.sha256", 5, 0)]
    keep, delete = off.host_plan(entries, {A: SHA}, keep_last=2, max_age_days=None, now=now)
    assert keep == [A]
    assert sorted(delete) == sorted([B + off.SIDECAR, off.partial_name(C)])


def test_an_offsite_host_takes_a_path_not_a_prefix():
    assert Offsite.model_validate({"host": "nas", "path": "/srv/offsite"}).host == "nas"
    for bad, needle in (({"host": "nas"}, "needs a path"),
                        ({"host": "nas", "path": "/x", "prefix": "vz/"}, "uses path"),
                        ({"repository": "b2", "path": "/x"}, "use prefix")):
        with pytest.raises(ValidationError, match=needle):
            Offsite.model_validate(bad)
