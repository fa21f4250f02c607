"""DeviceSpec / ClusterSpec TOML files: built-ins, round trip, and every kind of bad input."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st

from primasim import SpecError
from primasim.core.cluster import cluster_from_toml, load_cluster
from primasim.core.paths import data_dir
from primasim.core.units import GB, MBPS, MS, GiB


def _raw(name: str = "prima-d1-d6") -> dict[str, Any]:
    with open(data_dir() / "clusters" / f"{name}.toml", "rb") as fh:
        return tomllib.load(fh)


def test_builtin_testbed_matches_the_paper() -> None:
    c6 = load_cluster("prima-d1-d6")
    assert c6.names == ["D1", "D2", "D3", "D4", "D5", "D6"]
    avail = {d.name: round(d.ram_avail / GiB, 1) for d in c6.devices}
    assert avail == {"D1": 2.4, "D2": 4.1, "D3": 9.7, "D4": 1.9, "D5": 5.1, "D6": 6.8}  # paper Table 3
    c4 = load_cluster("prima-d1-d4")
    assert c4.names == ["D1", "D2", "D3", "D4"]
    d2, d3 = c4.device("D2"), c4.device("D3")
    assert d2.gpu is not None and d2.gpu.vram_avail == 8 * GiB and d3.gpu is not None and d3.gpu.vram_avail == 11 * GiB
    assert c4.device("D1").has_metal and c4.device("D4").os == "android"
    # aggregate RAM + VRAM 37 GiB < Llama 3-70B Q4K (paper §5.1); D1's Metal pool is its RAM
    total = sum(d.ram_avail + (d.gpu.vram_avail if d.gpu and not d.uma else 0) for d in c4.devices)
    assert 37 * GiB <= total < 38 * GiB
    assert c4.network.kind == "wifi" and 320 * MBPS <= c4.network.bandwidth <= 610 * MBPS
    assert 3 * MS <= c4.network.latency <= 7 * MS
    assert d3.disk_speed == pytest.approx(3.17 * GB)  # Linux: sequential
    assert c4.device("D1").disk_speed == pytest.approx(0.7 * GB)  # macOS: random


def test_toml_round_trip(tmp_path: Path) -> None:
    c = load_cluster("prima-d1-d6")
    p = tmp_path / "copy.toml"
    c.save(p)
    back = load_cluster(p)
    assert back.names == c.names and back.head == c.head
    for a, b in zip(c.devices, back.devices):
        assert a.ram_avail == pytest.approx(b.ram_avail) and a.cpu_flops == pytest.approx(b.cpu_flops)
        assert (a.gpu is None) == (b.gpu is None)


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    p = tmp_path / "bad.toml"
    p.write_text(tomli_w.dumps(raw))
    return p


def _expect(tmp_path: Path, raw: dict[str, Any], *needles: str) -> SpecError:
    p = _write(tmp_path, raw)
    with pytest.raises(SpecError) as e:
        load_cluster(p)
    msg = e.value.message
    assert "bad.toml" in msg, msg  # names the file
    for n in needles:
        assert n in msg, (n, msg)
    assert e.value.fix, "every error says how to fix it"
    return e.value


def test_missing_memory(tmp_path: Path) -> None:
    raw = _raw()
    del raw["devices"][1]["ram_avail_gib"]
    _expect(tmp_path, raw, "devices[1]", "D2", "ram_avail_gib")


def test_negative_memory(tmp_path: Path) -> None:
    raw = _raw()
    raw["devices"][2]["ram_avail_gib"] = -3.0
    _expect(tmp_path, raw, "D3", "ram_avail_gib", "non-negative")
    raw = _raw()
    raw["devices"][1]["gpu"]["vram_avail_gib"] = -1
    _expect(tmp_path, raw, "D2", "vram_avail_gib")


def test_incomplete_and_malformed(tmp_path: Path) -> None:
    raw = _raw()
    del raw["devices"]
    _expect(tmp_path, raw, "devices")
    raw = _raw()
    raw["devices"][0]["cpu_gflops"] = {"q4k": 10.0}
    _expect(tmp_path, raw, "cpu_gflops", "f32")
    raw = _raw()
    raw["devices"][0]["os"] = "windows"
    _expect(tmp_path, raw, "os")
    raw = _raw()
    raw["devices"][0]["ram_bw_gbs"] = "fast"
    _expect(tmp_path, raw, "ram_bw_gbs", "number")
    raw = _raw()
    raw["devices"][0]["ram_avail_gib"] = 100.0
    _expect(tmp_path, raw, "exceeds")
    raw = _raw()
    raw["devices"][3]["colour"] = "red"
    _expect(tmp_path, raw, "unknown field", "colour")
    raw = _raw()
    raw["head"] = "D9"
    _expect(tmp_path, raw, "head")
    raw = _raw()
    raw["devices"][1]["name"] = "D1"
    _expect(tmp_path, raw, "duplicate")
    raw = _raw()
    raw["network"]["kind"] = "carrier-pigeon"
    _expect(tmp_path, raw, "network", "kind")


def test_not_toml_and_missing_files(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[[devices]\nname = ")
    with pytest.raises(SpecError, match="broken.toml.*not valid TOML"):
        load_cluster(p)
    with pytest.raises(SpecError, match="file not found"):
        load_cluster(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="unknown cluster"):
        load_cluster("no-such-cluster")
    b = tmp_path / "binary.toml"
    b.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(SpecError, match="binary.toml"):
        load_cluster(b)


def test_derived_cluster(tmp_path: Path) -> None:
    raw = {"name": "mine", "base": "prima-d1-d6", "use": ["D2", "D3", "D5"]}
    p = _write(tmp_path, raw)
    c = load_cluster(p)
    assert c.names == ["D2", "D3", "D5"] and c.head == "D3"  # the base's head, since it is used
    raw["use"] = ["D2", "D5"]
    assert load_cluster(_write(tmp_path, raw)).head == "D2"  # else the first device used
    raw["use"] = ["D2", "D7"]
    _expect(tmp_path, raw, "D7")


# ---------------------------------------------------------------------------- fuzzing
junk = st.recursive(st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True, allow_infinity=True)
                    | st.text(max_size=6), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=5)
DEVICE_KEYS = ["name", "os", "cores", "ram_total_gib", "ram_avail_gib", "ram_bw_gbs", "cpu_gflops", "disk_seq_gbs",
               "disk_rnd_gbs", "uma", "swap_avail_gib", "gpu", "emulate", "sources", "kv_copy_ms"]
NET_KEYS = ["kind", "bandwidth_mbps", "latency_ms", "jitter_ms", "links", "sources"]


def _mutate(raw: dict[str, Any], where: str, key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    if where == "top":
        target: Any = out
    elif where == "network":
        target = out.get("network")
    else:
        devs = out.get("devices")
        i = 1 if where == "gpu" else int(where)
        target = devs[i] if isinstance(devs, list) and len(devs) > i else None
        if where == "gpu":
            target = target.get("gpu") if isinstance(target, dict) else None
    if isinstance(target, dict):  # earlier edits may have replaced the container: skip then
        target[key] = value
    return out


GPU_KEYS = ["kind", "vram_total_gib", "vram_avail_gib", "gflops", "mem_bw_gbs", "pcie_gbs", "compute_buffer_mib"]
edit = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(["name", "head", "devices", "network", "base", "use", "description"]), junk),
    st.tuples(st.just("network"), st.sampled_from(NET_KEYS), junk),
    st.tuples(st.sampled_from(["0", "1", "3"]), st.sampled_from(DEVICE_KEYS), junk),
    st.tuples(st.just("gpu"), st.sampled_from(GPU_KEYS), junk),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(edit, min_size=1, max_size=3))
def test_cluster_parser_never_crashes(edits: list[tuple[str, str, Any]]) -> None:
    raw = _raw()
    for where, key, value in edits:
        raw = _mutate(raw, where, key, value)
    try:
        c = cluster_from_toml(raw, "fuzz.toml")
    except SpecError as e:
        assert e.where and e.fix
        return
    assert c.devices and all(d.ram_avail >= 0 for d in c.devices)
    assert math.isfinite(c.network.bandwidth) and c.network.bandwidth > 0


def test_network_junk_is_rejected() -> None:
    for key, value in (("sources", [1]), ("links", "D1-D2"), ("bandwidth_mbps", float("nan")),
                       ("latency_ms", float("inf"))):
        raw = _raw()
        raw["network"][key] = value
        with pytest.raises(SpecError, match=key):
            cluster_from_toml(raw, "x.toml")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_cluster_file_parser_never_crashes(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    p = tmp_path_factory.mktemp("c") / "fuzz.toml"
    p.write_text(text)
    try:
        load_cluster(p)
    except SpecError:
        pass
