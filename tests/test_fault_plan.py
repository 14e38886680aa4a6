"""Fault plans: loading, validation against the injectors, seeding, and the scheduler's triggers."""

from __future__ import annotations

import json
import threading
from typing import Any, ClassVar

import pytest

from fault.plan import FaultPlan, PlanError, When, load_plan
from fault.registry import (
    REGISTRY,
    FaultContext,
    Injector,
    Param,
    SizeMix,
    StartConfig,
    catalogue,
    get,
    instantiate,
    parse_code,
    parse_sizes,
    register,
    validate_plan,
)
from fault.scheduler import FaultScheduler
from store import failpoints

YAML_PLAN = """
seed: 42
faults:
  - fault: process.kill
    target: holder:0
    when: {at: 1.5}
  - fault: network.reset
    target: proxy:transfer
    when: after 200 ops
    params: {duration: 2.0, probability: 0.5, after_bytes: 256kb}
  - fault: failpoint
    target: master
    when: {probability: 0.01, max_times: 3}
    params: {point: master.put_end, action: error, arg: RPC_FAIL, count: 3}
  - fault: gc.legacy
    target: master
    when: start
"""


def test_yaml_plan_loads_and_validates():
    plan = validate_plan(load_plan(YAML_PLAN))
    assert plan.seed == 42 and len(plan) == 4
    kill, reset, fp, gc = plan.faults
    assert kill.when == When(at=1.5) and kill.when.kind == "at"
    assert reset.when.after_ops == 200 and reset.params["after_bytes"] == "256kb"
    assert fp.when.probability == 0.01 and fp.when.max_times == 3
    assert gc.when.phase == "start"
    assert [i for i, _ in plan.by_phase("start")] == [3] and [i for i, _ in plan.timed()] == [0, 1, 2]


def test_plan_round_trips_through_yaml_json_and_files(tmp_path):
    plan = load_plan(YAML_PLAN)
    assert load_plan(plan.to_yaml()) == plan
    assert load_plan(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert load_plan(path) == plan
    assert load_plan(str(path)) == plan
    assert load_plan(json.loads(plan.to_json())) == plan
    assert load_plan(json.loads(plan.to_json())["faults"]) == FaultPlan(plan.faults)


@pytest.mark.parametrize(
    "short,expected",
    [
        ("start", When(phase="start")),
        ("setup", When(phase="setup")),
        ("at 2", When(at=2.0)),
        ("at t=0.5s", When(at=0.5)),
        ("after 10 ops", When(after_ops=10)),
        ("p=0.25", When(probability=0.25)),
    ],
)
def test_when_short_forms(short, expected):
    assert When.parse(short) == expected


@pytest.mark.parametrize(
    "entry,fragment",
    [
        ({"fault": "proces.kill", "target": "holder:0", "when": "at 1"}, "did you mean process.kill"),
        ({"fault": "process.kill", "target": "holder:0"}, "when: missing"),
        (
            {"fault": "process.kill", "target": "holder:0", "when": {"at": 1, "after_ops": 3}},
            "exactly one trigger",
        ),
        ({"fault": "process.kill", "target": "holder:0", "when": {"at": -1}}, "must be >= 0"),
        ({"fault": "process.kill", "target": "holder:0", "when": {"probability": 1.5}}, "in (0, 1]"),
        (
            {"fault": "process.kill", "target": "holder:0", "when": {"at": 1, "max_times": 2}},
            "only a probability",
        ),
        ({"fault": "process.kill", "target": "holder:0", "when": "soon"}, "cannot read 'soon'"),
        ({"fault": "process.kill", "target": "proxy:transfer", "when": "at 1"}, "acts on master | holder:N"),
        (
            {"fault": "process.kill", "target": "holder:0", "when": "at 1", "params": {"signal": 9}},
            "takes no parameter(s) ['signal']",
        ),
        ({"fault": "network.delay", "target": "proxy:master", "when": "at 1"}, "latency: required"),
        (
            {
                "fault": "network.delay",
                "target": "proxy:master",
                "when": "at 1",
                "params": {"latency": "slow"},
            },
            "expected a number",
        ),
        (
            {
                "fault": "network.bandwidth",
                "target": "proxy:master",
                "when": "at 1",
                "params": {"rate": "fast"},
            },
            "cannot parse size",
        ),
        (
            {
                "fault": "network.reset",
                "target": "proxy:master",
                "when": "at 1",
                "params": {"probability": 2},
            },
            "must be <= 1",
        ),
        (
            {
                "fault": "failpoint",
                "target": "master",
                "when": "at 1",
                "params": {"point": "x", "arg": -12345},
            },
            "not a documented ErrorCode",
        ),
        (
            {"fault": "failpoint", "target": "holder:1", "when": "at 1", "params": {"point": "tcp.send"}},
            "holders have no admin RPC",
        ),
        (
            {
                "fault": "failpoint",
                "target": "master",
                "when": "at 1",
                "params": {"point": "x", "action": "explode"},
            },
            "must be one of",
        ),
        ({"fault": "gc.legacy", "target": "master", "when": "at 1"}, "cannot fire at at t=1s"),
        (
            {
                "fault": "memory.fill",
                "target": "holder:0",
                "when": "setup",
                "params": {"sizes": {"range": [9, 1]}},
            },
            "low 9 > high 1",
        ),
        ({"fault": "memory.fill", "target": "segment:0", "when": "setup"}, "acts on holder:N"),
        (
            {"fault": "process.kill", "target": "holder:0", "when": "at 1", "colour": "red"},
            "unknown key(s) ['colour']",
        ),
    ],
)
def test_bad_plans_are_refused_with_the_entry_named(entry, fragment):
    with pytest.raises(PlanError) as exc:
        validate_plan(
            load_plan({"faults": [{"fault": "process.kill", "target": "master", "when": "at 0"}, entry]})
        )
    assert fragment in str(exc.value)
    assert "faults[1]" in str(exc.value)


@pytest.mark.parametrize(
    "source,fragment",
    [
        ("faults: [\n  - {fault: x", "not valid YAML"),
        ({"faults": [], "extra": 1}, "unknown key(s) ['extra']"),
        ({"faults": [], "seed": -3}, "non-negative integer"),
        ({"faults": {"fault": "x"}}, "expected a list"),
        ("42", "expected a mapping"),
    ],
)
def test_bad_plan_shapes(source, fragment):
    with pytest.raises(PlanError, match=None) as exc:
        load_plan(source)
    assert fragment in str(exc.value)


def test_missing_plan_file_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan(tmp_path / "nope.yaml")


def test_entry_generators_depend_on_seed_position_and_fault_only():
    plan = load_plan(YAML_PLAN)
    a = [plan.rng(2, seed=7).random() for _ in range(3)]
    b = [plan.rng(2, seed=7).random() for _ in range(3)]
    c = [plan.rng(2, seed=8).random() for _ in range(3)]
    assert a == b and a != c
    longer = FaultPlan((*plan.faults, plan.faults[0]), 7)
    assert [longer.rng(2).random() for _ in range(3)] == a


def test_sizes_and_codes():
    assert parse_sizes("4mb", "w").choices == (4 << 20,)
    mix = parse_sizes({"choices": ["64kb", "1mb"], "weights": [3, 1]}, "w")
    assert mix.choices == (65536, 1 << 20) and mix.weights == (3.0, 1.0)
    rng_a, rng_b = __import__("random").Random(1), __import__("random").Random(1)
    r = parse_sizes({"range": ["1kb", "2kb"]}, "w")
    draws = [r.draw(rng_a) for _ in range(20)]
    assert draws == [r.draw(rng_b) for _ in range(20)] and all(1024 <= d <= 2048 for d in draws)
    assert isinstance(mix, SizeMix) and mix.largest == 1 << 20
    assert parse_code("TRANSFER_FAIL", "w") == -800 and parse_code(-704, "w") == -704
    with pytest.raises(PlanError):
        parse_sizes({"choices": [1, 2], "weights": [1]}, "w")


def test_catalogue_lists_every_builtin_fault():
    names = {c["fault"] for c in catalogue()}
    assert {
        "failpoint",
        "memory.fill",
        "memory.fragment",
        "network.delay",
        "network.bandwidth",
        "network.reset",
        "network.blackhole",
        "process.kill",
        "process.stop",
        "process.restart",
        "gc.legacy",
    } <= names


# ------------------------------------------------------------------------------ the registry is open


MARKS: list[tuple[str, str]] = []


@register
class MarkInjector(Injector):
    """A test injector registered from outside fault/: records what the scheduler asks of it."""

    name = "test.mark"
    summary = "records apply/revert"
    targets = (r"anything",)
    target_help = "anything"
    triggers = frozenset({"start", "setup", "at", "after_ops", "probability"})
    windowed = True
    params: ClassVar[dict[str, Param]] = {
        "duration": Param("float", "window", minimum=0.0),
        "fail": Param("bool", "raise on apply", default=False),
    }

    def configure(self, start: StartConfig) -> dict[str, Any]:
        start.master_flags.append("--marked")
        return {"configured": True}

    def apply(self, ctx: FaultContext) -> dict[str, Any]:
        if self.p["fail"]:
            raise RuntimeError("refused on purpose")
        MARKS.append(("apply", self.spec.label))
        return {"draw": self.rng.random()}

    def revert(self, ctx: FaultContext) -> dict[str, Any]:
        MARKS.append(("revert", self.spec.label))
        return {}


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any], str]] = []
        self.applied = threading.Event()

    def __call__(
        self,
        label: str,
        fault: str,
        target: str,
        action: str,
        t0: float,
        t1: float,
        detail: dict[str, Any],
        err: str,
    ) -> None:
        self.rows.append((label, action, detail, err))
        if action == "apply":
            self.applied.set()


def _plan(*entries: dict[str, Any]) -> FaultPlan:
    return load_plan({"faults": [{"fault": "test.mark", "target": "anything", **e} for e in entries]})


def test_registry_accepts_outside_injectors():
    assert get("test.mark") is MarkInjector and REGISTRY["test.mark"] is MarkInjector
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (MarkInjector,), {}))


def test_scheduler_phases_triggers_windows_and_errors():
    MARKS.clear()
    rec = _Recorder()
    plan = _plan(
        {"when": "start", "name": "s"},
        {"when": "setup", "name": "u"},
        {"when": {"after_ops": 3}, "name": "n", "params": {"duration": 0.0}},
        {"when": {"at": 0.0}, "name": "t"},
        {"when": {"after_ops": 1}, "name": "bad", "params": {"fail": True}},
    )
    sched = FaultScheduler(plan, 5, rec)
    start = StartConfig()
    sched.configure_start(start)
    assert start.master_flags == ["--marked"]
    sched.bind(object())  # type: ignore[arg-type]
    sched.run_setup()
    assert ("apply", "u") in MARKS
    sched.start()
    assert rec.applied.wait(10)
    for n in range(1, 5):
        sched.on_op(n)
    sched.stop()
    actions = [(a, lab) for lab, a, _, _ in rec.rows]
    assert ("apply", "n") in actions and ("revert", "n") in actions
    assert ("apply", "t") in actions and ("revert", "t") in actions  # still active at stop: reverted
    assert ("apply", "u") in actions and ("revert", "u") in actions
    assert [e for lab, _, _, e in rec.rows if lab == "bad"] == ["RuntimeError: refused on purpose"]
    assert any("refused on purpose" in e for e in sched.errors)
    assert sched.fired()["n"] == 1 and sched.fired()["s"] == 1


def test_probability_trigger_replays_with_the_seed():
    def fire_pattern(seed: int) -> list[int]:
        MARKS.clear()
        rec = _Recorder()
        sched = FaultScheduler(_plan({"when": {"probability": 0.1, "max_times": 3}, "name": "p"}), seed, rec)
        fired_at = []
        inj = sched.injectors[0]
        for n in range(1, 200):
            before = sched.fired()["p"]
            sched.on_op(n)
            if sched.fired()["p"] > before:
                fired_at.append(n)
        assert inj.spec.when.max_times == 3
        return fired_at

    a, b, c = fire_pattern(11), fire_pattern(11), fire_pattern(12)
    assert a == b and len(a) == 3 and a != c


def test_failpoint_injector_arms_and_disarms_locally():
    plan = validate_plan(
        load_plan(
            {
                "faults": [
                    {
                        "fault": "failpoint",
                        "target": "local",
                        "when": "setup",
                        "params": {
                            "point": "test.local_point",
                            "action": "error",
                            "arg": "TRANSFER_FAIL",
                            "count": 2,
                            "probability": 0.5,
                        },
                    }
                ]
            }
        )
    )
    inj = instantiate(plan, 3)[0]
    spec = inj.spec_string()
    assert spec.startswith("test.local_point=error(-800)*2%0.5@")
    assert instantiate(plan, 3)[0].spec_string() == spec
    try:
        inj.apply(object())  # type: ignore[arg-type]
        assert "test.local_point" in failpoints.armed()
        fired = 0
        for _ in range(50):
            try:
                failpoints.failpoint("test.local_point")
            except Exception as exc:  # noqa: BLE001 - counting the injected errors
                assert getattr(exc, "code", None) == -800
                fired += 1
        assert fired == 2
        inj.revert(object())  # type: ignore[arg-type]
        assert "test.local_point" not in failpoints.armed()
    finally:
        failpoints.disarm("test.local_point")


def test_start_failpoints_become_child_environment():
    plan = validate_plan(
        load_plan(
            {
                "faults": [
                    {
                        "fault": "failpoint",
                        "target": "holder:*",
                        "when": "start",
                        "params": {"point": "tcp.send", "action": "sleep", "arg": 0.1},
                    },
                    {
                        "fault": "failpoint",
                        "target": "holder:1",
                        "when": "start",
                        "params": {"point": "tcp.server_apply", "action": "panic"},
                    },
                    {
                        "fault": "failpoint",
                        "target": "master",
                        "when": "start",
                        "params": {"point": "master.put_end", "count": 1},
                    },
                ]
            }
        )
    )
    start = StartConfig()
    sched = FaultScheduler(plan, 1, _Recorder())
    sched.configure_start(start)
    h0 = start.failpoint_env("holder", 0)["UMBRA_FAILPOINTS"]
    h1 = start.failpoint_env("holder", 1)["UMBRA_FAILPOINTS"]
    assert h0.startswith("tcp.send=sleep(0.1)@") and ";" not in h0
    assert "tcp.send=sleep(0.1)" in h1 and "tcp.server_apply=panic@" in h1
    assert start.failpoint_env("master")["UMBRA_FAILPOINTS"].startswith("master.put_end=error(-1)*1@")
    for spec in (h0, h1):
        assert [fp.name for fp in failpoints.parse_spec(spec)]  # the store's parser accepts them
