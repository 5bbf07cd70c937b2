"""Pure parts of labkeeper.offsite: keys, part sizes, ETags, retention."""

from __future__ import annotations

import hashlib

import pytest

from labkeeper import offsite as off
from labkeeper.errors import ServiceError

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
