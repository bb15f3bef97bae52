"""SecAgg+'s numerics: masked sums bit for bit, dropout recovery up to the threshold, costs."""

import numpy as np
import pytest

from fedsim.secagg.masks import agreed_seed, derive, expand, harary_neighbours, private_key, public_bytes
from fedsim.secagg.protocol import MESSAGE_ROUNDS, SHARE_ENVELOPE_BYTES, run_round, shares_needed
from fedsim.secagg.quantization import dequantize_sum, fits, out_of_range, quantize
from fedsim.secagg.shamir import SHARE_BYTES, combine_shares, create_shares

MATERIAL = b"a test round's secret material!!"


def _inputs(clients, dim=257, bits=20, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**bits, size=dim, dtype=np.uint32) for u in clients}


def _plain_sum(inputs):
    return np.sum(list(inputs.values()), axis=0, dtype=np.uint32)


@pytest.mark.parametrize(("n", "degree", "dropped"), [(2, None, []), (7, None, []), (12, 4, []), (12, None, [0, 5, 11]),
                                                      (16, 6, [3, 9]), (9, 8, [8])])
def test_masked_sum_equals_the_plain_modular_sum_bit_for_bit(n, degree, dropped):
    inputs = _inputs([u for u in range(n) if u not in dropped])
    outcome = run_round(inputs, dropped, degree=degree, threshold=0.5, material=MATERIAL)
    assert outcome.refused is None
    assert outcome.total.dtype == np.uint32
    assert np.array_equal(outcome.total, _plain_sum(inputs))
    assert outcome.recovered == sorted(dropped)


def test_sums_that_wrap_around_two_to_the_32_stay_exact_modulo():
    inputs = _inputs(range(5), bits=32, seed=1)
    outcome = run_round(inputs, [], degree=None, threshold=0.5, material=MATERIAL)
    assert np.array_equal(outcome.total, _plain_sum(inputs))


def test_a_masked_input_reveals_nothing_of_its_input():
    # the masks are uniform on Z_(2^32): one client's masked vector is independent of its levels
    key = private_key(MATERIAL, "mask-key/0")
    mask = expand(agreed_seed(key, public_bytes(private_key(MATERIAL, "mask-key/1"))), 100_000)
    assert abs(mask.astype(np.float64).mean() / 2**32 - 0.5) < 0.005
    assert len(np.unique(mask)) > 99_000


def test_both_clients_of_a_pair_agree_on_their_seed():
    a, b = private_key(MATERIAL, "mask-key/3"), private_key(MATERIAL, "mask-key/8")
    assert agreed_seed(a, public_bytes(b)) == agreed_seed(b, public_bytes(a))
    assert agreed_seed(a, public_bytes(b)) != agreed_seed(a, public_bytes(private_key(MATERIAL, "mask-key/9")))


def test_dropped_clients_within_the_threshold_are_recovered():
    # 10 clients, degree 4: each secret is rebuilt from 3 of 4 neighbours; drop clients while
    # every client keeps 3 surviving neighbours (the round's own graph)
    clients = list(range(10))
    graph = harary_neighbours(clients, 4, derive(MATERIAL, "graph"))
    dropped: list[int] = []
    for u in clients:
        if all(sum(v in (*dropped, u) for v in graph[w]) <= 1 for w in clients):
            dropped.append(u)
    assert len(dropped) >= 2
    inputs = _inputs([u for u in clients if u not in dropped])
    outcome = run_round(inputs, dropped, degree=4, threshold=0.5, material=MATERIAL)
    assert outcome.refused is None and outcome.recovered == dropped
    assert np.array_equal(outcome.total, _plain_sum(inputs))


def test_a_round_with_too_few_shares_is_refused_in_one_line():
    # the complete graph on 5: each secret needs floor(0.5 * 4) + 1 = 3 of the 4 others; 3 drop, 2 remain
    inputs = _inputs([0, 1])
    outcome = run_round(inputs, [2, 3, 4], degree=None, threshold=0.5, material=MATERIAL)
    assert outcome.total is None
    assert outcome.refused == "client 0 sent its input and 1 of its 4 neighbours replied; 3 shares rebuild its masks"
    assert "\n" not in outcome.refused


def test_shares_needed_is_a_strict_majority_of_the_neighbours():
    assert [shares_needed(k, 0.5) for k in (1, 2, 3, 4, 9)] == [1, 2, 2, 3, 5]
    assert shares_needed(4, 0.99) == 4


def test_harary_graph_has_the_degree_and_is_symmetric():
    clients = list(range(3, 23))
    graph = harary_neighbours(clients, 6, b"\1" * 32)
    assert all(len(graph[u]) == 6 and u not in graph[u] for u in clients)
    assert all(u in graph[v] for u in clients for v in graph[u])
    assert harary_neighbours(clients, 6, b"\1" * 32) == graph
    assert harary_neighbours([1, 2, 3], 6, b"\1" * 32) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}


def test_bytes_per_client_are_the_protocols():
    n, dim = 6, 1000
    inputs = _inputs(range(n - 1), dim=dim)
    outcome = run_round(inputs, [n - 1], degree=None, threshold=0.5, material=MATERIAL)
    share = SHARE_BYTES  # two field elements of GF(2^130 - 5) and the 4-byte index: 38
    keys, shares = 2 * 32, (n - 1) * (2 * share + SHARE_ENVELOPE_BYTES)
    assert outcome.bytes_up[0] == keys + shares + 4 * dim + (n - 1) * share
    assert outcome.bytes_up[n - 1] == keys + shares  # dropped after sharing its keys
    relayed = (n - 1) * 2 * 32 + shares  # its neighbours' keys, the shares addressed to it
    assert outcome.bytes_down[0] == relayed + 4 and outcome.bytes_down[n - 1] == relayed  # + the dropped one's id
    assert outcome.message_rounds == MESSAGE_ROUNDS == 4


def test_quantised_sum_dequantises_within_half_a_step_per_input():
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-1, 1, size=500) for _ in range(8)]
    total = np.sum([quantize(x, 1.0, 16) for x in xs], axis=0, dtype=np.uint32)
    step = 2 / (2**16 - 1)
    assert np.abs(dequantize_sum(total, 8, 1.0, 16) - np.sum(xs, axis=0)).max() <= 8 * step / 2 + 1e-12


def test_out_of_range_coordinates_are_counted_and_wrapping_sums_refused():
    x = np.array([-2.0, -1.0, 0.5, 1.0, 1.5])
    assert out_of_range(x, 1.0) == 2
    assert quantize(x, 1.0, 8).tolist() == [0, 0, 191, 255, 255]
    assert fits(20, 4096) and not fits(20, 4097)
    with pytest.raises(ValueError, match="wrap around"):
        dequantize_sum(np.zeros(3, dtype=np.uint32), 4097, 1.0, 20)


def _rebuilt(shares):
    try:
        return combine_shares(shares)
    except ValueError:  # a value beyond 16 bytes per half
        return None


def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 6)
    assert {len(s) for s in shares} == {SHARE_BYTES}
    for subset in ([0, 1, 2], [5, 3, 1], [0, 2, 4, 5]):
        assert combine_shares([shares[i] for i in subset]) == secret
    assert _rebuilt(shares[:2]) != secret  # 2 points of a quadratic: a random field element
    assert combine_shares(create_shares(b"\xff" * 32, 1, 1)) == b"\xff" * 32
