"""docker compose argv and the parsers, against real recorded `docker compose` output."""

from __future__ import annotations

import json

import pytest

from labkeeper import compose
from labkeeper.inventory import AppCompose
from tests.recorded import COMPOSE

FIXTURES = COMPOSE


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


CFG = AppCompose(dir="/opt/immich", project="immich", file="docker-compose.yml")


# ------------------------------------------------------------------------------- argv


def test_update_steps_pull_then_up_detached_removing_orphans():
    steps = compose.update_steps(CFG)
    base = ("docker", "compose", "--project-directory", "/opt/immich",
            "-f", "/opt/immich/docker-compose.yml", "-p", "immich")
    assert steps == [(*base, "pull", "--quiet"), (*base, "up", "-d", "--remove-orphans")]


def test_update_steps_without_pull_or_orphan_removal_and_with_git():
    cfg = AppCompose(dir="/opt/vw", git_url="https://git.home.arpa/me/vw.git", pull=False,
                     remove_orphans=False)
    steps = compose.update_steps(cfg)
    assert steps[0] == ("git", "-C", "/opt/vw", "pull", "--ff-only")
    assert steps[1] == ("docker", "compose", "--project-directory", "/opt/vw",
                        "-f", "/opt/vw/compose.yaml", "up", "-d")
    assert len(steps) == 2


def test_ps_and_images_ask_for_json_and_ps_includes_stopped_containers():
    assert compose.ps_argv(CFG)[-4:] == ("ps", "--all", "--format", "json")
    assert compose.images_argv(CFG)[-3:] == ("images", "--format", "json")


def test_rollback_up_reads_only_the_stack_files_and_never_pulls():
    argv = compose.rollback_up_argv(CFG)
    assert compose.ROLLBACK_OVERRIDE not in " ".join(argv)  # a plain up -d sees the same
    assert argv[-2:] == ("--pull", "never") and "up" in argv


def test_after_the_first_pull_the_update_only_brings_the_stack_up():
    assert compose.in_transaction_steps(CFG) == [compose.up_argv(CFG)]
    git = AppCompose(dir="/opt/vw", git_url="https://git.home.arpa/me/vw.git")
    steps = compose.in_transaction_steps(git)
    assert [s[:2] for s in steps] == [("git", "-C"), ("docker", "compose"),
                                      ("docker", "compose")]
    assert steps[1][-2:] == ("pull", "--quiet")


def test_plain_docker_commands_use_the_apps_engine():
    cfg = AppCompose(dir="/opt/a", docker_host="unix:///run/lab/docker.sock")
    assert compose.image_inspect_argv(cfg, "sha256:aa") == \
        ("docker", "--host", "unix:///run/lab/docker.sock", "image", "inspect", "sha256:aa")
    assert compose.tag_argv(CFG, "sha256:aa", "r/x:latest") == ("docker", "tag", "sha256:aa",
                                                                "r/x:latest")
    assert compose.docker_pull_argv(CFG, "r/x@sha256:bb") == ("docker", "pull", "--quiet",
                                                              "r/x@sha256:bb")


@pytest.mark.parametrize(("ref", "split"), [
    ("127.0.0.1:5000/labapp:latest", ("127.0.0.1:5000/labapp", "latest")),
    ("127.0.0.1:5000/labapp", ("127.0.0.1:5000/labapp", "")),
    ("ghcr.io/immich-app/immich-server:release", ("ghcr.io/immich-app/immich-server",
                                                  "release")),
    ("redis@sha256:abc", ("redis", "sha256:abc")),
    ("postgres", ("postgres", "")),
])
def test_split_ref_tells_a_registry_port_from_a_tag(ref, split):
    assert compose.split_ref(ref) == split


def test_keep_and_digest_refs_stay_in_the_images_repository():
    ref = "127.0.0.1:5000/labapp:latest"
    assert compose.keep_ref(ref, "immich", "server") == \
        "127.0.0.1:5000/labapp:labkeeper-keep-immich-server"
    assert compose.digest_ref(ref, "sha256:dd") == "127.0.0.1:5000/labapp@sha256:dd"
    long = compose.keep_ref(ref, "a" * 100, "s" * 100)
    assert len(compose.split_ref(long)[1]) == 128


def test_image_inspect_digest_for_the_references_repository():
    text = json.dumps([{"Id": "sha256:ii", "RepoTags": ["r:5000/app:1", "r:5000/app:latest"],
                        "RepoDigests": ["other/app@sha256:o", "r:5000/app@sha256:d"]}])
    (info,) = compose.parse_image_inspect(text)
    assert info.id == "sha256:ii" and info.digest_for("r:5000/app:latest") == "sha256:d"
    assert info.digest_for("elsewhere/app:1") == ""  # two candidates, none matches


@pytest.mark.parametrize("digests", [None, []])
def test_an_image_that_never_came_from_a_registry_has_no_digest(digests):
    (info,) = compose.parse_image_inspect(json.dumps([{"Id": "sha256:x",
                                                       "RepoDigests": digests}]))
    assert info.digest_for("app:latest") == ""
    assert compose.parse_image_inspect("[]") == []


# ------------------------------------------------------------------------------- ps


def test_ps_before_2_21_is_one_json_array():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    assert [(c.service, c.state) for c in cs] == [("bar", "exited"), ("foo", "running")]
    assert cs[0].labels == {} and cs[0].image_id is None


def test_ps_from_2_21_is_one_object_per_line_with_labels_holding_the_image_id():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    assert len(cs) >= 2
    pg = next(c for c in cs if c.service == "postgres")
    assert pg.health_state == "healthy" and pg.state == "running"
    assert pg.image_id == ("sha256:81bd698b4594e751a3269e4dcd3e03a4a0ec0daf7b72e7aa1abd43cce"
                           "9887542")
    assert pg.labels["com.docker.compose.version"] == "2.38.2"


def test_ps_labels_with_commas_inside_values_stay_whole():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    api = next(c for c in cs if c.service == "api")
    assert api.labels["com.docker.compose.depends_on"] == \
        "redis:service_healthy:false,postgres:service_healthy:false"


def test_ps_health_states_healthy_unhealthy_restarting_and_starting():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    states = {(c.health_state, c.state) for c in cs}
    assert ("healthy", "running") in states
    assert any(h == "unhealthy" for h, _ in states)
    assert any(s == "restarting" for _, s in states)
    starting = compose.parse_ps(fixture("ps-compose5.0.1-health-starting.ndjson"))
    assert [c.health_state for c in starting] == ["starting"]


def test_ps_health_falls_back_to_the_status_text():
    row = {"Name": "x-web-1", "Service": "web", "State": "running",
           "Status": "Up 2 minutes (health: starting)"}
    assert compose.parse_ps(json.dumps([row]))[0].health_state == "starting"
    row["Status"] = "Up 9 minutes (unhealthy)"
    assert compose.parse_ps(json.dumps(row))[0].health_state == "unhealthy"


@pytest.mark.parametrize("text", ["", "\n", "[]", "null"])
def test_ps_with_no_containers_is_empty(text):
    assert compose.parse_ps(text) == []


def test_ps_garbage_is_refused_with_the_line_number():
    with pytest.raises(compose.ComposeOutputError, match="line 2"):
        compose.parse_ps('{"Name": "a"}\nnot json\n')


# ------------------------------------------------------------------------------- images


def test_images_list_from_compose_5_with_container_names():
    rows = compose.parse_images(fixture("images-compose5.x.json"))
    assert rows[0].container == "z3-sim-9387ad5f-cookie-permissions-1"
    assert rows[0].id.startswith("sha256:28bd5fe8") and rows[0].reference == "alpine:3"
    assert {r.platform for r in rows} >= {"linux/amd64"}


def test_images_older_list_without_container_name_or_platform():
    text = json.dumps([{"ID": "sha256:abc", "Repository": "nginx", "Tag": "1.27",
                        "Size": 10}])
    (row,) = compose.parse_images(text)
    assert (row.container, row.reference, row.platform) == ("", "nginx:1.27", "")


def test_images_map_keyed_by_container_from_2_37_0():
    text = json.dumps({"app-web-1": {"ID": "sha256:abc", "Repository": "nginx", "Tag": "1"},
                       "app-db-1": {"ID": "sha256:def", "Repository": "postgres",
                                    "Tag": "16"}})
    rows = compose.parse_images(text)
    assert {(r.container, r.id) for r in rows} == {("app-web-1", "sha256:abc"),
                                                   ("app-db-1", "sha256:def")}


@pytest.mark.parametrize("text", ["null", "", "[]"])
def test_images_null_or_empty_yields_no_rows(text):
    assert compose.parse_images(text) == []


def test_service_images_prefer_labels_then_the_images_list():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    images = compose.parse_images(json.dumps([
        {"ID": "sha256:1111111111111111", "ContainerName": "example-foo-1",
         "Repository": "nginx", "Tag": "latest"}]))
    got = compose.service_images(cs, images)
    assert got["foo"].image_id == "sha256:1111111111111111"
    assert got["foo"].text() == "nginx:latest@111111111111"
    assert got["bar"].image_id == ""
    labelled = compose.service_images(compose.parse_ps(fixture("ps-compose2.38.2.ndjson")))
    assert labelled["postgres"].image_id.startswith("sha256:81bd698b")
    assert labelled["postgres"].image == "postgres:16-alpine"


# ------------------------------------------------------------------------------- health


def test_container_health_all_healthy_passes():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    verdict = compose.container_health(cs)
    assert verdict.ok, verdict.detail


def test_container_health_names_the_unhealthy_and_restarting_containers():
    cs = compose.parse_ps(fixture("ps-compose5.1.4-healthy-unhealthy-restarting.ndjson"))
    verdict = compose.container_health(cs)
    assert not verdict.ok
    assert "unhealthy" in verdict.detail and "restarting" in verdict.detail


def test_container_health_starting_is_not_yet_healthy_but_waiting():
    cs = compose.parse_ps(fixture("ps-compose5.0.1-health-starting.ndjson"))
    verdict = compose.container_health(cs, ["web"])
    assert not verdict.ok and verdict.waiting and "starting" in verdict.detail


def test_container_health_of_a_named_service_without_container_fails():
    cs = compose.parse_ps(fixture("ps-compose2.38.2.ndjson"))
    verdict = compose.container_health(cs, ["postgres", "nope"])
    assert not verdict.ok and "nope: no container" in verdict.detail


def test_container_health_exited_named_service_fails_but_finished_init_is_ignored():
    cs = compose.parse_ps(fixture("ps-pre-2.21-array.docs-example.json"))
    assert compose.container_health(cs).ok  # bar exited 0 without healthcheck: an init job
    named = compose.container_health(cs, ["bar"])
    assert not named.ok and "exited" in named.detail
    assert not compose.container_health([]).ok


def test_config_names_each_services_image_reference_not_its_id():
    text = json.dumps({"name": "px", "services": {
        "web": {"image": "127.0.0.1:5000/labapp:latest", "network_mode": "host"},
        "builder": {"build": {"context": "."}}}})
    assert compose.parse_config_images(text) == {"web": "127.0.0.1:5000/labapp:latest"}
    assert compose.config_argv(CFG)[-3:] == ("config", "--format", "json")
    with pytest.raises(compose.ComposeOutputError):
        compose.parse_config_images("[1, 2]")
