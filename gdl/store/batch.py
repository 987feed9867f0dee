"""Group commit: the script calls of concurrent greenlets, sent as one pipeline.

On the hot path every job costs an enqueue, a take and a settle, each one
Lua script. Sent one by one, each pays a round trip, a ``send`` syscall (on
loopback the kernel delivers the bytes inside that call, the costliest line
of gdl's profile) and redis-py's per-call bookkeeping. :class:`ScriptBatcher`
queues a call and lets one flusher greenlet send everything queued meanwhile
in a single non-transactional pipeline, then hands each caller its own reply
or exception. Nothing waits on purpose: a lone call goes out at once, and
calls pile up only while the previous batch is on the wire, so batches grow
exactly as fast as load does.

Each call is still its own script run, atomic on its own; a batch is not a
transaction, so one failing script does not affect the others.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
import redis
import redis.exceptions
from gevent.event import AsyncResult
from redis.cluster import RedisCluster
from redis.commands.core import Script

log = logging.getLogger(__name__)

# A pipeline this long is plenty to amortise a round trip; more would only
# delay the first caller's reply behind a larger parse.
MAX_BATCH = 256


class _Call:
    __slots__ = ("script", "keys", "args", "result")

    def __init__(self, script: Script, keys: list[str], args: list[Any]):
        self.script = script
        self.keys = keys
        self.args = args
        self.result: AsyncResult = AsyncResult()


class ScriptBatcher:
    """Runs registered scripts for many greenlets over one pipeline at a time."""

    def __init__(self, client: redis.Redis | RedisCluster):
        self.client = client
        self._pending: list[_Call] = []
        self._flusher: gevent.Greenlet | None = None
        self._connection: Any = None  # the connection batches go on (plain Redis; see _execute_direct)
        self._spare: list[Any] = []  # idle connections for batches sent alone (see _execute_alone)
        self.batches = 0  # pipelines sent, for the curious (tests, benchmarks)
        self.calls = 0

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; blocks this greenlet until its reply, raising its error."""
        call = _Call(script, keys, args)
        self._pending.append(call)
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush)
        return call.result.get()

    def run_many(self, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args), in as few pipelines as ``MAX_BATCH`` allows;
        blocks until every reply is in and returns them in order, raising the first error."""
        made = [_Call(script, keys, args) for keys, args in calls]
        self._pending.extend(made)
        if made and self._flusher is None:
            self._flusher = gevent.spawn(self._flush)
        return [call.result.get() for call in made]

    def run_alone(self, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args) at once, in one pipeline on a connection
        of their own; blocks until every reply is in and returns them in order, raising
        the first error.

        For a caller with many calls (a batch request's): it has a round trip's worth by
        itself, so it gains nothing from sharing one, while queued behind the batch on the
        wire it would wait for that batch's replies and then for the flusher's next turn
        on the hub, behind every greenlet ready before it. With a few batch requests at
        once, their scripts then went to Redis all together after all of them were
        validated, and the API and Redis took turns instead of working together."""
        made = [_Call(script, keys, args) for keys, args in calls]
        self._send(made, alone=True)
        return [call.result.get() for call in made]

    def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._send(batch)
        finally:
            self._flusher = None
            if self._pending:  # queued while a failure unwound us: keep them moving
                self._flusher = gevent.spawn(self._flush)

    def _send(self, batch: list[_Call], alone: bool = False) -> None:
        try:
            replies = self._execute(batch, alone)
            missing = [c for c, r in zip(batch, replies) if isinstance(r, redis.exceptions.NoScriptError)]
            if missing:  # a restarted or failed-over Redis has forgotten the scripts
                for script in {id(c.script): c.script for c in missing}.values():
                    self.client.script_load(script.script)
                again = dict(zip(map(id, missing), self._execute(missing, alone)))
                replies = [again.get(id(c), r) for c, r in zip(batch, replies)]
        except BaseException as exc:  # the connection failed: every caller gets the error
            for call in batch:
                call.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.calls += len(batch)
        for call, reply in zip(batch, replies):
            if isinstance(reply, Exception):
                call.result.set_exception(reply)
            else:
                call.result.set(reply)

    def _execute(self, batch: list[_Call], alone: bool) -> list[Any]:
        if not isinstance(self.client, RedisCluster) and type(self.client.connection_pool) is redis.ConnectionPool:
            if alone:
                return self._execute_alone(self.client, batch)
            return self._execute_direct(self.client, batch)
        with self.client.pipeline(transaction=False) as pipe:  # a connection of its own, from the pool
            for call in batch:
                pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
            return pipe.execute(raise_on_error=False)

    def _execute_direct(self, client: redis.Redis, batch: list[_Call]) -> list[Any]:
        """What a pipeline does, on a connection the batcher keeps for itself.

        Only one batch is on the wire at a time, so one connection serves the
        batcher; taken from the pool once, it is spared the pool's checks of
        every pipeline (a ``poll`` of the socket, a third of the notifier's
        Redis time in its profile), and a batch that fails on it is sent again
        on a fresh one as redis-py's pipeline does (the client's ``retry``).
        Not with Sentinel: its pool drops a connection to a demoted master as
        it comes back to the pool, and one kept out of it would stay there."""
        conn = self._connection
        if conn is None:
            conn = self._connection = client.connection_pool.get_connection()
        return _execute_on(conn, batch)

    def _execute_alone(self, client: redis.Redis, batch: list[_Call]) -> list[Any]:
        """``batch`` on a connection of its own: an idle one of those the batcher keeps
        for batches sent alone, or a new one from the pool, kept after.

        Kept out of the pool for the reason :meth:`_execute_direct` gives, and one
        more: the pool's check of a connection it hands out polls the socket, which
        on the hub is a yield, so a handler that had validated its batch was sent to
        the back of the queue of ready greenlets before it could send its scripts,
        and the batches of a few handlers reached Redis together, after all of them
        were validated (the same convoy as behind the shared connection)."""
        conn = self._spare.pop() if self._spare else client.connection_pool.get_connection()
        try:
            return _execute_on(conn, batch)
        finally:
            self._spare.append(conn)  # even after an error: a disconnected one connects again when used


def _execute_on(conn: Any, batch: list[_Call]) -> list[Any]:
    """``batch`` as one pipeline on ``conn``; sent again on a fresh connection if it fails
    (the client's ``retry``), as redis-py's pipeline does."""
    packed = b"".join(_packed_evalsha(c) for c in batch)
    return conn.retry.call_with_retry(lambda: _send_and_read(conn, packed, len(batch)),
                                      lambda _error: conn.disconnect())


def _packed_evalsha(call: _Call) -> bytes:
    """``call`` as the EVALSHA command Redis reads (RESP: an array of bulk strings).

    What redis-py's ``pack_command`` writes for these arguments (str as UTF-8, numbers
    as their decimal text), without its per-argument checks: when a batch's enqueue
    scripts carried seven arguments a job, redis-py's packing was a tenth of the API's
    CPU on them (3.9 us a job, 1.2 this way)."""
    args = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if type(arg) is str else _encoded(arg)
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _encoded(arg: Any) -> bytes:
    """An argument that is not a plain str, as redis-py's encoder writes it."""
    if isinstance(arg, bytes | memoryview):
        return bytes(arg)
    if isinstance(arg, str):  # an enum of strings, say: its value, as str's own encode reads it
        return arg.encode()
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode()
    raise redis.exceptions.DataError(f"invalid script argument {arg!r}: use bytes, str, int or float")


def _send_and_read(conn: Any, packed: bytes, count: int) -> list[Any]:
    """Send ``count`` packed commands in one write, then read a reply (or an error reply, as a value) for each."""
    conn.send_packed_command([packed])
    replies: list[Any] = []
    try:
        for _ in range(count):
            try:
                replies.append(conn.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
    except BaseException:
        conn.disconnect()  # replies left unread would answer the next batch
        raise
    return replies
