"""gdl on a real three-master Redis Cluster (``redis.cluster_nodes``).

Every key carries the ``{gdl}`` hash tag, so all of gdl's keys share one
slot and every script's keys are on one node. This module runs the
end-to-end processor, notifier, process and resilience tests (kill -9,
SIGTERM, a second signal) again on a cluster that it starts (redis-server
in cluster mode, joined by ``redis-cli --cluster create``): the ``store``
and ``make_cfg`` fixtures below replace the standalone ones for the tests
imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gdl import config
from gdl import store as keys
from gdl.store import Store
from tests.conftest import RedisClusterServer, make_config, wait_until
from tests.test_fencing import test_a_pool_whose_lease_passed_to_another_process_takes_no_further_job  # noqa: F401
from tests.test_notifier import *  # noqa: F403
from tests.test_processes import (  # noqa: F401
    hold_server,
    test_a_processor_that_joins_gets_the_new_aggregations_until_shares_are_even,
    test_sigkill_of_the_notifier_with_50_callbacks_in_flight,
    test_sigkill_with_50_downloads_in_flight_loses_nothing,
    test_sigterm_puts_work_still_in_flight_after_the_grace_back_and_exits_0_within_10s,
    test_two_processors_together_never_pass_the_limit,
)
from tests.test_processor import *  # noqa: F403
from tests.test_resilience import (  # noqa: F401
    served,
    test_a_second_signal_exits_at_once_and_the_sweep_recovers,
    test_metrics_parse_and_match_the_jobs_run,
    test_sentry_gets_internal_errors_with_tags_and_not_404s,
    test_sigterm_during_50_slow_downloads_then_a_restart_completes_them,
)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    cluster = RedisClusterServer(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def store(redis_cluster: RedisClusterServer) -> Iterator[Store]:
    s = Store.connect("", cluster_nodes=redis_cluster.nodes)
    s.redis.flushall()
    yield s
    s.close()


@pytest.fixture
def make_cfg(tmp_path: Path, redis_cluster: RedisClusterServer, store: Store) -> Callable[..., config.Config]:
    nodes = redis_cluster.nodes
    return lambda **sections: make_config(tmp_path, "redis://127.0.0.1:1/0",
                                          redis={"cluster_nodes": nodes}, **sections)


def test_every_key_is_in_the_slot_of_the_hash_tag(run_service, store, files):
    files.add("/a", b"x")
    running = run_service(("api", "processor"))
    job_id = running.enqueue(url=files.url("/a"), aggr_id="slot", aggr_limit=1, callback_url="http://127.0.0.1:9/cb")
    wait_until(lambda: store.get_job(job_id).status.state == "succeeded", timeout=10)
    node = store.redis.get_node_from_key(keys.PREFIX)
    found = store.redis.keys("*", target_nodes=node)
    assert {keys.job_key(job_id), keys.log_key(job_id), keys.CALLBACK_QUEUE, keys.HEARTBEATS} <= set(found)
    assert {store.redis.keyslot(key) for key in found} == {store.redis.keyslot(keys.PREFIX)}
    others = [n for n in store.redis.get_primaries() if n.name != node.name]
    assert len(others) == 2 and all(store.redis.dbsize(target_nodes=n) == 0 for n in others)
