"""Alias following, model selection, shadowing and the audit trail's pure logic, in-process.

The follower and the shadow are plain asyncio objects with injected callables, so their policies
(swap only after a successful load, refuse and remember a broken version, keep serving with the
registry down, skip a shadow call when one is running) are checked here without a server; the real
`bentoml serve` + registry flow is test_service_lifecycle.py.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from pipeline.promote import champion_stack, settle_pending
from service.follower import AliasFollower, Unservable
from service.model_source import NoModelForAlias, select_model
from service.shadow import Shadow


def run(coro):
    return asyncio.run(coro)


# --- which model a worker serves ---------------------------------------------------------------------

def test_selection_bento_then_pinned_version_then_alias_pointer():
    pointers = {"champion": {"tag": "m:aaa", "registry_version": "3"}}
    bento = select_model("m", "", "champion", "m:bento1", pointers)
    assert (bento.tag, bento.pinned_by, bento.follows) == ("m:bento1", "bento", False)
    pinned = select_model("m", "bbb", "champion", None, pointers)
    assert (pinned.tag, pinned.pinned_by, pinned.alias) == ("m:bbb", "CLASSIFIER_MODEL_VERSION", None)
    follow = select_model("m", "", "champion", None, pointers)
    assert (follow.tag, follow.alias, follow.follows) == ("m:aaa", "champion", True)
    with pytest.raises(NoModelForAlias, match="pipeline.package"):
        select_model("m", "", "challenger", None, pointers)


# --- the follower ------------------------------------------------------------------------------------

class World:
    """A fake registry, store pointer and loader: what the follower sees."""

    def __init__(self) -> None:
        self.registry = "1"
        self.pointer = {"tag": "m:v1", "registry_version": "1"}
        self.broken: set[str] = set()
        self.registry_down = False
        self.served: list[str] = []
        self.syncs = 0

    def peek(self):
        if self.registry_down:
            raise ConnectionError("tracking server down")
        return self.registry

    def sync(self):
        self.syncs += 1
        if self.registry in self.broken:
            raise Unservable(f"v{self.registry} cannot be served")
        if self.registry_down:
            raise ConnectionError("tracking server went down mid-sync")
        self.pointer = {"tag": f"m:v{self.registry}", "registry_version": self.registry}
        return True

    def load(self, tag):
        if tag in self.broken:
            raise ValueError(f"{tag}: model has 10 logits but metadata lists 9 classes")
        return ("engine", tag)

    def follower(self) -> AliasFollower:
        events = self.events = []
        return AliasFollower("champion", dict(self.pointer), read_pointer=lambda: self.pointer, load=self.load,
                             swap=lambda model, entry: self.served.append(model[1]), peek=lambda: self.peek(), sync=self.sync,
                             registry_poll_s=0.001, on_event=events.append)


def test_follower_swaps_on_promotion_and_rollback():
    world = World()
    follower = world.follower()
    world.registry = "2"
    run(follower.check_now())
    assert world.served == ["m:v2"] and follower.status["registry_version"] == "2"
    world.registry = "1"
    run(follower.check_now())
    assert world.served == ["m:v2", "m:v1"] and world.events == ["loaded", "loaded"]
    run(follower.check_now())  # nothing moved: nothing loaded
    assert world.served == ["m:v2", "m:v1"]


def test_follower_refuses_a_broken_version_once_and_keeps_serving():
    world = World()
    follower = world.follower()
    world.registry, world.broken = "3", {"3"}
    for _ in range(3):
        run(follower.check_now())
    assert world.served == [] and world.syncs == 1  # refused once, not retried every poll
    refused = follower.status["refused"]
    assert refused["registry_version"] == "3" and "cannot be served" in refused["reason"]
    assert world.events == ["refused"] and follower.status["model_tag"] == "m:v1"
    world.broken, world.pointer = {"m:v4"}, {"tag": "m:v4", "registry_version": "4"}  # stored, but fails to load
    world.registry = "4"
    run(follower.check_now())
    assert world.served == [] and follower.status["refused"]["tag"] == "m:v4"
    world.registry = "2"
    run(follower.check_now())
    assert world.served == ["m:v2"] and follower.status["refused"] is None


def test_a_store_failure_during_sync_is_retried_not_refused():
    world = World()
    follower = world.follower()
    world.registry = "2"
    real_peek, world.peek = world.peek, lambda: "2"  # the look-up works, then the store fails mid-sync
    world.registry_down = True
    run(follower.check_now())
    assert follower.status["refused"] is None and follower.status["last_registry_check"]["ok"] is False
    world.registry_down, world.peek = False, real_peek
    run(follower.check_now())
    assert world.served == ["m:v2"]


def test_reload_retries_a_refused_version():
    world = World()
    follower = world.follower()
    world.registry, world.broken = "3", {"3"}
    run(follower.check_now())
    world.broken = set()  # e.g. the store entry was repaired
    run(follower.check_now())
    assert world.served == []  # remembered
    run(follower.check_now(retry_refused=True))
    assert world.served == ["m:v3"]


def test_follower_keeps_serving_while_the_registry_is_down():
    world = World()
    follower = world.follower()
    world.registry_down = True
    run(follower.check_now())
    check = follower.status["last_registry_check"]
    assert check["ok"] is False and "down" in check["error"] and check["unreachable_since"]
    assert follower.status["model_tag"] == "m:v1" and world.events == ["registry_error"]
    world.registry_down, world.registry = False, "2"
    run(follower.check_now())
    assert follower.status["last_registry_check"]["ok"] is True and world.served == ["m:v2"]


def test_follower_without_registry_follows_the_pointer():
    world = World()
    follower = AliasFollower("champion", dict(world.pointer), read_pointer=lambda: world.pointer, load=world.load,
                             swap=lambda model, entry: world.served.append(model[1]))
    world.pointer = {"tag": "m:v5", "registry_version": "5"}
    run(follower.check_now())
    assert world.served == ["m:v5"] and follower.status["registry_poll_s"] == 0


# --- the shadow ---------------------------------------------------------------------------------------

class SlowEngine:
    def __init__(self, answer: int) -> None:
        self.answer, self.gate = answer, threading.Event()

    def logits(self, batch):
        assert self.gate.wait(10)
        out = np.zeros((len(batch), 10), np.float32)
        out[:, self.answer] = 1
        return out


def test_shadow_samples_skips_when_busy_and_measures_agreement():
    results = []
    shadow = Shadow(0.5, lambda outcome, images, seconds: results.append((outcome, images)))
    champion = np.zeros((2, 10), np.float32)
    champion[:, 3] = 1
    batch = np.zeros((2, 1, 28, 28), np.float32)

    async def main():
        shadow.offer(batch, champion)  # no challenger loaded: nothing
        shadow.engine = SlowEngine(3)
        shadow.offer(batch, champion)  # 1st offered: not sampled (every 2nd)
        shadow.offer(batch, champion)  # sampled: runs, held at the gate
        shadow.offer(batch, champion)
        shadow.offer(batch, champion)  # sampled while busy: skipped
        shadow.engine.gate.set()
        await asyncio.sleep(0.2)
        shadow.engine = SlowEngine(7)
        shadow.engine.gate.set()
        shadow.offer(batch, champion)
        shadow.offer(batch, champion)  # sampled: disagrees
        await asyncio.sleep(0.2)

    run(main())
    assert results == [("skipped", 2), ("agree", 2), ("disagree", 2)]
    assert shadow.status["agreement"] == 0.5 and shadow.status["images"]["skipped"] == 2


# --- the audit trail -----------------------------------------------------------------------------------

def entry(action, version, state="done", alias="champion"):
    return {"action": action, "version": version, "alias": alias, "state": state}


def test_champion_stack_replays_promotions_and_rollbacks():
    trail = [entry("gate", "1"), entry("promote", "2"), entry("promote", "3", alias="challenger"),
             entry("promote", "4", state="aborted"), entry("promote", "3"), entry("rollback", "2")]
    assert champion_stack(trail) == ["1", "2"]
    assert champion_stack(trail + [entry("rollback", "1")]) == ["1"]
    assert champion_stack([{"action": "promote", "version": "5", "alias": "champion"}]) == ["5"]  # legacy entries


def test_an_interrupted_change_is_settled_by_where_the_alias_is():
    pending = entry("promote", "2", state="pending")
    assert settle_pending(pending, "2")["state"] == "done"
    assert settle_pending(pending, "1")["state"] == "aborted"
    assert "before the alias moved" in settle_pending(pending, None)["settled"]
