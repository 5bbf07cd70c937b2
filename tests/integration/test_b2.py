"""Bucket usage, cost and protection status through boto3 against moto's S3 server."""

from __future__ import annotations

import dataclasses

from labkeeper import b2


def test_usage_counts_objects_and_bytes_under_the_prefix_with_a_cost_estimate(lab):
    target = dataclasses.replace(lab.s3.target(), bucket="usage-bucket")
    b2.create_bucket(target)
    s3 = b2.client(target)
    for i in range(3):
        s3.put_object(Bucket=target.bucket, Key=f"restic/data/{i}", Body=b"x" * 1000)
    s3.put_object(Bucket=target.bucket, Key="other/file", Body=b"y" * 50)
    u = b2.usage(target, prefix="restic/", storage_per_tb_month=6.0)
    assert (u.objects, u.bytes) == (3, 3000)
    assert u.monthly_cost == 3000 / 1e12 * 6.0
    assert u.versioning == "Off" and u.object_lock == "Off"
    assert u.row()["monthly cost"] == "0.00 USD"


def test_versioning_and_object_lock_are_reported_when_enabled(lab):
    target = dataclasses.replace(lab.s3.target(), bucket="locked-bucket")
    s3 = b2.client(target)
    s3.create_bucket(Bucket=target.bucket, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(
        Bucket=target.bucket,
        ObjectLockConfiguration={"ObjectLockEnabled": "Enabled",
                                 "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE",
                                                               "Days": 30}}})
    assert b2.versioning_status(target) == "Enabled"
    assert b2.object_lock_status(target) == "Enabled (GOVERNANCE 30 days)"
    plain = dataclasses.replace(lab.s3.target(), bucket="versioned-bucket")
    b2.create_bucket(plain)
    b2.client(plain).put_bucket_versioning(Bucket=plain.bucket,
                                           VersioningConfiguration={"Status": "Enabled"})
    assert b2.versioning_status(plain) == "Enabled"
    assert b2.object_lock_status(plain) == "Off"
