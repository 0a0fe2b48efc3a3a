"""Scoring on Ray: a pool of async actors behind the driver's cache and one global bound.

The driver looks every (prompt, example) request up in the response cache and sends only
the misses to the actors; each actor holds its own async OpenAI client and applies the LLM
layer's retry rules. The driver's limiter bounds the requests in flight across the whole
pool (``--concurrency``), whatever the number of actors or CPUs. Replies come back once and
are written to the cache by the driver, so a cluster needs no shared disk.

Actors are restarted when they die (process killed, node lost) and Ray re-sends the calls
they had not answered; a call whose actor cannot be brought back is sent to another actor.
Each request's reply is recorded once, when its call returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import asdict
from typing import Any

from distillprompt.errors import EndpointUnavailable, UserError
from distillprompt.evaluation import RequestEvaluator
from distillprompt.llm import SCORING, Usage
from distillprompt.optimizer import Callback
from distillprompt.runner import RunContext, client_options, evaluator_options
from distillprompt.settings import Settings

from .cluster import Connection, connect, disconnect

log = logging.getLogger(__name__)

MAX_RESUBMITS = 5
PLACEMENT_ATTEMPTS = 3  # checks of where the actors run, on a cluster of several nodes


def endpoint_options(settings: Settings) -> dict[str, Any]:
    """What an actor needs to build its client for the target model (the key included: it
    travels as an actor argument, never in a runtime env, log or job spec)."""
    return dict(client_options(settings), base_url=settings.llm.base_url, model=settings.llm.model)


class ScoringWorker:
    """An async actor that answers scoring requests with its own client (no cache)."""

    def __init__(self, options: dict[str, Any], concurrency: int) -> None:
        from distillprompt.llm import ChatClient, PriorityLimiter, UsageMeter

        # The driver bounds requests in flight; the actor's own limiter never blocks.
        self.client = ChatClient(limiter=PriorityLimiter(max(concurrency, 1) * 4), meter=UsageMeter(), **options)

    async def answer(self, messages: list[dict[str, str]], max_tokens: int, stop: tuple[str, ...]) -> dict[str, Any]:
        spent = Usage()
        try:
            texts = await self.client.fetch(
                messages, temperature=0.0, n=1, max_tokens=max_tokens, sample=0, priority=SCORING, spent=spent, stop=stop
            )
        except EndpointUnavailable as error:
            return {"error": str(error), "kind": "unavailable", "usage": asdict(spent)}
        except UserError as error:
            return {"error": str(error), "kind": "user", "usage": asdict(spent)}
        return {"texts": texts, "usage": asdict(spent)}

    def where(self) -> dict[str, Any]:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class RayExecutor(Callback):
    """The pool of scoring actors.

    On a local instance (no address), Ray's start-up and shutdown take seconds each; the
    driver, on the same machine, answers requests itself while the pool is not up yet and
    once the rounds are over (only test scoring is left), and shuts Ray down meanwhile. On
    an existing cluster every scoring request goes to the actors: the driver may not even
    reach the endpoint the cluster uses.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.local = not settings.ray_address
        self.connection: Connection | None = None
        self.actors: list[Any] = []
        self.in_flight: dict[int, int] = {}
        self.stopping = False
        self.answered = {"actors": 0, "driver": 0}  # scoring requests sent, by who sent them
        self._closing: asyncio.Future[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-pool")
        self._ready = self._pool.submit(self._start)

    def _start(self) -> list[Any]:
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.connection = connect(self.settings.ray_address)
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))
        count = min(self.settings.ray_actors or 2 * max(1, len(nodes)), self.settings.llm.concurrency)
        remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ScoringWorker)
        options = endpoint_options(self.settings)
        per_actor = -(-self.settings.llm.concurrency // count)

        def spawn(i: int, hard: bool = False) -> Any:
            # Round-robin over the nodes (soft: a lost node's actors restart elsewhere; hard for
            # an actor made again because the soft affinity put it off its live node).
            strategy = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=not hard) if nodes else "SPREAD"
            return remote.options(max_concurrency=per_actor * 2 + 8, scheduling_strategy=strategy).remote(options, per_actor)

        self.actors = [spawn(i) for i in range(count)]
        if len(nodes) > 1:
            self._replace_misplaced(nodes, spawn)
        return self.actors

    def _replace_misplaced(self, nodes: list[str], spawn: Any) -> None:
        """A soft node affinity may still put an actor elsewhere while its node is alive (seen
        on a freshly started cluster under load): such actors are made again, a few times, so
        that scoring fans out over every node."""
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
                # Soft affinity kept choosing the busy head node on a freshly started cluster
                # (all 4 actors on one node in CI even after re-making them): the new actor
                # must go to its node, which is alive.
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
        return await asyncio.wrap_future(self._ready)

    def pool_open(self) -> bool:
        """Whether a request should go to the actors now (a failed start raises here)."""
        if self.stopping:
            return False
        if not self._ready.done():
            return not self.local  # a remote cluster is waited for, a local one is not
        self._ready.result()
        return True

    def evaluator(self, context: RunContext) -> RayEvaluator:
        return RayEvaluator(context, self)

    async def placement(self) -> list[dict[str, Any]]:
        """Node id and process id of every actor (for tests and the run's record)."""
        actors = await self.ready()
        return list(await asyncio.gather(*(actor.where.remote() for actor in actors)))

    def on_finish(self, result: Any) -> None:
        result.extra["ray"] = {"local_instance": self.local, "actors": len(self.actors), "requests": dict(self.answered)}

    def on_rounds_done(self, state: Any) -> None:
        if self.local and not self.stopping:
            self.stopping = True
            self._closing = asyncio.ensure_future(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        while sum(self.in_flight.values()):
            await asyncio.sleep(0.01)
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


class RayEvaluator(RequestEvaluator):
    def __init__(self, context: RunContext, executor: RayExecutor) -> None:
        super().__init__(context.task, **evaluator_options(context))
        self.client = context.target_llm  # cache keys, cache and usage meter of the driver
        self.limiter = context.limiter
        self.executor = executor
        self._order = itertools.count()

    async def answer(self, messages: list[dict[str, str]], stage: str) -> str:
        key = self.client.cache_key(messages, temperature=0.0, max_tokens=self.max_tokens, n=1, sample=0, stop=self.stop)
        cached = self.client.lookup(key, stage)
        if cached is not None:
            return cached[0] if cached else ""
        if not self.executor.pool_open():
            # The driver answers itself, under the same limiter, cache and retry rules.
            self.executor.answered["driver"] += 1
            texts = await self.client.fetch_and_store(
                key, messages, temperature=0.0, n=1, max_tokens=self.max_tokens, stage=stage, sample=0, priority=SCORING,
                stop=self.stop,
            )
            return texts[0] if texts else ""
        self.executor.answered["actors"] += 1
        started = time.time()
        await self.limiter.acquire(SCORING)
        try:
            reply = await self._dispatch(messages)
        finally:
            self.limiter.release()
        spent = Usage(**reply["usage"])
        if "error" in reply:
            self.client.meter.record(stage, spent)
            raise (UserError if reply["kind"] == "user" else EndpointUnavailable)(reply["error"])
        self.client.store(key, reply["texts"], spent, stage, messages, started)
        return reply["texts"][0] if reply["texts"] else ""

    async def _dispatch(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        actors = await self.executor.ready()
        in_flight = self.executor.in_flight
        last: Exception | None = None
        for _ in range(MAX_RESUBMITS):
            start = next(self._order)  # the least busy actor; ties go round-robin
            rotation = [(start + k) % len(actors) for k in range(len(actors))]
            index = min(rotation, key=lambda i: in_flight.get(i, 0))
            in_flight[index] = in_flight.get(index, 0) + 1
            try:
                return await actors[index].answer.remote(messages, self.max_tokens, self.stop)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                last = error  # this actor is gone for good: another one takes the request
                log.warning("scoring actor %d failed (%s); sending its request elsewhere", index, type(error).__name__)
            finally:
                in_flight[index] -= 1
        raise EndpointUnavailable(f"scoring actors kept failing ({type(last).__name__}); check the Ray cluster")


def make_executor(settings: Settings) -> RayExecutor:
    """Entry point ``distillprompt.executors: ray``."""
    return RayExecutor(settings)
