"""The LLM layer and the response cache, against the scripted endpoint over real sockets."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from distillprompt.cache import CachedReply, ResponseCache, request_key
from distillprompt.errors import EndpointUnavailable, UserError
from distillprompt.llm import (
    META, SCORING, AttemptFailed, ChatClient, Prices, PriorityLimiter, UsageMeter, check_endpoint, retry_delay,
)
from tests.endpoint import ScriptedEndpoint, answer_scoring

SCORING_MESSAGES = [
    {"role": "user", "content": "Classify it.\n\nPossible answers: negative, positive.\n\nInput: a great film\n\nGive only the answer."}
]


def make_client(endpoint: ScriptedEndpoint, **overrides) -> ChatClient:
    options = dict(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key,
        model="test-model",
        limiter=PriorityLimiter(overrides.pop("concurrency", 8)),
        meter=UsageMeter(),
        backoff_base=0.01,
        backoff_max=0.05,
        max_retries=4,
        timeout=5,
    )
    options.update(overrides)
    return ChatClient(**options)


def complete(client: ChatClient, messages=SCORING_MESSAGES, **kwargs) -> list[str]:
    async def go():
        try:
            return await client.complete(messages, temperature=kwargs.pop("temperature", 0.0), max_tokens=20, **kwargs)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_transient_errors_are_retried_until_an_answer(endpoint):
    endpoint.script = ["429", "500", "drop", "garbage", "429:not-a-date", "ok"]
    client = make_client(endpoint, max_retries=6)
    assert complete(client) == [answer_scoring(SCORING_MESSAGES[0]["content"])]
    statuses = [entry.status for entry in endpoint.requests(status=None)]
    assert statuses == [429, 500, 0, 0, 429, 200]
    total = client.meter.total()
    assert (total.requests, total.retries, total.failed) == (1, 5, 0)


def test_retry_after_header_sets_the_wait(endpoint):
    endpoint.script = ["429:1"]
    client = make_client(endpoint, backoff_base=0.0, backoff_max=0.0)
    complete(client)
    assert [entry.status for entry in endpoint.requests(status=None)] == [429, 200]
    assert client.meter.total().throttled == 1
    # backoff alone would retry at once (base 0): the wait is the one the endpoint asked for
    # (how long the client then waits, in time: benchmarks/pacing.py)
    asked = AttemptFailed(429, retry_after=1.0, detail="slow down")
    assert retry_delay(asked, 0, 0.0, 0.0, random.Random()) == 1.0


@pytest.mark.parametrize("status_script", [["500"] * 10, ["429"] * 10])
def test_errors_beyond_the_retry_budget_raise_endpoint_unavailable(endpoint, status_script):
    endpoint.script = status_script
    client = make_client(endpoint, max_retries=2)
    with pytest.raises(EndpointUnavailable, match="after 2 retries"):
        complete(client)
    assert len(endpoint.requests(status=None)) == 3
    assert client.meter.total().failed == 1


def test_timeouts_are_retried_then_reported():
    with ScriptedEndpoint(latency=1.0) as slow:
        client = make_client(slow, timeout=0.2, max_retries=1)
        with pytest.raises(EndpointUnavailable, match=r"no reply within 0.2 s \(--timeout\)"):
            complete(client)
        total = client.meter.total()
        assert (total.retries, total.failed, total.requests) == (1, 1, 0)  # tried twice, then reported


def test_wrong_api_key_is_a_user_error_without_retry():
    with ScriptedEndpoint(api_key="right-key") as guarded:
        client = make_client(guarded, api_key="wrong-key")
        with pytest.raises(UserError, match="rejected the API key.*OPENAI_API_KEY"):
            complete(client)
        assert len(guarded.log) == 0  # 401 is answered before the request is logged as a completion
        assert client.meter.total().retries == 0


def test_unknown_model_is_a_user_error(endpoint):
    client = make_client(endpoint, model="no-such-model")
    with pytest.raises(UserError, match="404.*--model"):
        complete(client)
    assert client.meter.total().retries == 0


def test_global_bound_on_requests_in_flight():
    with ScriptedEndpoint(latency=0.1) as slow:
        limiter = PriorityLimiter(4)
        meter = UsageMeter()
        client = make_client(slow, limiter=limiter, meter=meter)
        other = make_client(slow, limiter=limiter, meter=meter)  # a second client shares the bound

        async def go():
            messages = [
                [{"role": "user", "content": SCORING_MESSAGES[0]["content"].replace("great", f"great {i}")}]
                for i in range(24)
            ]
            await asyncio.gather(
                *(
                    (client if i % 2 else other).complete(m, temperature=0, max_tokens=5, priority=SCORING)
                    for i, m in enumerate(messages)
                )
            )
            await client.aclose()
            await other.aclose()

        asyncio.run(go())
        assert slow.peak_in_flight == 4
        assert meter.total().requests == 24


def test_priority_limiter_serves_meta_before_queued_scoring():
    async def go():
        limiter = PriorityLimiter(1)
        order: list[str] = []
        await limiter.acquire(SCORING)  # the only slot is busy

        async def worker(name: str, priority: int):
            await limiter.acquire(priority)
            order.append(name)
            limiter.release()

        tasks = [asyncio.create_task(worker(f"score{i}", SCORING)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(worker("meta", META)))
        await asyncio.sleep(0)
        limiter.release()
        await asyncio.gather(*tasks)
        return order, limiter.in_flight

    order, in_flight = asyncio.run(go())
    assert order == ["meta", "score0", "score1", "score2"]
    assert in_flight == 0


META_MESSAGES = [{"role": "user", "content": "You improve instructions.\n\nInstruction:\nSay it.\n\nWrite between <START> and <END>."}]


def test_n_samples_in_one_call_when_supported(endpoint):
    client = make_client(endpoint, seed=1)
    texts = complete(client, META_MESSAGES, n=4, temperature=0.7)
    assert len(texts) == 4
    assert [entry.n for entry in endpoint.requests()] == [4]


def test_n_samples_fall_back_to_separate_calls():
    with ScriptedEndpoint(support_n=False) as plain:
        client = make_client(plain, seed=1)
        texts = complete(client, META_MESSAGES, n=3, temperature=0.7)
        assert len(texts) == 3
        # one try with n=3 (answered with one sample), then the two missing samples alone
        assert [entry.n for entry in plain.requests()] == [3, 1, 1]
        assert client.requester.native_n is False


def test_native_n_mode_refuses_an_endpoint_that_ignores_n():
    with ScriptedEndpoint(support_n=False) as plain:
        client = make_client(plain, n_mode="native")
        with pytest.raises(UserError, match="--n-mode"):
            complete(client, META_MESSAGES, n=3, temperature=0.7)


def test_usage_and_cost_come_from_the_response(endpoint):
    client = make_client(endpoint, prices=Prices(2.0, 10.0))
    (text,) = complete(client)
    total = client.meter.total()
    expected_in = len(SCORING_MESSAGES[0]["content"]) // 4  # the endpoint's token rule
    expected_out = len(text) // 4
    assert (total.input_tokens, total.output_tokens) == (expected_in, expected_out)
    assert total.cost == pytest.approx((expected_in * 2.0 + expected_out * 10.0) / 1_000_000)


def test_cached_request_costs_nothing_and_survives_a_reopen(endpoint, cache_path):
    first = make_client(endpoint, cache=ResponseCache(cache_path))
    answer = complete(first)
    assert len(endpoint.requests()) == 1
    second = make_client(endpoint, cache=ResponseCache(cache_path))  # a new process would open it the same way
    assert complete(second) == answer
    assert len(endpoint.requests()) == 1
    total = second.meter.total()
    assert (total.requests, total.cache_hits) == (0, 1)
    assert total.cached_tokens > 0
    assert second.cache.stats() == {"hits": 1, "misses": 0, "write_transactions": 0}


def test_cache_key_separates_what_shapes_a_reply(endpoint, cache_path):
    client = make_client(endpoint, cache=ResponseCache(cache_path), seed=3)

    async def go():
        for kwargs in (dict(temperature=0.0), dict(temperature=0.5), dict(temperature=0.0, salt=1), dict(temperature=0.0)):
            await client.complete(SCORING_MESSAGES, max_tokens=20, **kwargs)
        await client.complete(SCORING_MESSAGES, max_tokens=21, temperature=0.0)
        await client.aclose()

    asyncio.run(go())
    # five calls, one repeat: four reach the endpoint
    assert len(endpoint.requests()) == 4
    assert client.cache.stats() == {"hits": 1, "misses": 4, "write_transactions": 4}


def test_no_cache_means_every_call_is_sent(endpoint):
    client = make_client(endpoint, cache=None)

    async def go():
        for _ in range(3):
            await client.complete(SCORING_MESSAGES, temperature=0, max_tokens=20)
        await client.aclose()

    asyncio.run(go())
    assert len(endpoint.requests()) == 3


def test_cache_is_safe_for_concurrent_writers(cache_path):
    cache = ResponseCache(cache_path)
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for i in range(50):
                key = request_key(endpoint="e", model="m", messages=[{"role": "user", "content": f"{worker}-{i}"}],
                                  temperature=0, max_tokens=1, n=1)
                cache.put(key, CachedReply([f"reply {worker}-{i}"], 1, 1))
                assert cache.get(key).texts == [f"reply {worker}-{i}"]
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(cache) == 400
    assert len(ResponseCache(cache_path)) == 400


def test_replies_that_arrive_together_are_written_in_one_transaction_at_the_end_of_the_turn(cache_path):
    """Group commit: a stage's replies do not pay a commit each, and a run killed after a
    turn of its event loop has every reply of that turn on disk."""
    import sqlite3

    cache = ResponseCache(cache_path)

    def on_disk() -> int:  # what another process (a resumed run) would find
        with sqlite3.connect(cache_path) as other:
            return other.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    async def one_turn() -> tuple[int, int]:
        for i in range(50):
            cache.put(f"key-{i}", CachedReply([f"reply {i}"], 3, 1))
        assert cache.get("key-7").texts == ["reply 7"]  # readable before it is written
        before = on_disk()
        await asyncio.sleep(0)  # the turn ends
        return before, on_disk()

    assert asyncio.run(one_turn()) == (0, 50)
    assert cache.transactions == 1
    cache.put("outside", CachedReply(["no event loop"], 1, 1))  # no loop to group with: written at once
    assert on_disk() == 51 and cache.transactions == 2
    found = cache.get_many(["key-0", "missing", "outside"])
    assert sorted(found) == ["key-0", "outside"] and found["outside"].texts == ["no event loop"]


def test_a_cache_write_that_fails_is_reported_by_the_next_reply_and_loses_nothing(cache_path):
    cache = ResponseCache(cache_path)

    async def run() -> str:
        cache._db.execute("PRAGMA query_only = 1")  # as a full disk would refuse the write
        cache.put("first", CachedReply(["paid for"], 3, 1))
        await asyncio.sleep(0)  # the turn ends: its write fails
        with pytest.raises(UserError) as failed:
            cache.put("second", CachedReply(["paid for too"], 3, 1))
        cache._db.execute("PRAGMA query_only = 0")  # space again
        return str(failed.value)

    message = asyncio.run(run())
    assert "cannot write the response cache" in message and "--cache-path" in message and "\n" not in message
    cache.close()  # writes what the failed turn held
    reopened = ResponseCache(cache_path)
    assert {key: reply.texts for key, reply in reopened.get_many(["first", "second"]).items()} == {
        "first": ["paid for"], "second": ["paid for too"]}


def test_a_stage_sends_only_the_requests_the_cache_does_not_hold(endpoint, cache_path):
    client = make_client(endpoint, cache=ResponseCache(cache_path))
    stage = [[{"role": "user", "content": f"Classify it.\n\nInput: review {i}"}] for i in range(30)]
    done: list[int] = []

    async def go(requests):
        try:
            return await client.complete_many(requests, temperature=0.0, max_tokens=20, stage="scoring", on_done=done.append)
        finally:
            await client.aclose()

    first = asyncio.run(go(stage[:10]))
    assert len(endpoint.requests()) == 10
    client = make_client(endpoint, cache=ResponseCache(cache_path))
    replies = asyncio.run(go(stage))
    assert replies[:10] == first and all(replies)
    assert len(endpoint.requests()) == 30  # the 10 cached ones were not sent again
    total = client.meter.total()
    assert (total.cache_hits, total.requests) == (10, 20)
    assert sum(done) == 10 + 30  # progress heard of every request, cached or sent


def test_unwritable_cache_path_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--cache-path"):
        ResponseCache(blocker / "cache.sqlite")


def test_check_endpoint_names_the_fix(endpoint):
    asyncio.run(check_endpoint(endpoint.base_url, None, "test-model"))
    with pytest.raises(UserError, match="does not serve model 'gpt-x'.*test-model"):
        asyncio.run(check_endpoint(endpoint.base_url, None, "gpt-x"))
    port = endpoint.port
    endpoint.stop()
    with pytest.raises(UserError, match="cannot reach the endpoint .*--base-url"):
        asyncio.run(check_endpoint(f"http://127.0.0.1:{port}/v1", None, "test-model", timeout=2))


def test_check_endpoint_rejects_a_wrong_key():
    with ScriptedEndpoint(api_key="right-key") as guarded:
        with pytest.raises(UserError, match="401"):
            asyncio.run(check_endpoint(guarded.base_url, "wrong", "test-model"))


def self_signed_certificate(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key (a company CA in miniature)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_an_https_endpoint_with_an_untrusted_certificate_fails_at_once_and_ssl_cert_file_fixes_it(tmp_path, monkeypatch):
    import ssl

    cert_file, key_file = self_signed_certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    with ScriptedEndpoint(tls=tls) as secure:
        assert secure.base_url.startswith("https://")
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        with pytest.raises(UserError, match="set SSL_CERT_FILE") as refused:
            asyncio.run(check_endpoint(secure.base_url, None, "test-model"))
        assert "\n" not in str(refused.value)
        with pytest.raises(UserError, match="set SSL_CERT_FILE"):
            complete(make_client(secure))  # no retries: a certificate does not get better
        assert secure.requests() == []

        monkeypatch.setenv("SSL_CERT_FILE", cert_file)
        asyncio.run(check_endpoint(secure.base_url, None, "test-model"))
        assert complete(make_client(secure)) == [answer_scoring(SCORING_MESSAGES[0]["content"])]
        assert len(secure.requests()) == 1


def test_runs_of_other_seeds_sharing_a_cache_sample_their_own_replies(endpoint, cache_path):
    """The sampling seed a request carries shapes its reply, so it is part of the cache key:
    a run with another --seed does not get the first run's samples for the same meta-prompt,
    while answers at temperature 0 (scoring) are shared."""
    meta = [{"role": "user", "content": "Improve it. <START> <END>\n\nInstruction:\nClassify.\n\n"}]

    async def run(seed: int) -> None:
        client = make_client(endpoint, cache=ResponseCache(cache_path), seed=seed)
        await client.complete(meta, temperature=0.7, max_tokens=20, salt="1:rewrite")
        await client.complete(SCORING_MESSAGES, temperature=0.0, max_tokens=20)
        await client.aclose()

    asyncio.run(run(1))
    asyncio.run(run(2))
    asyncio.run(run(1))  # a rerun of the first: everything from the cache
    sent = endpoint.requests()
    assert len(sent) == 3
    assert sorted(entry.temperature for entry in sent) == [0.0, 0.7, 0.7]


# ----- what the endpoint takes, learned from its refusals -------------------------------------


def test_a_reasoning_model_s_refusals_teach_the_client_what_it_takes_once_for_every_client(caplog):
    """OpenAI's reasoning models answer 400 to max_tokens and to a temperature but 1: the
    client learns both, says each once, sends the refused request again as the endpoint
    takes it, and a second client of the same endpoint and model (sharing what was learned)
    never meets the refusals."""
    from distillprompt.llm import Accepts

    with ScriptedEndpoint(reasoning=True) as reasoning:
        accepts = Accepts(reasoning.base_url, "test-model", reasoning_room=1000)
        first = make_client(reasoning, accepts=accepts, prices=Prices(output=10.0))
        with caplog.at_level("WARNING"):
            (text,) = complete(first)
        assert text == answer_scoring(SCORING_MESSAGES[0]["content"])
        assert [(e.status, e.refused) for e in reasoning.requests(status=None)] == [
            (400, "max_tokens"), (400, "temperature"), (200, "")]
        answered = reasoning.requests()[0]
        assert "temperature" not in answered.parameters and "max_tokens" not in answered.parameters
        assert answered.max_completion_tokens == 20 + 1000  # the answer budget and room to reason
        said = [r.getMessage() for r in caplog.records if "does not take" in r.getMessage()]
        assert len(said) == 2 and "max_completion_tokens" in said[0] and "default" in said[1]
        total = first.meter.total()
        assert (total.requests, total.parameter_refusals, total.failed, total.refusals) == (1, 2, 0, 0)
        # reasoning tokens are output tokens: counted and paid
        assert total.reasoning_tokens == 300 and total.output_tokens == 300 + len(text) // 4
        assert total.cost == pytest.approx(total.output_tokens * 10.0 / 1e6)

        reasoning.reset()
        caplog.clear()
        other = make_client(reasoning, accepts=accepts)
        with caplog.at_level("WARNING"):
            complete(other, [{"role": "user", "content": SCORING_MESSAGES[0]["content"] + " Really."}])
        assert [e.status for e in reasoning.requests(status=None)] == [200] and not caplog.records


def test_no_room_to_reason_is_said_and_scores_as_an_empty_reply(caplog):
    with ScriptedEndpoint(reasoning=True) as reasoning:
        client = make_client(reasoning)  # no room beyond the answer budget: 20 tokens, 300 to think
        with caplog.at_level("WARNING"):
            assert complete(client) == [""]
        assert any("--reasoning-tokens" in r.getMessage() for r in caplog.records)


def test_an_endpoint_that_refuses_n_gets_the_samples_one_by_one(caplog):
    with ScriptedEndpoint(refuse_n=True) as plain:
        client = make_client(plain, seed=1)
        with caplog.at_level("WARNING"):
            texts = complete(client, META_MESSAGES, n=3, temperature=0.7)
        assert len(texts) == 3
        assert [(e.status, e.n) for e in plain.requests(status=None)] == [(400, 3), (200, 1), (200, 1), (200, 1)]
        assert sum("does not take 'n'" in r.getMessage() for r in caplog.records) == 1
    with ScriptedEndpoint(refuse_n=True) as plain:
        with pytest.raises(UserError, match="--n-mode separate"):
            complete(make_client(plain, n_mode="native"), META_MESSAGES, n=3, temperature=0.7)


def test_a_refusal_that_names_nothing_the_client_can_leave_out_stays_a_user_error():
    class Strict(ScriptedEndpoint):
        def _refusal(self, request, content):
            return "messages", {"error": {"message": "Invalid value for 'messages'.", "type": "invalid_request_error",
                                          "param": "messages", "code": "invalid_value"}}

    with Strict() as strict:
        with pytest.raises(UserError, match=r"refused the request \(400: Invalid value for 'messages'"):
            complete(make_client(strict))
        assert len(strict.requests(status=None)) == 1


def test_requests_refused_for_length_or_content_are_one_request_s_loss(caplog):
    """Too long for the context, or stopped by a content filter: the client raises
    RequestRefused for one request (said once per reason); in a stage, the request gets an
    empty reply and its position is reported, and the others are answered."""
    from distillprompt.llm import RequestRefused

    long_one = [{"role": "user", "content": "Classify it.\n\nPossible answers: negative, positive.\n\nInput: "
                 + "a great film " * 200}]
    flagged = [{"role": "user", "content": SCORING_MESSAGES[0]["content"].replace("great", "forbidden")}]
    with ScriptedEndpoint(context=300, flagged=("forbidden",)) as strict:
        with pytest.raises(RequestRefused) as refused:
            complete(make_client(strict), long_one)
        assert refused.value.reason == "context_length" and "maximum context length is 300" in refused.value.detail
        client = make_client(strict)
        heard: list[tuple[int, str]] = []

        async def stage():
            try:
                return await client.complete_many([SCORING_MESSAGES, long_one, flagged], temperature=0.0, max_tokens=20,
                                                  stage="scoring", on_refused=lambda i, reason: heard.append((i, reason)))
            finally:
                await client.aclose()

        caplog.clear()
        with caplog.at_level("WARNING"):
            replies = asyncio.run(stage())
        assert replies[0] == answer_scoring(SCORING_MESSAGES[0]["content"]) and replies[1:] == ["", ""]
        assert sorted(heard) == [(1, "context_length"), (2, "content_filter")]
        total = client.meter.total()
        assert (total.requests, total.refusals, total.failed, total.retries) == (1, 2, 0, 0)
        assert len(strict.requests(status=None)) == 4  # none asked twice
        assert sum("refused a request" in r.getMessage() for r in caplog.records) == 2


def test_a_failure_carried_back_from_a_ray_actor_keeps_what_the_endpoint_said():
    from distillprompt.llm import AttemptFailed, Failure

    failure = Failure.of(AttemptFailed(400, None, ": Unsupported parameter", "unsupported_parameter", "max_tokens"))
    with pytest.raises(AttemptFailed) as raised:
        failure.raise_()
    assert (raised.value.code, raised.value.param, raised.value.detail) == (
        "unsupported_parameter", "max_tokens", ": Unsupported parameter")
