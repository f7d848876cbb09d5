"""The penalty box (service/penalty.py): the refusal meter with a fake clock, the ASGI layer with
fake apps; the real server's behaviour is in test_service_abuse.py."""
from __future__ import annotations

import asyncio

import pytest

from service.penalty import PenaltyBoxMiddleware, RefusalPenalty, is_refusal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_the_clients_doing_only():
    assert is_refusal(None) and is_refusal(400) and is_refusal(404) and is_refusal(413) and is_refusal(408)
    assert not is_refusal(200) and not is_refusal(429) and not is_refusal(500) and not is_refusal(503)


def test_a_burst_is_free_then_each_refusal_adds_one_interval_up_to_the_cap():
    clock = Clock()
    box = RefusalPenalty(rate=10, burst=5, max_delay_s=2, clock=clock)
    for _ in range(5):
        box.refused("a")
    assert box.delay("a") == 0.0  # within the burst
    box.refused("a")
    assert box.delay("a") == pytest.approx(0.1)
    for _ in range(100):
        box.refused("a")
    assert box.delay("a") == pytest.approx(2.0)  # capped
    assert box.delay("b") == 0.0  # other addresses untouched


def test_debt_drains_at_the_rate_and_is_forgotten():
    clock = Clock()
    box = RefusalPenalty(rate=10, burst=5, max_delay_s=2, clock=clock)
    for _ in range(1000):
        box.refused("a")
    # the debt is bounded: burst + max delay (+ one interval) drains in at most 2.6 s
    clock.now += 0.5
    assert box.delay("a") == pytest.approx(2.0 + 0.1 - 0.5)
    clock.now += 2.2
    assert box.delay("a") == 0.0
    assert len(box) == 0


def test_memory_is_bounded_by_max_clients():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1, max_clients=100, clock=Clock())
    for i in range(1000):
        box.refused(f"10.0.{i // 256}.{i % 256}")
    assert len(box) == 100


def run_request(mw, path="/classify", client=("10.0.0.1", 5000)):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "client": client, "headers": []}

    async def timed():
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await mw(scope, receive, send)
        except RuntimeError:
            pass
        return loop.time() - start

    return asyncio.run(timed()), sent


def answering(status: int):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def test_the_layer_counts_refusals_and_holds_the_next_request_back():
    box = RefusalPenalty(rate=5, burst=1, max_delay_s=0.2)
    delays = []
    refuse = PenaltyBoxMiddleware(answering(400), box, exempt={"/readyz"}, on_delay=delays.append)
    for _ in range(4):
        run_request(refuse)
    seconds, sent = run_request(PenaltyBoxMiddleware(answering(200), box, exempt={"/readyz"}))
    assert seconds >= 0.15 and sent[0]["status"] == 200  # held back, then answered normally
    assert delays and all(0 < d <= 0.2 for d in delays)
    assert run_request(PenaltyBoxMiddleware(answering(200), box, exempt={"/readyz"}), path="/readyz")[0] < 0.05
    assert run_request(refuse, client=("10.0.0.2", 1))[0] < 0.05  # another address


def test_successes_a_full_worker_and_server_errors_cost_the_client_nothing():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1)
    for status in (200, 429, 503):
        run_request(PenaltyBoxMiddleware(answering(status), box))

    async def crash(scope, receive, send):
        raise RuntimeError("bug")

    run_request(PenaltyBoxMiddleware(crash, box))
    assert len(box) == 0


def test_leaving_unanswered_is_a_refusal():
    box = RefusalPenalty(rate=1, burst=0, max_delay_s=1)

    async def gone(scope, receive, send):
        return None  # the client left: no response

    run_request(PenaltyBoxMiddleware(gone, box))
    assert box.delay("10.0.0.1") > 0
