"""Communication graphs for decentralised (gossip) training, and their mixing matrices.

A :class:`Topology` holds one boolean adjacency matrix per step of its period (static graphs
have period 1). ``A[i, j]`` is True when node i receives node j's model, so row i lists the
neighbours node i mixes in. All graphs but the one-peer exponential graph are undirected
(symmetric ``A``); none has self-loops. Random graphs are drawn from a seeded
``numpy.random.Generator``, so a seed fixes the graph on every platform.
"""

import inspect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Topology:
    """A (possibly time-varying) communication graph.

    Attributes
    ----------
    name : str
        Which family it comes from (``"ring"``, ``"torus"``, ...).
    adjacencies : tuple of Tensor
        Boolean (n, n) adjacency per step of the period; step ``t`` uses
        ``adjacencies[t % period]``.
    """

    name: str
    adjacencies: tuple[Tensor, ...]

    @property
    def num_nodes(self) -> int:
        """Number of nodes n."""
        return self.adjacencies[0].shape[0]

    @property
    def period(self) -> int:
        """Number of distinct graphs before the sequence repeats (1 for static graphs)."""
        return len(self.adjacencies)

    def adjacency(self, t: int = 0) -> Tensor:
        """The boolean (n, n) adjacency used at gossip step ``t``."""
        return self.adjacencies[t % self.period]


def _from_edges(num_nodes: int, edges: list[tuple[int, int]]) -> Tensor:
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for u, v in edges:
        adjacency[u, v] = adjacency[v, u] = True
    return adjacency


def _check_nodes(name: str, num_nodes: int, minimum: int) -> None:
    if num_nodes < minimum:
        raise ValueError(f"{name}: num_nodes must be >= {minimum}, got {num_nodes}")


def ring(num_nodes: int) -> Topology:
    """Cycle 0 - 1 - ... - (n-1) - 0; every node has degree 2 (n >= 3)."""
    _check_nodes("ring", num_nodes, 3)
    edges = [(i, (i + 1) % num_nodes) for i in range(num_nodes)]
    return Topology("ring", (_from_edges(num_nodes, edges),))


def torus(num_nodes: int, rows: int | None = None) -> Topology:
    """2-D torus: a ``rows x cols`` grid with wrap-around; every node has degree 4.

    Parameters
    ----------
    num_nodes : int
        n = rows * cols.
    rows : int or None, default None
        Grid height, >= 3 and dividing n; None takes the largest divisor of n that is
        <= sqrt(n) (16 -> 4 x 4, 50 -> 5 x 10). Both sides must be >= 3 for degree 4.
    """
    if rows is None:
        divisors = [r for r in range(3, math.isqrt(num_nodes) + 1) if num_nodes % r == 0]
        if not divisors:
            raise ValueError(f"torus: {num_nodes} nodes cannot form a grid with both sides "
                             f">= 3; choose n = rows * cols with rows, cols >= 3")
        rows = divisors[-1]
    if rows < 3 or num_nodes % rows or num_nodes // rows < 3:
        raise ValueError(f"torus: rows={rows} must divide num_nodes={num_nodes} with both "
                         f"sides >= 3")
    cols = num_nodes // rows
    edges = []
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            edges.append((node, r * cols + (c + 1) % cols))
            edges.append((node, ((r + 1) % rows) * cols + c))
    return Topology("torus", (_from_edges(num_nodes, edges),))


def fully_connected(num_nodes: int) -> Topology:
    """Complete graph: every node is a neighbour of every other (n >= 2)."""
    _check_nodes("fully_connected", num_nodes, 2)
    adjacency = ~torch.eye(num_nodes, dtype=torch.bool)
    return Topology("fully_connected", (adjacency,))


def _pair_stubs(num_nodes: int, degree: int,
                rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """One attempt of the Steger-Wormald pairing: repeatedly pair the remaining stubs at
    random, keeping pairs that are neither loops nor duplicate edges. None when the
    leftover stubs can no longer be paired."""
    edges: set[tuple[int, int]] = set()
    stubs = np.repeat(np.arange(num_nodes), degree)
    while stubs.size:
        rng.shuffle(stubs)
        leftover = []
        for u, v in stubs.reshape(-1, 2).tolist():
            edge = (min(u, v), max(u, v))
            if u != v and edge not in edges:
                edges.add(edge)
            else:
                leftover += [u, v]
        nodes = sorted(set(leftover))
        if leftover and not any((u, v) not in edges for i, u in enumerate(nodes)
                                for v in nodes[i + 1:]):
            return None
        stubs = np.asarray(leftover, dtype=np.int64)
    return edges


def random_regular(num_nodes: int, degree: int, seed: int = 0,
                   max_tries: int = 1000) -> Topology:
    """Random ``degree``-regular simple graph, resampled until connected.

    Sampled by the Steger-Wormald pairing algorithm (approximately uniform over
    d-regular graphs; Steger & Wormald 1999). The vanishing-variance paper's default is
    50 nodes of degree 8.

    Parameters
    ----------
    num_nodes : int
        n, > degree; ``n * degree`` must be even.
    degree : int
        d >= 1.
    seed : int, default 0
        Seed of the draw.
    max_tries : int, default 1000
        Attempts before giving up (only reachable for degenerate n, d such as d = 1).
    """
    if not 1 <= degree < num_nodes or (num_nodes * degree) % 2:
        raise ValueError(f"random_regular: need 1 <= degree < num_nodes and num_nodes * "
                         f"degree even, got num_nodes={num_nodes}, degree={degree}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        edges = _pair_stubs(num_nodes, degree, rng)
        if edges is not None:
            adjacency = _from_edges(num_nodes, sorted(edges))
            if is_connected(adjacency):
                return Topology("random_regular", (adjacency,))
    raise ValueError(f"random_regular: no connected {degree}-regular graph on {num_nodes} "
                     f"nodes in {max_tries} tries")


def erdos_renyi(num_nodes: int, p: float | None = None, seed: int = 0,
                max_tries: int = 1000) -> Topology:
    """Erdos-Renyi G(n, p): each edge present independently with probability p, resampled
    until the graph is connected (so this is G(n, p) conditioned on connectivity).

    Parameters
    ----------
    num_nodes : int
        n >= 2.
    p : float or None, default None
        Edge probability in (0, 1]; None takes ``min(1, 2 ln(n) / n)``, twice the
        connectivity threshold.
    seed : int, default 0
        Seed of the draws.
    max_tries : int, default 1000
        Draws before giving up (p far below ln(n) / n).
    """
    _check_nodes("erdos_renyi", num_nodes, 2)
    if p is None:
        p = min(1.0, 2.0 * math.log(num_nodes) / num_nodes)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"erdos_renyi: p must be in (0, 1], got {p}")
    rng = np.random.default_rng(seed)
    upper = np.triu(np.ones((num_nodes, num_nodes), dtype=bool), k=1)
    for _ in range(max_tries):
        draw = (rng.random((num_nodes, num_nodes)) < p) & upper
        adjacency = torch.from_numpy(draw | draw.T)
        if is_connected(adjacency):
            return Topology("erdos_renyi", (adjacency,))
    raise ValueError(f"erdos_renyi: no connected graph with n={num_nodes}, p={p} in "
                     f"{max_tries} tries; raise p above ln(n)/n = "
                     f"{math.log(num_nodes) / num_nodes:.3f}")


def one_peer_exponential(num_nodes: int) -> Topology:
    """Time-varying one-peer exponential graph (Ying et al., "Exponential Graph is Provably
    Efficient for Decentralized Deep Training", NeurIPS 2021, arXiv 2110.13363).

    At step t node i mixes in only node ``(i + 2^(t mod tau)) mod n``, tau = ceil(log2 n):
    a directed graph with in- and out-degree 1. With the uniform rule each step's matrix
    is ``W_ii = W_i,i+2^k = 1/2``, and for n a power of two the product of tau
    consecutive matrices is exactly ``11^T / n`` (exact averaging in one period).
    """
    _check_nodes("one_peer_exponential", num_nodes, 2)
    period = math.ceil(math.log2(num_nodes))
    nodes = torch.arange(num_nodes)
    adjacencies = []
    for k in range(period):
        adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
        adjacency[nodes, (nodes + 2**k) % num_nodes] = True
        adjacencies.append(adjacency)
    return Topology("one_peer_exponential", tuple(adjacencies))


TOPOLOGIES = {
    "ring": ring,
    "torus": torus,
    "random_regular": random_regular,
    "erdos_renyi": erdos_renyi,
    "fully_connected": fully_connected,
    "one_peer_exponential": one_peer_exponential,
}
_SEEDED = ("random_regular", "erdos_renyi")


def make_topology(name: str, num_nodes: int, seed: int = 0, **kw) -> Topology:
    """Build a topology by name: ``make_topology("random_regular", 50, seed=0, degree=8)``.

    Parameters
    ----------
    name : str
        One of ``TOPOLOGIES``: ring, torus, random_regular, erdos_renyi, fully_connected,
        one_peer_exponential.
    num_nodes : int
        Number of nodes.
    seed : int, default 0
        Seed for the random families (ignored by deterministic ones).
    **kw
        Family parameters: ``rows`` (torus), ``degree`` (random_regular), ``p``
        (erdos_renyi), ``max_tries`` (random families).
    """
    if name not in TOPOLOGIES:
        raise ValueError(f"topology '{name}' is not a topology; known: "
                         f"{', '.join(TOPOLOGIES)}")
    if name in _SEEDED:
        kw["seed"] = seed
    build = TOPOLOGIES[name]
    try:
        inspect.signature(build).bind(num_nodes, **kw)
    except TypeError as err:
        raise ValueError(f"topology '{name}': {err}") from None
    return build(num_nodes, **kw)


def neighbours(topology: Topology, t: int = 0) -> list[list[int]]:
    """For each node i, the sorted list of nodes whose models it mixes in at step ``t``."""
    adjacency = topology.adjacency(t)
    return [torch.nonzero(row).flatten().tolist() for row in adjacency]


def _reach(adjacency: Tensor) -> int:
    seen = {0}
    frontier = deque([0])
    while frontier:
        for j in torch.nonzero(adjacency[frontier.popleft()]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    return len(seen)


def is_connected(adjacency: Tensor) -> bool:
    """True when the graph is (strongly) connected: every node reaches every other
    following edges, and is reached by every other. For undirected graphs this is plain
    connectivity."""
    n = adjacency.shape[0]
    return _reach(adjacency) == n and _reach(adjacency.T) == n


def mixing_matrix(adjacency: Tensor, rule: str = "metropolis",
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Gossip mixing matrix W (n, n): one step maps the stacked models X to W @ X.

    Parameters
    ----------
    adjacency : Tensor
        Boolean (n, n) adjacency without self-loops, ``A[i, j]``: i receives from j.
    rule : {"metropolis", "uniform"}, default "metropolis"
        - ``"metropolis"`` (Metropolis-Hastings): ``W_ij = 1 / (1 + max(d_i, d_j))`` on
          edges, ``W_ii = 1 - sum_{j != i} W_ij``. Symmetric and doubly stochastic on any
          undirected graph; requires a symmetric adjacency.
        - ``"uniform"``: ``W_ij = 1 / (1 + d_i)`` for j in N(i) and j = i. Row
          stochastic always; doubly stochastic on regular graphs, including the directed
          one-peer exponential graph (in- and out-degree 1).
    dtype : torch.dtype, default torch.float64
        dtype of the returned matrix.
    """
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"mixing_matrix: adjacency must be square, got "
                         f"{tuple(adjacency.shape)}")
    adjacency = adjacency.bool()
    if bool(adjacency.diagonal().any()):
        raise ValueError("mixing_matrix: adjacency must have no self-loops")
    degree = adjacency.sum(dim=1).to(dtype)
    if rule == "metropolis":
        if not torch.equal(adjacency, adjacency.T):
            raise ValueError("mixing_matrix: 'metropolis' needs an undirected (symmetric) "
                             "adjacency; use rule='uniform' for directed graphs such as "
                             "one_peer_exponential")
        weights = adjacency.to(dtype) / (1.0 + torch.maximum(degree[:, None], degree[None, :]))
    elif rule == "uniform":
        weights = adjacency.to(dtype) / (1.0 + degree[:, None])
    else:
        raise ValueError(f"mixing_matrix: rule '{rule}' is not a mixing rule; known: "
                         f"metropolis, uniform")
    return weights + torch.diag(1.0 - weights.sum(dim=1))


def neighbour_average_matrix(neighbours: Sequence[Sequence[int]],
                             dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix of ``x_i <- 0.5 x_i + 0.5 mean_{j in N(i)} x_j`` (a node with no
    neighbours keeps its model). Row stochastic; doubly stochastic, hence mean-preserving,
    when the graph is regular."""
    n = len(neighbours)
    W = torch.zeros(n, n, dtype=dtype)
    for i, peers in enumerate(neighbours):
        peers = list(peers)
        if any(not 0 <= j < n or j == i for j in peers):
            raise ValueError(f"neighbour_average: node {i} has neighbours {peers}; they must "
                             f"be other nodes in 0..{n - 1}")
        if peers:
            W[i, i] = 0.5
            W[i, peers] = 0.5 / len(peers)
        else:
            W[i, i] = 1.0
    return W
