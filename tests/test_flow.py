"""Nodes and flows, one class at a time, then the deliberate fixes (docs/compat.md) and the parallel options.

tests/test_flow_differential.py checks the same semantics against pocketflow itself; these tests are meant
to read as examples.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from pocketbatch import (
    AsyncBatchFlow,
    AsyncBatchNode,
    AsyncFlow,
    AsyncNode,
    AsyncParallelBatchFlow,
    AsyncParallelBatchNode,
    BatchFlow,
    BatchNode,
    Flow,
    Node,
)


class Boom(Exception):
    pass


class InFlight:
    """Counts the items running at once, and the most seen."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def __enter__(self) -> InFlight:
        self.now += 1
        self.peak = max(self.peak, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


async def settle(turns: int = 5) -> None:
    """Give every ready task a few turns of the event loop."""
    for _ in range(turns):
        await asyncio.sleep(0)


def only_this_task_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# ---------------------------------------------------------------------------------------------------------
# Node


class Greet(Node):
    def prep(self, shared):
        return shared["name"]

    def exec(self, name):
        return f"hello {name}"

    def post(self, shared, prep_res, exec_res):
        shared["greeting"] = exec_res
        return "greeted"


def test_node_runs_prep_exec_post_and_returns_the_action():
    shared = {"name": "ada"}
    assert Greet().run(shared) == "greeted"
    assert shared["greeting"] == "hello ada"


class Flaky(Node):
    """Fails its first `failures` attempts, logging the attempt number it sees."""

    def __init__(self, failures, **kwargs):
        super().__init__(**kwargs)
        self.failures, self.seen = failures, []

    def exec(self, prep_res):
        self.seen.append(self.cur_retry)
        if self.cur_retry < self.failures:
            raise Boom(f"attempt {self.cur_retry}")
        return "done"

    def post(self, shared, prep_res, exec_res):
        return exec_res


def test_max_retries_is_the_total_number_of_attempts():
    node = Flaky(failures=2, max_retries=3)
    assert node.run({}) == "done"
    assert node.seen == [0, 1, 2]


def test_the_default_fallback_reraises_the_last_error():
    node = Flaky(failures=5, max_retries=2)
    with pytest.raises(Boom, match="attempt 1"):
        node.run({})
    assert node.seen == [0, 1]


def test_exec_fallback_gets_the_last_error_and_its_result_becomes_exec_res():
    class Fallback(Flaky):
        def exec_fallback(self, prep_res, exc):
            return f"fell back after {exc}"

    assert Fallback(failures=5, max_retries=2).run({}) == "fell back after attempt 1"


def test_wait_sleeps_between_attempts_but_not_after_the_last(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(Boom):
        Flaky(failures=5, max_retries=3, wait=0.5).run({})
    assert sleeps == [0.5, 0.5]


@pytest.mark.parametrize("max_retries", [0, -1])
def test_fix_max_retries_below_one_is_refused_at_construction(max_retries):
    # pocketflow accepts it and silently never calls exec
    with pytest.raises(ValueError, match="at least 1"):
        Node(max_retries=max_retries)
    with pytest.raises(ValueError):
        AsyncParallelBatchNode(max_retries=max_retries)


def test_running_a_node_with_successors_warns_that_they_will_not_run():
    node = Greet()
    node >> Greet()
    with pytest.warns(UserWarning, match=r"^Node won't run successors\. Use Flow\.$"):
        node.run({"name": "ada"})


def test_actions_must_be_strings():
    with pytest.raises(TypeError, match="Action must be a string"):
        Greet() - 3


def test_a_node_cannot_follow_two_successors_for_one_action():
    node = Greet()
    node - "greeted" >> Greet()
    with pytest.warns(UserWarning, match=r"^Overwriting successor for action 'greeted'$"):
        node - "greeted" >> Node()


# ---------------------------------------------------------------------------------------------------------
# BatchNode


class Double(BatchNode):
    def prep(self, shared):
        return shared.get("numbers")

    def exec(self, n):
        return n * 2

    def post(self, shared, prep_res, exec_res):
        shared["doubled"] = exec_res


def test_batch_node_runs_exec_once_per_item_and_post_gets_the_list():
    shared = {"numbers": [1, 2, 3]}
    Double().run(shared)
    assert shared["doubled"] == [2, 4, 6]


def test_batch_node_retries_each_item_on_its_own():
    class Picky(BatchNode):
        seen: list

        def prep(self, shared):
            return ["a", "bb", "ccc"]

        def exec(self, word):
            self.seen.append((word, self.cur_retry))
            if self.cur_retry < len(word) - 1:
                raise Boom(word)
            return word

    node = Picky(max_retries=3)
    node.seen = []
    node.run({})
    assert node.seen == [("a", 0), ("bb", 0), ("bb", 1), ("ccc", 0), ("ccc", 1), ("ccc", 2)]


def test_batch_node_whose_prep_returns_none_has_an_empty_batch():
    shared: dict = {}
    Double().run(shared)
    assert shared["doubled"] == []


# ---------------------------------------------------------------------------------------------------------
# Flow


class Step(Node):
    """Appends its name and params to shared["log"]; returns shared["route"].get(name) as its action."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def prep(self, shared):
        shared.setdefault("log", []).append(self.name)
        shared.setdefault("params", []).append(dict(self.params))

    def post(self, shared, prep_res, exec_res):
        return shared.get("route", {}).get(self.name)


def test_flow_follows_default_successors_in_sequence():
    a = Step("a")
    a >> Step("b") >> Step("c")
    shared: dict = {}
    Flow(start=a).run(shared)
    assert shared["log"] == ["a", "b", "c"]


def test_flow_branches_on_the_action_post_returns():
    review = Step("review")
    review - "approved" >> Step("publish")
    review - "rejected" >> Step("revise")
    shared = {"route": {"review": "rejected"}}
    Flow(review).run(shared)
    assert shared["log"] == ["review", "revise"]


def test_flow_loops_until_post_chooses_another_action():
    class Count(Node):
        def post(self, shared, prep_res, exec_res):
            shared["n"] += 1
            return "again" if shared["n"] < 3 else "done"

    count = Count()
    count - "again" >> count
    count - "done" >> Step("end")
    shared = {"n": 0}
    Flow(count).run(shared)
    assert (shared["n"], shared["log"]) == (3, ["end"])


def test_flow_ends_with_a_warning_on_an_action_nobody_listens_to():
    a = Step("a")
    a - "yes" >> Step("b")
    a - "no" >> Step("c")
    shared = {"route": {"a": "maybe"}}
    with pytest.warns(UserWarning) as caught:
        action = Flow(a).run(shared)
    assert [str(w.message) for w in caught] == ["Flow ends: 'maybe' not found in ['yes', 'no']"]
    assert (action, shared["log"]) == ("maybe", ["a"])


def test_flow_ends_silently_at_a_node_without_successors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Flow(Step("a")).run({"route": {"a": "anything"}}) == "anything"


def test_flow_post_receives_the_last_action_and_a_nested_flow_drives_its_parent():
    class Inner(Flow):
        def post(self, shared, prep_res, exec_res):
            shared["inner saw"] = exec_res
            return exec_res

    inner = Inner(Step("inner"))
    inner - "finished" >> Step("after")
    shared = {"route": {"inner": "finished"}}
    Flow(inner).run(shared)
    assert shared["inner saw"] == "finished"
    assert shared["log"] == ["inner", "after"]


def test_every_node_of_a_flow_gets_the_flows_params_on_a_fresh_copy():
    a = Step("a")
    a >> Step("b")
    flow = Flow()
    flow.start(a)
    flow.set_params({"lang": "fr"})
    shared: dict = {}
    flow.run(shared)
    assert shared["params"] == [{"lang": "fr"}, {"lang": "fr"}]
    assert a.params == {}  # the flow set the params of a copy


# ---------------------------------------------------------------------------------------------------------
# BatchFlow


class PerFile(BatchFlow):
    def prep(self, shared):
        return [{"file": "a.txt"}, {"file": "b.txt", "lang": "de"}]

    def post(self, shared, prep_res, exec_res):
        shared["post got"] = exec_res


def test_batch_flow_runs_its_flow_once_per_param_dict_merged_over_its_own_params():
    flow = PerFile(Step("read"))
    flow.set_params({"lang": "en", "user": "ada"})
    shared: dict = {}
    flow.run(shared)
    assert shared["params"] == [
        {"lang": "en", "user": "ada", "file": "a.txt"},
        {"lang": "de", "user": "ada", "file": "b.txt"},
    ]
    assert shared["post got"] is None


def test_batch_flow_whose_prep_returns_none_runs_nothing():
    shared: dict = {}
    BatchFlow(Step("never")).run(shared)
    assert "log" not in shared


# ---------------------------------------------------------------------------------------------------------
# AsyncNode and AsyncFlow


class Fetch(AsyncNode):
    async def prep_async(self, shared):
        return shared["url"]

    async def exec_async(self, url):
        await asyncio.sleep(0)
        if self.cur_retry == 0:
            raise Boom("first try fails")
        return f"<page {url} after {self.cur_retry} retry>"

    async def post_async(self, shared, prep_res, exec_res):
        shared["page"] = exec_res
        return "fetched"


async def test_async_node_runs_its_async_hooks_with_retries():
    shared = {"url": "x"}
    assert await Fetch(max_retries=2).run_async(shared) == "fetched"
    assert shared["page"] == "<page x after 1 retry>"


async def test_async_node_fallback_is_async_too():
    class Offline(Fetch):
        async def exec_fallback_async(self, url, exc):
            return f"cached {url} ({exc})"

    shared = {"url": "x"}
    await Offline(max_retries=1).run_async(shared)
    assert shared["page"] == "cached x (first try fails)"


def test_async_node_refuses_sync_run():
    with pytest.raises(RuntimeError, match=r"^Use run_async\.$"):
        Fetch().run({"url": "x"})


async def test_running_an_async_node_with_successors_warns():
    node = Fetch(max_retries=2)
    node >> Fetch()
    with pytest.warns(UserWarning, match=r"^Node won't run successors\. Use AsyncFlow\.$"):
        await node.run_async({"url": "x"})


async def test_async_flow_mixes_sync_and_async_nodes():
    fetch = Fetch(max_retries=2)
    fetch - "fetched" >> Step("store")
    shared = {"url": "x"}
    assert await AsyncFlow(fetch).run_async(shared) is None
    assert (shared["page"], shared["log"]) == ("<page x after 1 retry>", ["store"])


# ---------------------------------------------------------------------------------------------------------
# AsyncBatchNode and AsyncBatchFlow: one item at a time


async def test_async_batch_node_runs_items_one_after_another():
    flight = InFlight()

    class Slow(AsyncBatchNode):
        async def prep_async(self, shared):
            return [1, 2, 3]

        async def exec_async(self, n):
            with flight:
                await settle()
            return n * 10

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    shared: dict = {}
    await Slow().run_async(shared)
    assert (shared["out"], flight.peak) == ([10, 20, 30], 1)


async def test_async_batch_flow_runs_branches_one_after_another_with_merged_params():
    flight = InFlight()

    class Visit(AsyncNode):
        async def prep_async(self, shared):
            with flight:
                await settle()
            shared.setdefault("seen", []).append(dict(self.params))

    class Cities(AsyncBatchFlow):
        async def prep_async(self, shared):
            return [{"city": "Oslo"}, {"city": "Lima", "unit": "F"}]

    flow = Cities(Visit())
    flow.set_params({"unit": "C"})
    shared: dict = {}
    await flow.run_async(shared)
    assert shared["seen"] == [{"unit": "C", "city": "Oslo"}, {"unit": "F", "city": "Lima"}]
    assert flight.peak == 1


# ---------------------------------------------------------------------------------------------------------
# AsyncParallelBatchNode and AsyncParallelBatchFlow: items at once


def parallel_node(items, exec_async, **kwargs):
    """An AsyncParallelBatchNode over `items` whose post stores the results in shared["out"]."""

    class Parallel(AsyncParallelBatchNode):
        async def prep_async(self, shared):
            return items

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    Parallel.exec_async = exec_async
    return Parallel(**kwargs)


async def test_parallel_node_runs_all_items_at_once_and_keeps_input_order():
    flight = InFlight()

    async def exec_async(self, n):
        with flight:
            await settle(10 - n)  # later items finish first
        return n * n

    shared: dict = {}
    await parallel_node(list(range(10)), exec_async).run_async(shared)
    assert shared["out"] == [n * n for n in range(10)]
    assert flight.peak == 10


async def test_parallel_node_handles_more_items_than_it_starts_per_turn():
    async def exec_async(self, n):
        await asyncio.sleep(0)
        return -n

    shared: dict = {}
    await parallel_node(range(1000), exec_async).run_async(shared)
    assert shared["out"] == [-n for n in range(1000)]


async def test_parallel_node_in_a_flow():
    async def exec_async(self, word):
        return word.upper()

    shared: dict = {}
    node = parallel_node(["a", "b"], exec_async)
    node >> Step("next")
    await AsyncFlow(node).run_async(shared)
    assert (shared["out"], shared["log"]) == (["A", "B"], ["next"])


async def test_one_attempt_items_run_on_their_own_copies_with_cur_retry_0():
    async def exec_async(self, n):
        self.mine = n
        await asyncio.sleep(0)  # every item has set its own before any reads it back
        return (n, self.mine, self.cur_retry)

    shared: dict = {}
    await parallel_node(range(5), exec_async).run_async(shared)
    assert shared["out"] == [(n, n, 0) for n in range(5)]


@pytest.mark.parametrize("where", ["class", "instance"])
async def test_one_attempt_items_still_get_a_fallback_set_after_the_class_was_made(where):
    async def exec_async(self, n):
        raise Boom(f"item {n}")

    async def exec_fallback_async(self, n, exc):
        return f"fallback for {exc}"

    node = parallel_node([0, 1], exec_async)
    shared: dict = {}
    with pytest.raises(Boom):  # the default fallback re-raises
        await node.run_async(shared)
    if where == "class":
        type(node).exec_fallback_async = exec_fallback_async
    else:
        node.exec_fallback_async = exec_fallback_async.__get__(node)
    await node.run_async(shared)
    assert shared["out"] == ["fallback for item 0", "fallback for item 1"]


async def test_fix_parallel_items_count_their_own_retries():
    # Item n fails its first n attempts; attempts interleave across items. pocketflow 0.0.3 never sets
    # cur_retry on async nodes, and its HEAD shares one counter, which sent item 3 to its fallback early.
    seen = []

    async def exec_async(self, n):
        seen.append((n, self.cur_retry))
        await asyncio.sleep(0)
        if self.cur_retry < n:
            raise Boom(f"item {n}")
        return ("ok", n, self.cur_retry)

    async def exec_fallback_async(self, n, exc):
        return ("fallback", n, self.cur_retry, str(exc))

    node = parallel_node([0, 1, 2, 3], exec_async, max_retries=3)
    type(node).exec_fallback_async = exec_fallback_async
    shared: dict = {}
    await node.run_async(shared)
    assert shared["out"] == [("ok", 0, 0), ("ok", 1, 1), ("ok", 2, 2), ("fallback", 3, 2, "item 3")]
    assert seen[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]  # the items did interleave
    for n in range(4):
        assert [attempt for item, attempt in seen if item == n] == list(range(min(n, 2) + 1))


@pytest.mark.parametrize("node_class", [BatchNode, AsyncBatchNode, AsyncParallelBatchNode])
async def test_fix_every_batch_node_treats_prep_none_as_an_empty_batch(node_class):
    # pocketflow's async batch nodes raise TypeError here (pocketflow #145)
    class Empty(node_class):
        def post(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

        async def post_async(self, shared, prep_res, exec_res):
            shared["out"] = exec_res

    shared: dict = {}
    if issubclass(node_class, AsyncNode):
        await Empty().run_async(shared)
    else:
        Empty().run(shared)
    assert shared["out"] == []


@pytest.mark.parametrize("flow_class", [BatchFlow, AsyncBatchFlow, AsyncParallelBatchFlow])
async def test_fix_every_batch_flow_treats_prep_none_as_an_empty_batch(flow_class):
    class Empty(flow_class):
        def post(self, shared, prep_res, exec_res):
            shared["prep_res"] = prep_res

        async def post_async(self, shared, prep_res, exec_res):
            shared["prep_res"] = prep_res

    shared: dict = {}
    if issubclass(flow_class, AsyncNode):
        await Empty(Step("never")).run_async(shared)
    else:
        Empty(Step("never")).run(shared)
    assert shared == {"prep_res": []}


class Siblings:
    """Items that start, then keep busy for many turns of the event loop, logging how they end.

    They do finish in the end (logging "resumed"), so an implementation that forgets to cancel them fails
    the test instead of hanging it.
    """

    def __init__(self, count: int) -> None:
        self.count, self.started, self.log = count, [], []
        self.all_started = asyncio.Event()

    async def keep_busy(self, item) -> None:
        self.started.append(item)
        if len(self.started) == self.count:
            self.all_started.set()
        try:
            await settle(100)
            self.log.append((item, "resumed"))
        except asyncio.CancelledError:
            self.log.append((item, "cancelled"))
            raise
        finally:
            self.log.append((item, "finally"))

    async def fail_once_all_started(self, item) -> None:
        self.started.append(item)
        await self.all_started.wait()
        raise Boom(item)


async def test_fix_a_failed_parallel_item_cancels_its_siblings_before_the_error_propagates():
    siblings = Siblings(count=3)

    async def exec_async(self, item):
        if item == "bad":
            await siblings.fail_once_all_started(item)
        await siblings.keep_busy(item)

    with pytest.raises(Boom, match="bad"):
        await parallel_node(["x", "bad", "y"], exec_async).run_async({})
    assert sorted(siblings.log) == [
        ("x", "cancelled"),
        ("x", "finally"),
        ("y", "cancelled"),
        ("y", "finally"),
    ]
    assert only_this_task_left()
    await settle()
    assert len(siblings.log) == 4  # and nothing resumes later


async def test_fix_a_failed_parallel_branch_cancels_the_other_branches():
    siblings = Siblings(count=3)

    class Work(AsyncNode):
        async def exec_async(self, prep_res):
            item = self.params["item"]
            if item == "bad":
                await siblings.fail_once_all_started(item)
            await siblings.keep_busy(item)

    class Branches(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"item": "x"}, {"item": "bad"}, {"item": "y"}]

    with pytest.raises(Boom, match="bad"):
        await Branches(Work()).run_async({})
    assert sorted(siblings.log) == [
        ("x", "cancelled"),
        ("x", "finally"),
        ("y", "cancelled"),
        ("y", "finally"),
    ]
    assert only_this_task_left()


async def test_fix_items_not_yet_started_never_start_after_a_failure():
    started = []

    async def exec_async(self, item):
        started.append(item)
        if item == 0:
            raise Boom(item)
        await settle()

    with pytest.raises(Boom):
        await parallel_node(list(range(6)), exec_async, max_concurrency=2).run_async({})
    await settle()
    assert started == [0, 1]
    assert only_this_task_left()


@pytest.mark.parametrize("kind", ["node", "flow"])
async def test_cancelling_the_awaiting_task_cancels_every_item(kind):
    siblings = Siblings(count=3)

    class Work(AsyncNode):
        async def exec_async(self, prep_res):
            await siblings.keep_busy(self.params["item"])

    class Branches(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"item": i} for i in range(3)]

    async def exec_async(self, item):
        await siblings.keep_busy(item)

    runner = Branches(Work()) if kind == "flow" else parallel_node(list(range(3)), exec_async)
    task = asyncio.create_task(runner.run_async({}))
    await siblings.all_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(siblings.log) == [(i, event) for i in range(3) for event in ("cancelled", "finally")]
    assert only_this_task_left()


async def test_parallel_flow_runs_its_branches_at_once_with_merged_params():
    flight = InFlight()

    class Visit(AsyncNode):
        async def prep_async(self, shared):
            with flight:
                await settle()
            shared.setdefault("seen", []).append(dict(self.params))

    class Cities(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"city": c} for c in ("Oslo", "Lima", "Pune")]

    flow = Cities(Visit())
    flow.set_params({"unit": "C"})
    shared: dict = {}
    await flow.run_async(shared)
    assert flight.peak == 3
    assert sorted(p["city"] for p in shared["seen"]) == ["Lima", "Oslo", "Pune"]
    assert all(p["unit"] == "C" for p in shared["seen"])


# ---------------------------------------------------------------------------------------------------------
# max_concurrency and mode


@pytest.mark.parametrize("limit", [1, 3])
async def test_max_concurrency_caps_items_in_flight_and_keeps_input_order(limit):
    flight = InFlight()

    async def exec_async(self, n):
        with flight:
            await settle(n % 4)
        return n

    shared: dict = {}
    await parallel_node(list(range(10)), exec_async, max_concurrency=limit).run_async(shared)
    assert shared["out"] == list(range(10))
    assert flight.peak == limit


async def test_max_concurrency_zero_means_unbounded():
    flight = InFlight()

    async def exec_async(self, n):
        with flight:
            await settle()

    await parallel_node(list(range(7)), exec_async, max_concurrency=0).run_async({})
    assert flight.peak == 7


async def test_max_concurrency_caps_parallel_flow_branches():
    flight = InFlight()

    class Visit(AsyncNode):
        async def exec_async(self, prep_res):
            with flight:
                await settle(self.params["n"] % 3)

    class Many(AsyncParallelBatchFlow):
        async def prep_async(self, shared):
            return [{"n": n} for n in range(8)]

    await Many(Visit(), max_concurrency=2).run_async({})
    assert flight.peak == 2


@pytest.mark.parametrize("cls", [AsyncParallelBatchNode, AsyncParallelBatchFlow])
def test_max_concurrency_and_mode_are_keyword_only_and_validated(cls):
    with pytest.raises(ValueError, match="max_concurrency"):
        cls(max_concurrency=-1)
    with pytest.raises(ValueError, match="mode"):
        cls(mode="fast")
    with pytest.raises(TypeError):
        cls(None, 0, 4) if cls is AsyncParallelBatchFlow else cls(1, 0, 4)
    for mode in ("auto", "concurrent", "batch"):
        assert cls(mode=mode, max_concurrency=4).mode == mode


def test_a_flow_copies_nodes_as_copy_copy_does_their_own_copy_and_slots_kept():
    seen = []

    class Slotted(Node):
        __slots__ = ("tag",)

        def exec(self, prep_res):
            seen.append(("slotted", self.tag))

    class OwnCopy(Node):
        def __copy__(self):
            clone = type(self)()
            clone.__dict__.update(self.__dict__, copied_by_hand=True)
            return clone

        def exec(self, prep_res):
            seen.append(("own", getattr(self, "copied_by_hand", False)))

    class Plain(Node):
        def exec(self, prep_res):
            seen.append(("plain", self.params, self is not plain))

    class Guarded(Node):  # copy.copy fills the copy's __dict__ without calling __setattr__
        def __setattr__(self, name, value):
            seen.append(("set", name))
            super().__setattr__(name, value)

        def exec(self, prep_res):
            seen.append(("guarded", self.max_retries))

    slotted, own, plain, guarded = Slotted(), OwnCopy(), Plain(), Guarded()
    slotted.tag = "kept"
    slotted >> own >> plain >> guarded
    seen.clear()  # Guarded's __init__ set its attributes
    Flow(start=slotted).run({})
    assert seen == [
        ("slotted", "kept"),
        ("own", True),
        ("plain", {}, True),
        ("set", "params"),  # set_params and the retry loop, on the copy: its only assignments
        ("set", "cur_retry"),
        ("guarded", 1),
    ]
