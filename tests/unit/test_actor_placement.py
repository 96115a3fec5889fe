"""Where the shard actors go: round robin over the live nodes, each kind's shards on as many
nodes as it has shards (up to the nodes there are), no node more than one actor above another."""

from __future__ import annotations

from collections import Counter

from actors.wiring import PROJECTOR_NAME, place_on_nodes, presence_shard_name, session_shard_name


def _names(sessions: int, presences: int) -> list[str]:
    return ([session_shard_name(i, sessions) for i in range(sessions)]
            + [presence_shard_name(i, presences) for i in range(presences)] + [PROJECTOR_NAME])


def test_each_kind_spans_the_nodes_and_the_load_is_even() -> None:
    placed = place_on_nodes(_names(2, 2), ["head", "worker"])
    assert placed[session_shard_name(0, 2)] != placed[session_shard_name(1, 2)]
    assert placed[presence_shard_name(0, 2)] != placed[presence_shard_name(1, 2)]
    # Five actors on two nodes: three and two, so one node's death takes at most three.
    assert sorted(Counter(placed.values()).values()) == [2, 3]


def test_a_kind_with_fewer_shards_than_nodes_takes_distinct_nodes() -> None:
    placed = place_on_nodes(_names(3, 1), ["a", "b", "c", "d"])
    assert len({placed[session_shard_name(i, 3)] for i in range(3)}) == 3
    assert max(Counter(placed.values()).values()) - min(Counter(placed.values()).values()) <= 1


def test_one_node_takes_everything_and_no_node_places_nothing() -> None:
    assert set(place_on_nodes(_names(2, 2), ["only"]).values()) == {"only"}
    assert place_on_nodes(_names(2, 2), []) == {}


def test_the_same_nodes_give_the_same_placement() -> None:
    names = _names(4, 2)
    assert place_on_nodes(names, ["n1", "n2", "n3"]) == place_on_nodes(names, ["n1", "n2", "n3"])
