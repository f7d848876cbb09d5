"""The penalty box (service/penalty.py): the refusal meter with a fake clock, the ASGI layer with
fake apps; the real server's behaviour is in test_service_abuse.py."""
from __future__ import annotations

import asyncio

import pytest

from service.penalty import GRACE_S, PenaltyBoxMiddleware, RefusalPenalty, client_key, is_refusal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_the_clients_doing_only():
    assert is_refusal(None) and is_refusal(400) and is_refusal(404) and is_refusal(413) and is_refusal(408)
    assert not is_refusal(200) and not is_refusal(429) and not is_refusal(500) and not is_refusal(503)


def test_ipv6_clients_count_by_their_64_prefix():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("10.0.0.1") == "10.0.0.1" and client_key("not-an-ip:x") == "not-an-ip:x"


def test_a_burst_is_free_then_each_refusal_adds_one_interval_up_to_the_cap():
    clock = Clock()
    box = RefusalPenalty(rate=10, burst=5, max_delay_s=2, clock=clock)
    for _ in range(5):
        box.refused("a")
    assert box.late("a") == 0.0 and box.hold("a") == 0.0  # within the burst
    box.refused("a")
    assert box.late("a") == pytest.approx(0.1) and box.hold("a") == pytest.approx(0.1)
    for _ in range(100):
        box.refused("a")
    assert box.late("a") == pytest.approx(2.0)  # capped
    assert box.late("b") == 0.0 and box.hold("b") == 0.0  # other addresses untouched


def test_an_address_with_as_many_normal_answers_is_never_held_before_it_is_read():
    """Many users behind one proxy: an abuser among them makes their refusals late, never their
    requests; an abuser that mixes in a few valid requests is held all the same."""
    clock = Clock()
    box = RefusalPenalty(rate=10, burst=0, max_delay_s=2, clock=clock)
    for _ in range(50):
        box.answered("proxy")
        box.refused("proxy")
    assert box.late("proxy") == pytest.approx(2.0) and box.hold("proxy") == 0.0
    for _ in range(50):
        box.refused("abuser")
    for _ in range(5):
        box.answered("abuser")
    assert box.hold("abuser") == pytest.approx(2.0)
    clock.now += 3 * GRACE_S  # the answers decay like the refusals: a quiet proxy that starts refusing is held
    for _ in range(20):
        box.refused("proxy")
    assert box.hold("proxy") > 0


def test_debt_drains_at_the_rate_and_drained_addresses_are_forgotten():
    clock = Clock()
    box = RefusalPenalty(rate=10, burst=5, max_delay_s=2, clock=clock)
    for _ in range(1000):
        box.refused("a")
    # the debt is bounded: burst + max delay (+ one interval) drains in at most 2.6 s
    clock.now += 0.5
    assert box.late("a") == pytest.approx(2.0 + 0.1 - 0.5)
    clock.now += 2.2
    assert box.late("a") == 0.0
    clock.now += 5 * GRACE_S  # and its counts have decayed
    box.forget_drained()
    assert len(box) == 0


def test_memory_is_bounded_by_max_clients():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1, max_clients=100, clock=Clock())
    for i in range(1000):
        box.refused(f"10.0.{i // 256}.{i % 256}")
    assert len(box) == 100


def run_requests(mw, count=1, path="/classify", client=("10.0.0.1", 5000)):
    """``count`` concurrent requests through ``mw``; [(seconds, sent messages)] in order."""
    async def one():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await mw({"type": "http", "path": path, "client": client, "headers": []}, receive, send)
        except RuntimeError:
            pass
        return loop.time() - start, sent

    async def main():
        return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(main())


def answering(status: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def test_a_flooding_address_gets_late_refusals_then_is_held_before_it_is_read():
    box = RefusalPenalty(rate=5, burst=1, max_delay_s=0.2)
    delays = []
    refuse = PenaltyBoxMiddleware(answering(400), box, exempt={"/readyz"}, on_delay=delays.append)
    for _ in range(4):
        run_requests(refuse)
    ((seconds, sent),) = run_requests(PenaltyBoxMiddleware(answering(200), box, exempt={"/readyz"}))
    assert seconds >= 0.15 and sent[0]["status"] == 200  # held (no normal answer yet), then answered normally
    assert delays and all(0 < d <= 0.2 for d in delays)
    assert run_requests(PenaltyBoxMiddleware(answering(200), box, exempt={"/readyz"}), path="/readyz")[0][0] < 0.05
    assert run_requests(refuse, client=("10.0.0.2", 1))[0][0] < 0.05  # another address


def test_a_mixed_address_gets_its_good_answers_at_once_and_its_refusals_late():
    box = RefusalPenalty(rate=5, burst=1, max_delay_s=0.2)
    good, bad = PenaltyBoxMiddleware(answering(200), box), PenaltyBoxMiddleware(answering(413), box)
    for _ in range(6):  # as many normal answers as refusals: users behind one proxy
        run_requests(good)
    for _ in range(3):
        run_requests(bad)
    bad_seconds = []
    for _ in range(4):
        assert run_requests(good)[0][0] < 0.05
        seconds, sent = run_requests(bad)[0]
        assert sent[0]["status"] == 413
        bad_seconds.append(seconds)
    # one client in a loop: each late answer drains the debt it adds, so about every other one waits 0.2 s
    assert sum(bad_seconds) >= 0.35, bad_seconds


def test_too_many_held_requests_get_429_without_reaching_the_app():
    box = RefusalPenalty(rate=5, burst=0, max_delay_s=0.3, max_held=2)
    calls = []

    async def app(scope, receive, send):
        calls.append(1)
        await answering(400)(scope, receive, send)

    mw = PenaltyBoxMiddleware(app, box)
    run_requests(mw, count=3)  # the debt
    calls.clear()
    results = run_requests(mw, count=5)
    statuses = sorted(sent[0]["status"] for _, sent in results)
    assert statuses == [400, 400, 429, 429, 429] and len(calls) == 2
    refused = next(sent for _, sent in results if sent[0]["status"] == 429)
    assert (b"connection", b"close") in refused[0]["headers"]


def test_successes_a_full_worker_and_server_errors_cost_the_client_nothing():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1)
    for status in (200, 429, 503):
        run_requests(PenaltyBoxMiddleware(answering(status), box))

    async def crash(scope, receive, send):
        raise RuntimeError("bug")

    run_requests(PenaltyBoxMiddleware(crash, box))
    assert box.late("10.0.0.1") == 0.0 and box.hold("10.0.0.1") == 0.0


def test_leaving_unanswered_is_a_refusal():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1)

    async def gone(scope, receive, send):
        return None  # the client left: no response

    run_requests(PenaltyBoxMiddleware(gone, box))
    assert box.late("10.0.0.1") > 0
