"""An Inventory kept current through random changes gives compute() what a plain mapping does.

compute() over an Inventory queries its maintained postings and rows (tfcrypt/core/
inventory.py); over a plain mapping it indexes the workloads itself. Both must give the
same Desired after every put and delete, with and without addresses claimed twice (then
compute falls back to indexing the workloads), with subnets first asked for after the
workloads arrived, rows kept across computes and slots of deleted addresses reused.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import (
    LABELS,
    NODES,
    SINGLE,
    SUBNETS,
    inventories,
    key_of,
    one_workload,
    policy_sets,
    unique_address_inventories,
)

from tfcrypt.core.compute import Snapshot, compute
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.inventory import LARGE_MIN, Inventory
from tfcrypt.core.inventory_index import InventoryIndex
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload

Inv = tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]]

steps = st.one_of(
    st.tuples(st.just("put"), one_workload()),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("policies"), policy_sets(max_size=2)),
)


def both(own: str, inventory: Inventory, plain: dict[str, Workload],
         policies: dict[str, EncryptionPolicy], nodes: dict[str, NodeRecord]) -> None:
    key = key_of(NODES.index(own) + 1)
    over_inventory = compute(Snapshot(own, inventory, policies, nodes, key))
    assert over_inventory == compute(Snapshot(own, plain, policies, nodes, key))


def run_sequence(inv: Inv, sequence: list[tuple[object, ...]], unique: bool) -> None:
    workloads, policy_list, nodes = inv
    plain = {w.key: w for w in workloads}
    inventory = Inventory(plain)
    policies = {p.name: p for p in policy_list}
    for step in [("start",), *sequence]:
        match step:
            case ("put", Workload() as w):
                if unique:  # keep every address claimed once: the inventory's own path
                    for other in [k for k, o in plain.items()
                                  if k != w.key and not set(o.ips).isdisjoint(w.ips)]:
                        del plain[other]
                        inventory.delete(other)
                plain[w.key] = w
                inventory.put(w.key, w)
            case ("delete", int(i)) if plain:
                gone = sorted(plain)[i % len(plain)]
                del plain[gone]
                inventory.delete(gone)
            case ("policies", list(ps)):
                policies = {p.name: p for p in ps}
        assert dict(inventory) == plain
        if unique:
            assert not inventory.shared
            rows_hold_the_results(inventory)
        for own in NODES[:3]:
            both(own, inventory, plain, policies, nodes)
    # what was kept current equals what a fresh inventory builds
    fresh = Inventory(plain)
    assert {k: inventory.posting(k) for k in _tag_keys(plain)} == {
        k: fresh.posting(k) for k in _tag_keys(plain)}
    assert inventory.every() == fresh.every()


TAG_KEYS = {*((t, v) for t, values in SINGLE.items() for v in values),
            *(("label", v) for v in LABELS)}
ENDPOINTS = [*(Endpoint(tags=frozenset({Tag(*k)})) for k in sorted(TAG_KEYS)),
             *(Endpoint(subnet=s) for s in SUBNETS)]


def rows_hold_the_results(inventory: Inventory) -> None:
    """Every tag key's and subnet's bitmap holds exactly its result, for two nodes. The
    rows were kept from the previous step's check (the same keys), so this checks that
    puts and deletes kept them current, slots reused included."""
    remote_ips = {ip for k in inventory for ip in inventory[k].ips}
    for own in NODES[:2]:
        index = InventoryIndex(inventory, own, TAG_KEYS)
        for endpoint in ENDPOINTS:
            key = index.register(endpoint, ())
            found = index.result(key)
            holds = index.holds(index.bitmap(key))
            assert {ip for ip in remote_ips if holds(ip)} == found
            assert index.bitmap(key).bit_count() == len(found)
        index.forget_unused_rows()


def _tag_keys(plain: dict[str, Workload]) -> set[tuple[str, str]]:
    return {k for w in plain.values() for k in w.tag_keys} | {("application", "a")}


@settings(max_examples=150, deadline=None)
@given(unique_address_inventories(), st.lists(steps, max_size=12))
def test_an_inventory_kept_current_computes_what_a_mapping_does(
        inv: Inv, sequence: list[tuple[object, ...]]) -> None:
    run_sequence(inv, sequence, unique=True)


@settings(max_examples=100, deadline=None)
@given(inventories(), st.lists(steps, max_size=8))
def test_with_addresses_claimed_twice_too(inv: Inv, sequence: list[tuple[object, ...]]) -> None:
    run_sequence(inv, sequence, unique=False)


def w(name: str, node: str, ip: str, *tags: str) -> Workload:
    return Workload(name, node, (ip,), frozenset(Tag.parse(t) for t in tags))


def test_a_reused_slot_carries_only_its_new_tags() -> None:
    inventory = Inventory()
    inventory.put("a", w("a", "n2", "10.0.0.1", "application=db"))
    index = InventoryIndex(inventory, "n1", {("application", "db")})
    db = index.register(Endpoint(tags=frozenset({Tag("application", "db")})), ())
    assert index.result(db) == {"10.0.0.1"}
    assert index.bitmap(db).bit_count() == 1
    index.forget_unused_rows()  # the db row is kept current from here on
    inventory.delete("a")
    inventory.put("b", w("b", "n2", "10.0.0.2", "application=web"))  # takes a's slot
    again = InventoryIndex(inventory, "n1", {("application", "db")})
    key = again.register(Endpoint(tags=frozenset({Tag("application", "db")})), ())
    assert again.result(key) == frozenset()
    assert again.bitmap(key) == 0
    assert not again.holds(again.bitmap(key))("10.0.0.2")


def test_a_subnet_asked_for_later_follows_new_and_deleted_workloads() -> None:
    inventory = Inventory({"a": w("a", "n2", "10.1.0.1")})
    subnet = Endpoint(subnet="10.1.0.0/24")
    first = InventoryIndex(inventory, "n1", ())
    assert first.select(subnet, ()) == {"10.1.0.1"}
    first.forget_unused_rows()
    inventory.put("b", w("b", "n3", "10.1.0.2"))
    inventory.put("c", w("c", "n3", "10.2.0.1"))
    inventory.delete("a")
    second = InventoryIndex(inventory, "n1", ())
    key = second.register(subnet, ())
    assert second.result(key) == {"10.1.0.2"}
    assert second.holds(second.bitmap(key))("10.1.0.2")
    assert second.bitmap(key).bit_count() == 1


def test_an_address_claimed_twice_is_refused_by_the_inventory_view() -> None:
    inventory = Inventory({"a": w("a", "n2", "10.0.0.1"), "b": w("b", "n3", "10.0.0.1")})
    assert inventory.shared
    try:
        InventoryIndex(inventory, "n1", ())
    except ValueError as e:
        assert "claimed twice" in str(e)
    else:
        raise AssertionError("an inventory view over a shared address was made")
    policy = EncryptionPolicy("p", Mode.ENFORCE, (Rule(Endpoint(any=True), Endpoint(any=True)),))
    local = w("l", "n1", "10.0.9.1")
    inventory.put("l", local)
    snap = Snapshot("n1", inventory, {"p": policy}, {}, key_of(1))
    assert compute(snap) == compute(Snapshot("n1", dict(inventory), {"p": policy}, {},
                                             key_of(1)))


@settings(max_examples=150, deadline=None)
@given(st.one_of(unique_address_inventories(), inventories()), st.booleans(),
       st.lists(st.tuples(steps, st.booleans()), max_size=10))
def test_the_incremental_core_over_an_inventory_equals_compute_after_every_change(
        inv: Inv, unique: bool, sequence: list[tuple[tuple[object, ...], bool]]) -> None:
    """The agent's way: one Inventory changed in place and passed with the changed keys;
    the core's rebuilds (first update, policy changes) start from its copies."""
    workloads, policy_list, nodes = inv
    plain = {w.key: w for w in workloads}
    inventory = Inventory(plain)
    policies = {p.name: p for p in policy_list}
    cores = {own: IncrementalCore(own) for own in NODES[:2]}
    for step, tell_keys in [(("start",), True), *sequence]:
        changed: set[str] = set()
        match step:
            case ("put", Workload() as w):
                if unique:
                    for other in [k for k, o in plain.items()
                                  if k != w.key and not set(o.ips).isdisjoint(w.ips)]:
                        del plain[other]
                        inventory.delete(other)
                        changed.add(other)
                plain[w.key] = w
                inventory.put(w.key, w)
                changed.add(w.key)
            case ("delete", int(i)) if plain:
                gone = sorted(plain)[i % len(plain)]
                del plain[gone]
                inventory.delete(gone)
                changed.add(gone)
            case ("policies", list(ps)):
                policies = {p.name: p for p in ps}
        for own, core in cores.items():
            key = key_of(NODES.index(own) + 1)
            got = core.update(Snapshot(own, inventory, policies, nodes, key),
                              changed if tell_keys else None)
            assert got == compute(Snapshot(own, dict(plain), policies, nodes, key)), step


def test_a_core_rebuilt_after_deletions_counts_new_addresses_apart() -> None:
    """Slots freed by deletions leave gaps; addresses that arrive after the rebuild get
    bitmap positions past every slot, never one of a live address."""
    app_a = Endpoint(tags=frozenset({Tag("application", "a")}))
    policy = EncryptionPolicy("p", Mode.ENFORCE, (Rule(Endpoint(any=True), Endpoint(any=True)),
                                                  Rule(app_a, Endpoint(any=True))))
    inventory = Inventory({"workloads/n1/l": w("l", "n1", "10.9.0.1")})
    for i in range(3):
        inventory.put(f"workloads/n2/w{i}", w(f"w{i}", "n2", f"10.0.0.{i + 1}"))
    inventory.delete("workloads/n2/w0")  # slots: 0 local, 1 free, 2 and 3 selected
    core = IncrementalCore("n1")
    snap = Snapshot("n1", inventory, {"p": policy}, {}, key_of(1))
    core.update(snap)
    for i in (7, 8):
        inventory.put(f"workloads/n3/x{i}", w(f"x{i}", "n3", f"10.0.1.{i}"))
        got = core.update(snap, {f"workloads/n3/x{i}"})
        assert got == compute(Snapshot("n1", dict(inventory), {"p": policy}, {}, key_of(1)))
        assert got.selected_pair_count == 2 + i - 6
    # a new local class: its size is counted on the bitmaps of its selectors
    inventory.put("workloads/n1/a", w("a", "n1", "10.9.0.2", "application=a"))
    got = core.update(snap, {"workloads/n1/a"})
    assert got == compute(Snapshot("n1", dict(inventory), {"p": policy}, {}, key_of(1)))
    assert got.selected_pair_count == 2 * 4


def test_large_postings_keep_rows_that_stay_exact_through_changes() -> None:
    """Postings past LARGE_MIN keep their row from the start, before any query asks."""
    inventory = Inventory()
    count = LARGE_MIN + 200
    for i in range(count):
        tags = ("application=big", f"tier={'web' if i % 2 else 'db'}")
        inventory.put(f"workloads/n{2 + i % 3}/w{i}",
                      w(f"w{i}", f"n{2 + i % 3}", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                        *tags))
    for i in range(0, count, 7):  # deletions free slots, new workloads reuse them
        node = f"n{2 + i % 3}"
        inventory.delete(f"workloads/{node}/w{i}")
        inventory.put(f"workloads/{node}/x{i}", w(f"x{i}", node, f"10.9.{i >> 8}.{i & 255}",
                                                  "tier=web"))
    big = ("application", "big")
    index = InventoryIndex(inventory, "n2", {big, ("tier", "web")})
    remote = {ip for k in inventory if inventory[k].node != "n2" for ip in inventory[k].ips}
    for wanted in ({big}, {("tier", "web")}, {big, ("tier", "web")}):
        key = index.register(Endpoint(tags=frozenset(Tag(*k) for k in wanted)), ())
        expected = {ip for k in inventory if inventory[k].node != "n2"
                    and wanted <= inventory[k].tag_keys for ip in inventory[k].ips}
        assert index.result(key) == expected
        holds = index.holds(index.bitmap(key))
        assert {ip for ip in remote if holds(ip)} == expected
        assert index.bitmap(key).bit_count() == len(expected)
