"""plan_load and expired: pure decisions over a snapshot of residents, sizes in MB, clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmora.lifecycle.eviction import (
    ANY_DEVICE,
    MB,
    SPARE,
    Budget,
    Need,
    Plan,
    Resident,
    expired,
    plan_load,
)


def res(
    name: str,
    ram: int,
    gpu: int = 0,
    device: str = "cpu",
    *,
    last: float = 0.0,
    busy: bool = False,
    loading: bool = False,
    keep: float = 300.0,
) -> Resident:
    """A resident with sizes in MB."""
    return Resident(name, ram * MB, gpu * MB, device, busy, last, keep, loading)


def need(name: str, ram: int, gpu: int = 0, device: str = "cpu") -> Need:
    return Need(name, ram * MB, gpu * MB, device)


def budget(ram: int | None, gpu: dict[str, int] | None = None) -> Budget:
    return Budget(
        None if ram is None else ram * MB,
        None if gpu is None else {dev: mb * MB for dev, mb in gpu.items()},
    )


# -- plan_load: tables --------------------------------------------------------------------------

LRU3 = [res("a", 300, last=1), res("b", 300, last=0), res("c", 300, last=2)]

CASES: list[tuple[str, list[Resident], Need, Budget, str, tuple[str, ...]]] = [
    # fits now
    ("empty", [], need("m", 500), budget(1000), "load", ()),
    ("fits", [res("a", 300)], need("m", 400), budget(1000), "load", ()),
    ("fits exactly", [res("a", 600)], need("m", 400), budget(1000), "load", ()),
    (
        "unlimited",
        [res("a", 90_000, 70_000, "cuda:0")],
        need("m", 9_000, 9_000, "cuda:0"),
        budget(None),
        "load",
        (),
    ),
    # least recently used first, only as many as needed
    ("lru one", LRU3, need("m", 300), budget(1000), "evict_then_load", ("b",)),
    ("lru two", LRU3, need("m", 500), budget(1000), "evict_then_load", ("b", "a")),
    ("lru all", LRU3, need("m", 1000), budget(1000), "evict_then_load", ("b", "a", "c")),
    # busy and loading residents are never victims
    (
        "busy skipped",
        [res("a", 300, last=1), res("b", 300, last=0, busy=True), res("c", 300, last=2)],
        need("m", 300),
        budget(1000),
        "evict_then_load",
        ("a",),
    ),
    (
        "loading skipped",
        [res("a", 300, last=1), res("b", 300, last=0, loading=True), res("c", 300, last=2)],
        need("m", 300),
        budget(1000),
        "evict_then_load",
        ("a",),
    ),
    # the spare goes first, however recently it was used
    (
        "spare first",
        [res("a", 300, last=0), res(SPARE, 400, last=9)],
        need("m", 500),
        budget(1000),
        "evict_then_load",
        (SPARE,),
    ),
    (
        "spare then lru",
        [res("a", 300, last=1), res("b", 300, last=0), res(SPARE, 100, last=9)],
        need("m", 600),
        budget(1000),
        "evict_then_load",
        (SPARE, "b"),
    ),
    (
        "busy spare is not a victim",
        [res("a", 300, last=0), res(SPARE, 400, last=9, loading=True)],
        need("m", 500),
        budget(1000),
        "evict_then_load",
        ("a",),
    ),
    # a small old victim made unnecessary by a larger later one is kept
    (
        "minimal set",
        [res("tiny", 10, last=0), res("big", 800, last=1)],
        need("m", 500),
        budget(1000),
        "evict_then_load",
        ("big",),
    ),
    (
        "spare not given back",
        [res(SPARE, 100, last=9), res("big", 800, last=1)],
        need("m", 500),
        budget(1000),
        "evict_then_load",
        (SPARE, "big"),
    ),
    # a resident that frees nothing is no help
    (
        "zero size skipped",
        [res("z", 0, last=0), res("a", 300, last=1)],
        need("m", 900),
        budget(1000),
        "evict_then_load",
        ("a",),
    ),
    # wait: idle ones are not enough, busy or loading ones would be
    (
        "wait for busy",
        [res("a", 600, last=0, busy=True), res("b", 200, last=1)],
        need("m", 500),
        budget(1000),
        "wait",
        (),
    ),
    (
        "wait for loading",
        [res("a", 600, last=0, loading=True), res("b", 200, last=1)],
        need("m", 500),
        budget(1000),
        "wait",
        (),
    ),
    ("wait all busy", [res("a", 900, busy=True)], need("m", 200), budget(1000), "wait", ()),
    # impossible: the model alone is too big
    ("alone too big ram", [], need("m", 1200), budget(1000), "impossible", ()),
    ("alone too big ram, idle around", [res("a", 300)], need("m", 1001), budget(1000), "impossible", ()),
    (
        "alone too big vram",
        [],
        need("m", 500, 9000, "cuda:0"),
        budget(None, {"cuda:0": 8000}),
        "impossible",
        (),
    ),
    (
        "alone too big, any device",
        [],
        need("m", 500, 5000, "cuda:3"),
        budget(None, {ANY_DEVICE: 4000}),
        "impossible",
        (),
    ),
    # VRAM per device
    (
        "victim on another gpu frees no vram",
        [res("x", 500, 6000, "cuda:1", last=0), res("y", 500, 4000, "cuda:0", last=1)],
        need("m", 450, 5000, "cuda:0"),
        budget(None, {"cuda:0": 8000, "cuda:1": 8000}),
        "evict_then_load",
        ("y",),
    ),
    (
        "wait for busy on the same gpu",
        [res("x", 500, 6000, "cuda:1", last=0), res("y", 500, 4000, "cuda:0", last=1, busy=True)],
        need("m", 450, 5000, "cuda:0"),
        budget(None, {"cuda:0": 8000, "cuda:1": 8000}),
        "wait",
        (),
    ),
    (
        "victim on another gpu frees ram",
        [res("x", 1000, 6000, "cuda:1", last=0), res("y", 500, 4000, "cuda:0", last=1)],
        need("m", 900, 1000, "cuda:0"),
        budget(2000, {"cuda:0": 8000}),
        "evict_then_load",
        ("x",),
    ),
    (
        "cuda is cuda:0",
        [res("y", 500, 4000, "cuda", last=1)],
        need("m", 450, 5000, "cuda:0"),
        budget(None, {"cuda:0": 8000}),
        "evict_then_load",
        ("y",),
    ),
    (
        "ram and vram short, one victim frees both",
        [res("c", 800, last=0), res("g", 500, 3000, "cuda:0", last=1)],
        need("m", 1000, 2000, "cuda:0"),
        budget(2000, {"cuda:0": 4000}),
        "evict_then_load",
        ("g",),
    ),
    (
        "ram and vram short, two victims",
        [res("c", 1100, last=0), res("g", 500, 3000, "cuda:0", last=1)],
        need("m", 1000, 2000, "cuda:0"),
        budget(2000, {"cuda:0": 4000}),
        "evict_then_load",
        ("c", "g"),
    ),
    (
        "device not in the budget is unlimited",
        [res("g", 500, 7000, "cuda:1")],
        need("m", 450, 5000, "cuda:1"),
        budget(None, {"cuda:0": 8000}),
        "load",
        (),
    ),
    (
        "any-device budget",
        [res("g", 500, 3000, "cuda:1", last=0)],
        need("m", 450, 2000, "cuda:1"),
        budget(None, {"cuda:0": 8000, ANY_DEVICE: 4000}),
        "evict_then_load",
        ("g",),
    ),
    (
        "gpu unlimited, ram checked",
        [res("g", 500, 70_000, "cuda:0")],
        need("m", 600, 70_000, "cuda:0"),
        budget(1000),
        "evict_then_load",
        ("g",),
    ),
    # a CPU model needs RAM only: GPU residents count only their RAM
    (
        "cpu model next to a full gpu",
        [res("g", 500, 8000, "cuda:0")],
        need("m", 500, 9999, "cpu"),
        budget(2000, {"cuda:0": 8000}),
        "load",
        (),
    ),
    (
        "cpu model evicts a gpu model for ram",
        [res("c", 500, last=1), res("g", 800, 8000, "cuda:0", last=0)],
        need("m", 1000),
        budget(2000, {"cuda:0": 8000}),
        "evict_then_load",
        ("g",),
    ),
    # the resident named like the model is being replaced: ignored, busy or not
    ("replacing itself", [res("m", 800)], need("m", 800), budget(1000), "load", ()),
    ("replacing itself, busy", [res("m", 800, busy=True)], need("m", 800), budget(1000), "load", ()),
    (
        "replacing itself is not a victim",
        [res("m", 800, last=0), res("a", 300, last=1)],
        need("m", 800),
        budget(1000),
        "evict_then_load",
        ("a",),
    ),
]


@pytest.mark.parametrize(
    ("residents", "want", "limits", "action", "victims"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_load(
    residents: list[Resident], want: Need, limits: Budget, action: str, victims: tuple[str, ...]
) -> None:
    plan = plan_load(residents, want, limits)
    assert (plan.action, plan.victims) == (action, victims), plan.reason
    assert plan.reason
    assert want.name in plan.reason


def test_victims_in_eviction_order() -> None:
    residents = [
        res("late", 100, last=30),
        res("early", 100, last=10),
        res(SPARE, 100, last=99),
        res("mid", 100, last=20),
    ]
    plan = plan_load(residents, need("m", 1000), budget(1000))
    assert plan.victims == (SPARE, "early", "mid", "late")


def test_ties_in_last_used_are_broken_by_name() -> None:
    plan = plan_load([res("b", 300), res("a", 300)], need("m", 600), budget(1000))
    assert plan.victims == ("a",)


# -- plan_load: details (the 503 INSUFFICIENT_MEMORY body) ---------------------------------------


def test_details_impossible_ram() -> None:
    plan = plan_load([res("a", 300)], need("m", 1200), budget(1000))
    assert plan.action == "impossible"
    assert "RAM" in plan.reason
    d = plan.details
    assert d["model"] == "m"
    assert d["device"] == "cpu"
    assert d["need"] == {"ram_mb": 1200.0, "gpu_mb": 0.0}
    assert d["budget"] == {"ram_mb": 1000.0, "gpu_mb": None}
    assert d["used"] == {"ram_mb": 300.0, "gpu_mb": None}
    assert d["free_after"] == {"ram_mb": -200.0, "gpu_mb": None}
    assert d["victims"] == []


def test_details_impossible_vram() -> None:
    plan = plan_load(
        [res("g", 500, 1000, "cuda:1")],
        need("m", 450, 9000, "cuda"),
        budget(4000, {"cuda:0": 8000, "cuda:1": 6000}),
    )
    assert plan.action == "impossible"
    assert "VRAM on cuda:0" in plan.reason
    d = plan.details
    assert d["device"] == "cuda:0"
    assert d["need"] == {"ram_mb": 450.0, "gpu_mb": 9000.0}
    assert d["budget"] == {"ram_mb": 4000.0, "gpu_mb": 8000.0}
    assert d["used"] == {"ram_mb": 500.0, "gpu_mb": 0.0}
    assert d["free_after"] == {"ram_mb": 3550.0, "gpu_mb": -1000.0}
    assert d["devices"] == {
        "cuda:0": {"budget_mb": 8000.0, "used_mb": 0.0},
        "cuda:1": {"budget_mb": 6000.0, "used_mb": 1000.0},
    }


def test_details_wait_names_the_busy_models() -> None:
    residents = [
        res("busy", 600, last=0, busy=True),
        res("idle", 200, last=1),
        res("small", 50, loading=True),
    ]
    plan = plan_load(residents, need("m", 500), budget(1000))
    assert plan.action == "wait"
    assert plan.details["waiting_for"] == ["busy", "small"]
    assert "busy" in plan.reason
    # what is left short after evicting every idle model
    assert plan.details["free_after"]["ram_mb"] == -150.0


def test_details_evict_then_load() -> None:
    plan = plan_load(LRU3, need("m", 500), budget(1000))
    assert plan.details["victims"] == ["b", "a"]
    assert plan.details["used"]["ram_mb"] == 900.0
    assert plan.details["free_after"]["ram_mb"] == 200.0
    assert "b, a" in plan.reason


def test_details_are_json_ready() -> None:
    import json

    plan = plan_load(
        [res("g", 500, 3000, "cuda:0", busy=True)],
        need("m", 450, 6000, "cuda:0"),
        budget(None, {"cuda:0": 8000}),
    )
    assert plan.action == "wait"
    assert json.loads(json.dumps(plan.details)) == plan.details


# -- plan_load: properties ------------------------------------------------------------------------

DEVICES = ["cpu", "cuda:0", "cuda:1"]


@st.composite
def residents_st(draw: st.DrawFn) -> list[Resident]:
    names = draw(
        st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "m", SPARE]), unique=True, max_size=8)
    )
    out = []
    for name in names:
        device = draw(st.sampled_from(DEVICES))
        out.append(
            Resident(
                name=name,
                ram_bytes=draw(st.integers(0, 4000)) * MB,
                gpu_bytes=0 if device == "cpu" else draw(st.integers(0, 8000)) * MB,
                device=device,
                busy=draw(st.booleans()),
                last_used=draw(st.floats(0, 100)),
                keep_alive=300,
                loading=draw(st.booleans()),
            )
        )
    return out


@st.composite
def need_st(draw: st.DrawFn) -> Need:
    device = draw(st.sampled_from(DEVICES))
    return Need("m", draw(st.integers(0, 6000)) * MB, draw(st.integers(0, 9000)) * MB, device)


@st.composite
def budget_st(draw: st.DrawFn) -> Budget:
    ram = draw(st.none() | st.integers(0, 12_000).map(lambda n: n * MB))
    gpu = draw(
        st.none()
        | st.dictionaries(
            st.sampled_from(["cuda:0", "cuda:1", ANY_DEVICE]), st.integers(0, 16_000).map(lambda n: n * MB)
        )
    )
    return Budget(ram, gpu)


def _fits(residents: list[Resident], want: Need, limits: Budget) -> bool:
    ram = sum(r.ram_bytes for r in residents) + want.ram_bytes
    if limits.ram_bytes is not None and ram > limits.ram_bytes:
        return False
    gpu_limit = limits.gpu_limit(want.device)
    if gpu_limit is not None:
        gpu = sum(r.gpu_bytes for r in residents if r.device == want.device) + want.gpu_bytes
        if gpu > gpu_limit:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(residents_st(), need_st(), budget_st())
def test_plan_load_properties(residents: list[Resident], want: Need, limits: Budget) -> None:
    plan: Plan = plan_load(residents, want, limits)
    by_name = {r.name: r for r in residents}
    others = [r for r in residents if r.name != want.name]
    idle = [r for r in others if not r.busy and not r.loading]

    assert len(set(plan.victims)) == len(plan.victims)
    for victim in plan.victims:
        r = by_name[victim]
        assert victim != want.name
        assert not r.busy
        assert not r.loading

    after = [r for r in others if r.name not in plan.victims]
    if plan.action == "load":
        assert plan.victims == ()
        assert _fits(others, want, limits)
    elif plan.action == "evict_then_load":
        assert plan.victims
        assert not _fits(others, want, limits)
        assert _fits(after, want, limits)
        # only as many as needed: no victim but the spare could be kept
        for victim in plan.victims:
            if victim != SPARE:
                assert not _fits([*after, by_name[victim]], want, limits)
        # the spare, when a victim, goes first
        if SPARE in plan.victims:
            assert plan.victims[0] == SPARE
    elif plan.action == "wait":
        assert plan.victims == ()
        assert _fits([], want, limits)
        assert not _fits([r for r in others if r not in idle], want, limits)
        assert plan.details["waiting_for"]
    else:
        assert plan.action == "impossible"
        assert plan.victims == ()
        assert not _fits([], want, limits)


# -- expired --------------------------------------------------------------------------------------

NOW = 100.0

EXPIRED_CASES: list[tuple[str, list[Resident], list[str]]] = [
    ("nothing", [], []),
    ("forever", [res("a", 1, last=0, keep=-1)], []),
    ("zero: right after its request", [res("a", 1, last=NOW, keep=0)], ["a"]),
    ("not yet", [res("a", 1, last=95, keep=10)], []),
    ("exactly due", [res("a", 1, last=90, keep=10)], ["a"]),
    ("past due", [res("a", 1, last=10, keep=10)], ["a"]),
    ("busy never", [res("a", 1, last=0, keep=0, busy=True)], []),
    ("loading never", [res("a", 1, last=0, keep=0, loading=True)], []),
    ("spare never", [res(SPARE, 1, last=0, keep=0)], []),
    (
        "oldest first",
        [
            res("new", 1, last=80, keep=5),
            res("old", 1, last=10, keep=60),
            res("mid", 1, last=50, keep=0),
            res("kept", 1, last=0, keep=-1),
            res("busy", 1, last=0, keep=0, busy=True),
            res("fresh", 1, last=99, keep=5),
        ],
        ["old", "mid", "new"],
    ),
]


@pytest.mark.parametrize(
    ("residents", "want"), [case[1:] for case in EXPIRED_CASES], ids=[case[0] for case in EXPIRED_CASES]
)
def test_expired(residents: list[Resident], want: list[str]) -> None:
    assert expired(residents, NOW) == want


# -- values ---------------------------------------------------------------------------------------


def test_cuda_is_normalised() -> None:
    assert res("a", 1, device="cuda").device == "cuda:0"
    assert need("m", 1, device="CUDA").device == "cuda:0"
    assert Budget(None, {"cuda": 5}).gpu_bytes == {"cuda:0": 5}


def test_budget_gpu_limit() -> None:
    limits = Budget(None, {"cuda:0": 8, ANY_DEVICE: 4})
    assert limits.gpu_limit("cuda:0") == 8
    assert limits.gpu_limit("cuda") == 8
    assert limits.gpu_limit("cuda:5") == 4
    assert limits.gpu_limit("cpu") is None
    assert limits.gpu_limit("mps") is None
    assert Budget(None, {"cuda:0": 8}).gpu_limit("cuda:1") is None
    assert Budget(None, None).gpu_limit("cuda:0") is None
