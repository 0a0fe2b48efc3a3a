"""Scoring on Ray: a pool of async actors behind the driver's cache and one global bound.

The driver looks every (prompt, example) request up in the response cache and sends only
the misses to the actors; each actor holds its own HTTP session and makes single
attempts. The driver keeps every rule: its limiter bounds the requests in flight across
the whole pool (``--concurrency``, fixed or adaptive), whatever the number of actors or
CPUs, and admits them under ``--rpm``/``--tpm``; it retries failed attempts (through the
same limiter) and counts what they cost. Replies are written to the cache by the driver,
so a cluster needs no shared disk.

Requests travel to the actors in batches (``Batches``), one Ray call for the attempts the
limiter admits together. Actors are restarted when they die (process killed, node lost)
and Ray re-sends the calls they had not answered; a call whose actor cannot be brought
back is sent to another actor. Each request's reply is recorded once, when its call
returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from distillprompt.errors import EndpointUnavailable
from distillprompt.evaluation import InProcessEvaluator
from distillprompt.llm import Endpoint, Failure, Reply
from distillprompt.engine import Callback
from distillprompt.context import RunContext, client_options
from distillprompt.executors import evaluator_options
from distillprompt.settings import Settings

from .cluster import Connection, connect, disconnect

log = logging.getLogger(__name__)

MAX_RESUBMITS = 5
MAX_BATCH = 32  # requests in one Ray call (an actor that dies loses the replies of its batches in flight)
PLACEMENT_ATTEMPTS = 3  # checks of where the actors run, on a cluster of several nodes
# ray_start=auto: a local instance starts once the driver's event loop has used more than this
# share of a core for BUSY_WINDOWS windows in a row: only a driver that is the bottleneck earns
# Ray's seconds of start-up back (docs/decisions.md).
BUSY_SHARE = 0.7
BUSY_WINDOW_S = 1.0
BUSY_WINDOWS = 5


class DriverLoad:
    """The share of a core the driver's event loop used over the last full window (the CPU
    time of the thread that reads it, over wall time; other threads, such as a background
    import, do not count), read cheaply on every request. The first window opens at the
    first reading: start-up (imports, data loading) is not scoring work."""

    def __init__(self, window: float = BUSY_WINDOW_S, windows: int = BUSY_WINDOWS) -> None:
        self.window = window
        self.windows = windows
        self.share = 0.0
        self.busy_windows = 0  # full windows in a row at or above the threshold
        self._wall: float | None = None
        self._cpu = 0.0

    def busy(self, threshold: float = BUSY_SHARE) -> bool:
        now = time.monotonic()
        if self._wall is None:
            self._wall, self._cpu = now, time.thread_time()
        elif now - self._wall >= self.window:
            cpu = time.thread_time()
            self.share = (cpu - self._cpu) / (now - self._wall)
            self._wall, self._cpu = now, cpu
            self.busy_windows = self.busy_windows + 1 if self.share >= threshold else 0
        return self.busy_windows >= self.windows


def endpoint_options(settings: Settings) -> dict[str, Any]:
    """What an actor needs to build its client for the target model (the key included: it
    travels as an actor argument, never in a runtime env, log or job spec)."""
    return dict(client_options(settings), base_url=settings.llm.base_url, model=settings.llm.model)


class ScoringWorker:
    """An async actor that makes single attempts at scoring requests with its own HTTP client.

    Everything else stays with the driver: the cache, the bound on requests in flight and
    its adaptation, requests and tokens per minute, retries and their waits, and the
    accounting. So a 429 an actor meets slows the whole run down, and a retry is admitted
    like any other request."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.endpoint = Endpoint(options["base_url"], options.get("api_key"), options.get("timeout", 120.0))

    async def attempt_many(self, batch: list[dict[str, Any]]) -> list[Reply | Failure]:
        """Every request of a batch at once, each a single attempt; the outcomes in order."""
        return list(await asyncio.gather(*(self.attempt(arguments) for arguments in batch)))

    async def attempt(self, arguments: dict[str, Any]) -> Reply | Failure:
        """One request: its reply with the endpoint's latency as measured here, or the failure as data."""
        started = time.monotonic()
        try:
            reply = await self.endpoint.post_chat(arguments)
        except Exception as error:  # noqa: BLE001 - a fault of this request alone: the rest of its batch goes on
            return Failure.of(error)
        return dataclasses.replace(reply, latency=time.monotonic() - started)

    def where(self) -> dict[str, Any]:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@dataclass
class PoolCounts:
    """What went through the pool: scoring requests by who sent them, the Ray calls (batches)
    that carried the actors' share, requests out with the actors, and batches per actor."""

    answered: dict[str, int] = field(default_factory=lambda: {"actors": 0, "driver": 0})
    calls: int = 0
    queued: int = 0
    in_flight: dict[int, int] = field(default_factory=dict)

    def sent(self, to_actors: bool) -> None:
        self.answered["actors" if to_actors else "driver"] += 1

    def batch_out(self, actor: int, size: int) -> None:
        self.calls += 1
        self.in_flight[actor] = self.in_flight.get(actor, 0) + size

    def batch_back(self, actor: int, size: int) -> None:
        self.in_flight[actor] -= size


class PoolFollower(Callback):
    """The run's events the pool acts on: it winds a local instance down once the rounds are
    over, and records itself in ``result.json``."""

    def __init__(self, executor: RayExecutor) -> None:
        self.executor = executor

    def on_rounds_done(self, state: Any) -> None:
        self.executor.wind_down()

    def on_finish(self, result: Any) -> None:
        result.records.executor["ray"] = self.executor.record()


class RayExecutor:
    """The pool of scoring actors.

    On a local instance (no address), Ray's start-up and shutdown take seconds each, and
    its processes compete with the driver for this machine's cores. So the driver answers
    requests itself until it is busy most of the time (``ray_start="auto"``; ``"now"``
    starts Ray at once), while the pool is not up yet, and once the rounds are over (only
    test scoring is left), and shuts Ray down meanwhile. On an existing cluster the pool
    starts with the run and, once its actors are up, every scoring request goes to them;
    until then (seconds: the package is shipped, the actors are placed) the driver answers,
    as it can reach the endpoint (the run checked that before it started).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.local = not settings.ray_address
        self.connection: Connection | None = None
        self.actors: list[Any] = []
        self.stopping = False
        self.counts = PoolCounts()
        self._closing: asyncio.Future[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-pool")
        self.load = DriverLoad()
        self.started_at_share: float | None = None  # the driver's load that started a local instance
        self._ready: concurrent.futures.Future[list[Any]] | None = None
        if not self.local or settings.ray_start == "now":
            self._ready = self._pool.submit(self._start)

    def _start_now(self) -> concurrent.futures.Future[list[Any]]:
        if self._ready is None:
            self._ready = self._pool.submit(self._start)
        return self._ready

    def _start(self) -> list[Any]:
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.connection = connect(self.settings.ray_address)
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        bound = self.settings.llm.max_in_flight
        count = min(self.settings.ray_actors or 2 * max(1, len(nodes)), bound)
        remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ScoringWorker)
        options = endpoint_options(self.settings)
        per_actor = -(-bound // count)

        def spawn(i: int, hard: bool = False) -> Any:
            # Round-robin over the nodes (soft: a lost node's actors restart elsewhere; hard for
            # an actor made again because the soft affinity put it off its live node).
            strategy = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=not hard) if nodes else "SPREAD"
            return remote.options(max_concurrency=per_actor * 2 + 8, scheduling_strategy=strategy).remote(options)

        self.actors = [spawn(i) for i in range(count)]
        if len(nodes) > 1:
            self._replace_misplaced(nodes, spawn)
        else:
            self._wait_until_up()
        return self.actors

    def _wait_until_up(self) -> None:
        """Returns once every actor answers (its process started, this package loaded), so
        that the driver goes on answering until then instead of its first batch waiting
        seconds for an actor that does not exist yet, with the endpoint idle."""
        import ray

        try:
            ray.get([actor.where.remote() for actor in self.actors], timeout=120)
        except Exception as error:  # the actors answer later; calls wait for them then
            log.warning("the scoring actors did not start within 120 s (%s)", type(error).__name__)

    def _replace_misplaced(self, nodes: list[str], spawn: Any) -> None:
        """A soft node affinity may still put an actor elsewhere while its node is alive (a
        freshly started cluster under load): such actors are made again, a few times, so that
        scoring fans out over every node."""
        import ray

        for attempt in range(PLACEMENT_ATTEMPTS):
            try:
                where = ray.get([actor.where.remote() for actor in self.actors], timeout=120)
            except Exception as error:  # the actors answer later; placement stays as Ray chose
                log.warning("could not check where the scoring actors run (%s)", type(error).__name__)
                return
            alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
            misplaced = [
                i for i, found in enumerate(where)
                if found["node_id"] != nodes[i % len(nodes)] and nodes[i % len(nodes)] in alive
            ]
            if not misplaced:
                return
            if attempt == PLACEMENT_ATTEMPTS - 1:
                log.warning("%d of %d scoring actors run off their node; scoring goes on", len(misplaced), len(where))
                return
            time.sleep(1.0)  # let the scheduler's view of the cluster settle
            for i in misplaced:
                ray.kill(self.actors[i])
                # made again softly, they may land on the busy head node again
                # (docs/decisions.md): the new actor must go to its node, which is alive
                self.actors[i] = spawn(i, hard=True)

    def _stop(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if self.connection is not None:
            disconnect(self.connection)

    async def ready(self) -> list[Any]:
        return await asyncio.wrap_future(self._start_now())

    def pool_open(self) -> bool:
        """Whether a request should go to the actors now (a failed start raises here). A
        local instance that is not started yet starts once the driver is busy."""
        if self.stopping:
            return False
        if self._ready is None:
            if not self.load.busy():
                return False
            self.started_at_share = self.load.share
            log.info("the driver used %.0f%% of a core: starting a local Ray instance", 100 * self.load.share)
            self._start_now()
        if not self._ready.done():
            return False  # the driver answers while the actors start, on a cluster too
        self._ready.result()
        return True

    def evaluator(self, context: RunContext) -> RayEvaluator:
        return RayEvaluator(context, self)

    async def placement(self) -> list[dict[str, Any]]:
        """Node id and process id of every actor (for tests and the run's record)."""
        actors = await self.ready()
        return list(await asyncio.gather(*(actor.where.remote() for actor in actors)))

    @property
    def answered(self) -> dict[str, int]:
        """Scoring requests sent, by who sent them (``actors``, ``driver``)."""
        return self.counts.answered

    @property
    def calls(self) -> int:
        """Ray calls that carried the actors' requests (batches)."""
        return self.counts.calls

    def callback(self) -> PoolFollower:
        return PoolFollower(self)

    def record(self) -> dict[str, Any]:
        """The pool's part of ``result.json``."""
        return {
            "local_instance": self.local,
            "started": self._ready is not None,
            "started_at_driver_load": self.started_at_share,
            "actors": len(self.actors),
            "requests": dict(self.counts.answered),
            "calls": self.counts.calls,
        }

    def wind_down(self) -> None:
        """Only test scoring is left: a local instance is shut down once its batches are back."""
        if self.local and not self.stopping:
            self.stopping = True
            self._closing = asyncio.ensure_future(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        while self.counts.queued:
            await asyncio.sleep(0.01)
        if self._ready is None:
            return  # never started
        try:
            await self.ready()
        except Exception:
            pass
        await asyncio.get_running_loop().run_in_executor(self._pool, self._stop)

    async def aclose(self) -> None:
        self.stopping = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_when_idle())
        await self._closing
        self._pool.shutdown(wait=False)


class RayEvaluator(InProcessEvaluator):
    """The driver's evaluator (its cache, limiter, retries and accounting) whose attempts
    ``_send`` makes."""

    def __init__(self, context: RunContext, executor: RayExecutor) -> None:
        super().__init__(context.task, context.target_llm, send=self._send, **evaluator_options(context))
        self.executor = executor
        self.batches = Batches(executor, lambda: context.target_llm.limiter.capacity)

    async def _send(self, arguments: dict[str, Any]) -> Reply:
        """One attempt, made once the driver's limiter admitted it: by an actor, in a batch
        with the other attempts admitted in the same turn of the event loop, or, while the
        pool is not up (or no longer), by the driver itself."""
        to_actors = self.executor.pool_open()
        self.executor.counts.sent(to_actors)
        if not to_actors:
            return await self.llm.post(arguments)
        outcome = await self.batches.submit(arguments)
        if isinstance(outcome, Failure):
            outcome.raise_()
        return outcome


class Batches:
    """Attempts go to the actors in batches: those the limiter admits in one turn of the
    event loop (a batch's worth of slots freed at once, or a stage's first requests) leave
    together, to the least busy actors, at most ``MAX_BATCH`` a call: a Ray call costs the
    driver about as much CPU as the HTTP request it carries (docs/decisions.md)."""

    def __init__(self, executor: RayExecutor, capacity: Callable[[], int]) -> None:
        self.executor = executor
        self.capacity = capacity  # the bound on requests in flight now
        self.pending: list[tuple[dict[str, Any], asyncio.Future[Reply | Failure]]] = []
        self._calls: set[asyncio.Future[None]] = set()
        self._order = itertools.count()

    def submit(self, arguments: dict[str, Any]) -> asyncio.Future[Reply | Failure]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply | Failure] = loop.create_future()
        self.pending.append((arguments, future))
        self.executor.counts.queued += 1
        if len(self.pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        # Batches of about a (2 × actors)th of the bound: every actor has two in flight, so it
        # works on one while the other travels. Splitting every group over all actors instead
        # halves the batches at each return (a returned batch frees its slots at once, and the
        # attempts they admit form the next group), down to a few requests a call.
        target = max(1, min(MAX_BATCH, self.capacity() // (2 * max(1, len(self.executor.actors)))))
        count = -(-len(pending) // target)
        size = -(-len(pending) // count)
        for start in range(0, len(pending), size):
            task = asyncio.ensure_future(self._call(pending[start : start + size]))
            self._calls.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._calls.discard)

    async def _call(self, chunk: list[tuple[dict[str, Any], asyncio.Future[Reply | Failure]]]) -> None:
        try:
            outcomes = await self._dispatch([arguments for arguments, _ in chunk])
        except BaseException as error:
            for _, future in chunk:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        finally:
            self.executor.counts.queued -= len(chunk)
        for (_, future), outcome in zip(chunk, outcomes):
            if not future.done():
                future.set_result(outcome)

    async def _dispatch(self, batch: list[dict[str, Any]]) -> list[Reply | Failure]:
        actors = await self.executor.ready()
        # imported once Ray is (by the pool's thread): importing it from two threads at once
        # fails with a partly initialised module
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        counts = self.executor.counts
        last: Exception | None = None
        for _ in range(MAX_RESUBMITS):
            start = next(self._order)  # the least busy actor; ties go round-robin
            rotation = [(start + k) % len(actors) for k in range(len(actors))]
            index = min(rotation, key=lambda i: counts.in_flight.get(i, 0))
            counts.batch_out(index, len(batch))
            try:
                return await actors[index].attempt_many.remote(batch)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                last = error  # this actor is gone for good: another one takes the batch
                log.warning("scoring actor %d failed (%s); sending its %d requests elsewhere", index, type(error).__name__, len(batch))
            finally:
                counts.batch_back(index, len(batch))
        raise EndpointUnavailable(f"scoring actors kept failing ({type(last).__name__}); check the Ray cluster")


def make_executor(settings: Settings) -> RayExecutor:
    """Entry point ``distillprompt.executors: ray``."""
    return RayExecutor(settings)
