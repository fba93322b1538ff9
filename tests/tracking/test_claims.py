"""Claims on run keys against a real MLflow sqlite store: the earliest live run owns a key, the others wait for it,
a dead owner (heartbeat stopped) is KILLED and the key claimed again, a FINISHED run ends the wait."""

import time

import mlflow
import pytest

from leverplus.tracking.claims import HEARTBEAT_TAG, Heartbeat, resolve_claim, wait_for_owner


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('claims') / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("claims")


def _run(client, exp, key, beat=None):
    tags = {"run_key": key, **({HEARTBEAT_TAG: f"{beat:.3f}"} if beat is not None else {})}
    run = client.create_run(exp, tags=tags)
    time.sleep(0.01)  # distinct start times (ms)
    return run.info.run_id


def test_the_earliest_live_run_owns_the_key_seen_from_both_sides(store):
    _, client, exp = store
    a, b = _run(client, exp, "k1"), _run(client, exp, "k1")
    assert resolve_claim(client, exp, "k1", a, grace_s=60) .mine
    seen_by_b = resolve_claim(client, exp, "k1", b, grace_s=60)
    assert not seen_by_b.mine and seen_by_b.owner == a and seen_by_b.finished is None


def test_a_dead_owner_is_killed_and_the_key_claimed_again(store):
    _, client, exp = store
    dead = _run(client, exp, "k2", beat=time.time() - 1000)  # heartbeat 1000 s old, grace 60 s
    mine = _run(client, exp, "k2")
    assert resolve_claim(client, exp, "k2", mine, grace_s=60).mine  # the dead run does not count as live
    other = _run(client, exp, "k2b", beat=time.time() - 1000)
    assert wait_for_owner(client, exp, "k2b", grace_s=60, poll_s=0.01) is None
    assert client.get_run(other).info.status == "KILLED"
    assert client.get_run(dead).info.status == "RUNNING"  # not waited on: left for its own key's waiter


def test_waiting_ends_with_the_owners_finished_run(store):
    uri, client, exp = store
    owner = _run(client, exp, "k3")
    polls = []

    def finish_after_two_polls(_):
        polls.append(1)
        if len(polls) == 2:
            client.set_terminated(owner, "FINISHED")

    assert wait_for_owner(client, exp, "k3", grace_s=60, poll_s=0, sleep=finish_after_two_polls) == owner
    late = _run(client, exp, "k3")
    assert resolve_claim(client, exp, "k3", late, grace_s=60).finished == owner  # nothing left to train


def test_a_failed_owner_leaves_the_key_free(store):
    _, client, exp = store
    owner = _run(client, exp, "k4")
    client.set_terminated(owner, "FAILED")
    assert wait_for_owner(client, exp, "k4", grace_s=60, poll_s=0) is None


def test_heartbeat_refreshes_the_tag(store):
    uri, client, exp = store
    run = _run(client, exp, "k5", beat=time.time() - 1000)
    with Heartbeat(uri, run, interval_s=0.05):
        time.sleep(0.5)
    assert time.time() - float(client.get_run(run).data.tags[HEARTBEAT_TAG]) < 5
