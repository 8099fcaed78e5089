"""Expert placement (MoETuner, seed 002): which rank holds which expert of every MoE layer,
solved from a routing trace (:mod:`divmoe.parallel.traces`) as an integer program.

Traffic models (rows of ``d_model`` values of ``dtype_bytes`` each; a row that stays on its
rank costs nothing; N ranks, every rank holding E/N experts of every layer):

- ``origin`` — what :class:`~divmoe.parallel.ExpertParallel` does in training (as Megatron,
  DeepSpeed and torchtitan do): a token lives on the data-parallel rank that holds its
  sequence; at every layer each routed slot's row goes to its expert's rank and the output
  comes back. With sequences spread over ranks independently of routing, a slot leaves its
  rank with probability (N−1)/N, so the bytes are ``2·slots·(N−1)/N`` rows per token over
  the layers *whatever the placement*; the placement only decides how many rows each rank
  receives (its load), and the slowest rank sets the pace.
- ``follow`` — MoETuner's model (expert-resident tokens, as in its serving setting): a
  token's hidden state after layer l lives on the rank of its home expert at l (its first
  slot, :mod:`divmoe.parallel.traces`), where its outputs are combined. Entering the first
  MoE layer costs the ``origin`` dispatch, (N−1)/N per slot; after that a row crosses when a
  slot's expert at l+1 sits on another rank than the home at l (``next`` counts), and when
  one of a token's other slots at l sits on another rank than its home at l (the output
  comes back for the combine; ``within`` counts). This is the traffic the placement can cut.

The integer program (x binary, y and M continuous):

    x[l,e,r] = 1  ⇔  expert e of layer l is on rank r
    Σ_r x[l,e,r] = 1                     every expert on one rank
    Σ_e x[l,e,r] = E/N                   every rank holds E/N experts of every layer
    M_l ≥ Σ_e load[l,e]·x[l,e,r]   ∀r    M_l: the most-loaded rank's slots at layer l
    y_ab ≥ x[a,r] − x[b,r]         ∀r    y_ab = 1 when the pair (a, b) of (layer, expert)
                                          nodes is split (exact at the optimum: w_ab > 0)
    minimise  (1/L) Σ_l M_l / mean_l  +  traffic_weight · Σ_ab w_ab·y_ab / Σ_ab w_ab

with mean_l = Σ_e load[l,e] / N and w the ``next`` and ``within`` counts: the mean over
layers of the max/mean rank load (≥ 1) plus the weighted share of ``follow`` pair traffic
that crosses ranks (0..1). Renaming ranks changes nothing, so ranks are numbered in order of
first use by the first layer's experts (heaviest first). ``scipy.optimize.milp`` (HiGHS) solves it
within a time limit; when it is larger than ``max_variables``, scipy is missing, or HiGHS
stops without a solution, a greedy construction plus pairwise swaps within each layer
(:func:`greedy`) gives the placement instead; when HiGHS stops at the time limit with a
solution, the better of it and the greedy one is kept. ``placement.method`` says which.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..files import atomic_write_text
from .expert_parallel import check_placement
from .traces import RoutingTrace

FORMAT = "divmoe.placement/1"
MAX_VARIABLES = 20000  # beyond this the MILP is left to the greedy solver


@dataclass
class Placement:
    """``experts_by_rank[block][r]``: the global expert ids rank r holds in that MoE block."""
    ranks: int
    num_experts: int
    experts_by_rank: dict[int, list[list[int]]]
    method: str = ""
    info: dict = field(default_factory=dict)

    def rank_of(self, layers: list[int]) -> np.ndarray:
        """[L, E]: the rank of every expert, layers in the order of ``layers``."""
        out = np.empty((len(layers), self.num_experts), dtype=np.int64)
        for li, b in enumerate(layers):
            for r, ids in enumerate(self.experts_by_rank[b]):
                out[li, ids] = r
        return out

    @classmethod
    def from_ranks(cls, rank_LE: np.ndarray, layers: list[int], ranks: int,
                   method: str = "", info: dict | None = None) -> "Placement":
        by_rank = {b: [np.flatnonzero(rank_LE[li] == r).tolist() for r in range(ranks)]
                   for li, b in enumerate(layers)}
        return cls(ranks, rank_LE.shape[1], by_rank, method, info or {})

    def to_json(self) -> dict:
        return {"format": FORMAT, "ranks": self.ranks, "num_experts": self.num_experts,
                "method": self.method, **({"info": self.info} if self.info else {}),
                "layers": {str(b): ids for b, ids in sorted(self.experts_by_rank.items())}}

    def save(self, path: str | Path) -> None:
        """Write the JSON file, one line per MoE block (its experts_by_rank lists)."""
        obj = self.to_json()
        layers = obj.pop("layers")
        head = json.dumps(obj, indent=1)[:-2]
        body = ",\n".join(f"  {json.dumps(b)}: {json.dumps(ids)}" for b, ids in layers.items())
        atomic_write_text(path, f"{head},\n \"layers\": {{\n{body}\n }}\n}}\n")

    def check_run(self, moe_layers: list[int], num_experts: int, ranks: int, where: str) -> None:
        """Refuse a placement made for another run layout (ranks, experts or MoE layers)."""
        if self.ranks != ranks:
            raise ConfigError(f"{where} places experts on {self.ranks} ranks, but this run "
                              f"shards them over parallel.expert={ranks}; run divmoe place "
                              f"--ranks {ranks}")
        if self.num_experts != num_experts:
            raise ConfigError(f"{where} is for {self.num_experts} experts per layer, but this "
                              f"run has moe.num_experts={num_experts}")
        if sorted(self.experts_by_rank) != sorted(moe_layers):
            raise ConfigError(f"{where} places the MoE blocks {sorted(self.experts_by_rank)}, "
                              f"but this run's MoE blocks are {sorted(moe_layers)}")


def load_placement(path: str | Path) -> Placement:
    """Read and validate a ``placement.json`` (errors name the file and what is wrong)."""
    where = str(path)
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"placement file {where} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"placement file {where} is not readable JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a placement file (expected a JSON object with "
                          f"\"format\": \"{FORMAT}\", as divmoe place writes)")
    ranks, E, layers = obj.get("ranks"), obj.get("num_experts"), obj.get("layers")
    for name, v in (("ranks", ranks), ("num_experts", E)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: {name} must be an integer >= 1, got {v!r}")
    if not isinstance(layers, dict) or not layers:
        raise ConfigError(f"{where}: layers must map MoE block indices to experts_by_rank lists")
    by_rank = {}
    for key, ids in layers.items():
        if not key.isdigit():
            raise ConfigError(f"{where}: layer key {key!r} is not a block index")
        if not (isinstance(ids, list) and all(isinstance(r, list) and all(
                isinstance(e, int) and not isinstance(e, bool) for e in r) for r in ids)):
            raise ConfigError(f"{where}: layer {key} must be a list (one per rank) of lists of "
                              f"expert ids")
        try:
            check_placement(ids, E, ranks)
        except ConfigError as exc:
            raise ConfigError(f"{where}: layer {key}: {exc}") from None
        by_rank[int(key)] = ids
    return Placement(ranks, E, by_rank, str(obj.get("method", "")), obj.get("info") or {})


def contiguous(trace: RoutingTrace, ranks: int) -> Placement:
    """divmoe's default: experts [r·E/N, (r+1)·E/N) on rank r."""
    _check_ranks(trace, ranks)
    e = np.arange(trace.num_experts)
    return Placement.from_ranks(np.tile(e // (trace.num_experts // ranks), (trace.num_layers, 1)),
                                trace.layers, ranks, "contiguous")


def round_robin(trace: RoutingTrace, ranks: int) -> Placement:
    """Expert e on rank e mod N."""
    _check_ranks(trace, ranks)
    e = np.arange(trace.num_experts)
    return Placement.from_ranks(np.tile(e % ranks, (trace.num_layers, 1)), trace.layers, ranks,
                                "round-robin")


def _check_ranks(trace: RoutingTrace, ranks: int) -> None:
    if ranks < 1 or trace.num_experts % ranks:
        raise ConfigError(f"--ranks {ranks}: each rank holds num_experts/ranks experts, so the "
                          f"ranks must divide the trace's {trace.num_experts} experts")


@dataclass
class _Edges:
    """The ``follow`` pair traffic as edges between (layer, expert) nodes l·E + e."""
    a: np.ndarray
    b: np.ndarray
    w: np.ndarray

    @classmethod
    def of(cls, trace: RoutingTrace) -> "_Edges":
        E, L = trace.num_experts, trace.num_layers
        i, j = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
        parts = []
        for l in range(L - 1):
            parts.append((l * E + i, (l + 1) * E + j, trace.next_PEE[l]))
        for l in range(L):
            sym = trace.within_LEE[l] + trace.within_LEE[l].T  # one edge per unordered pair
            upper = i < j
            parts.append((l * E + i[upper], l * E + j[upper], sym[upper]))
        a, b, w = (np.concatenate([p[k].reshape(-1) for p in parts]) for k in range(3))
        keep = w > 0
        return cls(a[keep], b[keep], w[keep])


@dataclass
class Cost:
    """What a placement costs on a trace (per token: over all its MoE layers, forward)."""
    imbalance: float            # mean over layers of max/mean per-rank load
    worst_imbalance: float      # the worst layer's max/mean
    follow_rows: float          # ``follow`` model: rows crossing ranks per token
    origin_rows: float          # ``origin`` model: the same for every placement
    row_bytes: int
    cut_share: float            # share of ``follow`` pair traffic that crosses ranks
    objective: float

    @property
    def follow_bytes(self) -> float:
        return self.follow_rows * self.row_bytes

    @property
    def origin_bytes(self) -> float:
        return self.origin_rows * self.row_bytes


def rank_loads(trace: RoutingTrace, rank_LE: np.ndarray, ranks: int) -> np.ndarray:
    """[L, N]: routed slots each rank receives at every layer."""
    return np.stack([np.bincount(rank_LE[l], weights=trace.load_LE[l], minlength=ranks)
                     for l in range(trace.num_layers)])


def cost(trace: RoutingTrace, placement: Placement, dtype_bytes: int = 4,
         traffic_weight: float = 1.0) -> Cost:
    rank_LE = placement.rank_of(trace.layers)
    return _cost(trace, rank_LE, placement.ranks, _Edges.of(trace), dtype_bytes, traffic_weight)


def _cost(trace, rank_LE, ranks, edges, dtype_bytes=4, traffic_weight=1.0) -> Cost:
    loads = rank_loads(trace, rank_LE, ranks)
    mean = np.maximum(loads.sum(1) / ranks, 1e-12)
    ratio = loads.max(1) / mean
    flat = rank_LE.reshape(-1)
    cut = float(edges.w[flat[edges.a] != flat[edges.b]].sum())
    total = float(edges.w.sum())
    share = cut / total if total else 0.0
    leave = (ranks - 1) / ranks
    T = max(trace.tokens, 1)
    entry = trace.load_LE[0].sum() * leave if trace.num_layers else 0.0
    return Cost(imbalance=float(ratio.mean()), worst_imbalance=float(ratio.max()),
                follow_rows=float((entry + cut) / T),
                origin_rows=float(2 * trace.load_LE.sum() * leave / T),
                row_bytes=trace.d_model * dtype_bytes, cut_share=share,
                objective=float(ratio.mean()) + traffic_weight * share)


def solve(trace: RoutingTrace, ranks: int, time_limit: float = 30.0,
          traffic_weight: float = 1.0, max_variables: int = MAX_VARIABLES) -> Placement:
    """The placement minimising the module's objective: the MILP when it fits, else greedy.
    ``placement.method`` says which one produced it and ``placement.info`` why."""
    _check_ranks(trace, ranks)
    if traffic_weight < 0:
        raise ConfigError(f"traffic_weight must be >= 0, got {traffic_weight}")
    edges = _Edges.of(trace)
    n_vars = trace.num_layers * trace.num_experts * ranks + len(edges.w) + trace.num_layers
    if n_vars > max_variables:
        return _greedy(trace, ranks, edges, traffic_weight, time_limit,
                       f"the MILP has {n_vars} variables (> {max_variables})")
    if importlib.util.find_spec("scipy") is None:  # scipy is the optional `placement` extra
        return _greedy(trace, ranks, edges, traffic_weight, time_limit,
                       "scipy is not installed (pip install 'divmoe[placement]')")
    return _milp(trace, ranks, edges, traffic_weight, time_limit)


def _milp(trace, ranks, edges, traffic_weight, time_limit) -> Placement:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    L, E, N = trace.num_layers, trace.num_experts, ranks
    nx, ny = L * E * N, len(edges.w)

    def xi(l, e, r):
        return (l * E + e) * N + r

    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(coefs: list[tuple[int, float]], low: float, high: float):
        row = len(lo)
        for c, v in coefs:
            rows.append(row)
            cols.append(c)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    for l in range(L):
        for e in range(E):
            add([(xi(l, e, r), 1.0) for r in range(N)], 1, 1)
        for r in range(N):
            add([(xi(l, e, r), 1.0) for e in range(E)], E // N, E // N)
            add([(nx + ny + l, 1.0)] + [(xi(l, e, r), -trace.load_LE[l, e]) for e in range(E)],
                0, np.inf)
    for k, (a, b) in enumerate(zip(edges.a, edges.b)):
        for r in range(N):  # y_ab − x_ar + x_br ≥ 0
            add([(nx + k, 1.0), (int(a) * N + r, -1.0), (int(b) * N + r, 1.0)], 0, np.inf)

    mean_L = np.maximum(trace.load_LE.sum(1) / N, 1e-12)
    total = float(edges.w.sum())
    c = np.concatenate([np.zeros(nx),
                        traffic_weight * edges.w / total if total else np.zeros(ny),
                        1.0 / (L * mean_L)])
    A = coo_matrix((vals, (rows, cols)), shape=(len(lo), nx + ny + L)).tocsr()
    integrality = np.concatenate([np.ones(nx), np.zeros(ny + L)])
    upper = np.concatenate([np.ones(nx + ny), np.full(L, np.inf)])
    # Renaming ranks changes nothing: name them in order of first use by the first layer's
    # experts, heaviest first, so its i-th heaviest expert is on one of the ranks 0..i.
    for i, e in enumerate(np.argsort(-trace.load_LE[0], kind="stable")):
        upper[[xi(0, int(e), r) for r in range(i + 1, N)]] = 0
    bounds = Bounds(np.zeros(nx + ny + L), upper)
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality,
               bounds=bounds, options={"time_limit": float(time_limit), "disp": False})
    info = {"solver": "scipy.optimize.milp (HiGHS)", "variables": nx + ny + L,
            "constraints": len(lo), "milp_time_s": round(time.perf_counter() - t0, 3),
            "status": res.message}
    if res.x is None:
        return _greedy(trace, ranks, edges, traffic_weight, time_limit,
                       f"HiGHS found no solution within {time_limit} s ({res.message})")
    rank_LE = res.x[:nx].reshape(L, E, N).argmax(2)
    if res.status == 0:
        return Placement.from_ranks(rank_LE, trace.layers, N, "milp (optimal)", info)
    if getattr(res, "mip_gap", None) is not None:
        info["mip_gap"] = float(res.mip_gap)
    # Stopped early: HiGHS's best may be worse than the greedy placement; keep the better.
    fallback = _greedy(trace, ranks, edges, traffic_weight, time_limit, "compared with the MILP")
    obj = _cost(trace, rank_LE, N, edges, traffic_weight=traffic_weight).objective
    obj_greedy = _cost(trace, fallback.rank_of(trace.layers), N, edges,
                       traffic_weight=traffic_weight).objective
    info.update(milp_objective=obj, greedy_objective=obj_greedy)
    if obj_greedy < obj:
        return Placement.from_ranks(fallback.rank_of(trace.layers), trace.layers, N,
                                    "greedy (better than the MILP's best at the time limit)", info)
    return Placement.from_ranks(rank_LE, trace.layers, N, "milp (time limit: best found)", info)


def greedy(trace: RoutingTrace, ranks: int, traffic_weight: float = 1.0,
           time_limit: float = 30.0) -> Placement:
    """The fallback: layer by layer, experts in decreasing load, each onto the rank with room
    that adds the least to the objective (its load on that rank against the pair traffic it
    keeps local with the experts placed so far); then pairwise swaps of experts of one layer
    on different ranks while one lowers the objective and ``time_limit`` allows."""
    _check_ranks(trace, ranks)
    return _greedy(trace, ranks, _Edges.of(trace), traffic_weight, time_limit, "asked for")


def _greedy(trace, ranks, edges, traffic_weight, time_limit, why) -> Placement:
    t0 = time.perf_counter()
    L, E, N = trace.num_layers, trace.num_experts, ranks
    per_rank = E // N
    total = float(edges.w.sum()) or 1.0
    # Dense symmetric affinity between nodes (only pairs with traffic are nonzero).
    nodes = L * E
    W = np.zeros((nodes, nodes))
    np.add.at(W, (edges.a, edges.b), edges.w)
    W = W + W.T
    rank_of = np.full(nodes, -1, dtype=np.int64)
    for l in range(L):
        mean = max(trace.load_LE[l].sum() / N, 1e-12)
        load_r = np.zeros(N)
        room = np.full(N, per_rank)
        for e in np.argsort(-trace.load_LE[l], kind="stable"):
            node = l * E + e
            placed = rank_of >= 0
            keep_local = np.bincount(rank_of[placed], weights=W[node, placed], minlength=N)
            score = ((load_r + trace.load_LE[l, e]) / (mean * L)
                     - traffic_weight * keep_local / total)
            score[room == 0] = np.inf
            r = int(np.argmin(score))
            rank_of[node] = r
            load_r[r] += trace.load_LE[l, e]
            room[r] -= 1
    rank_LE = rank_of.reshape(L, E)
    best = _cost(trace, rank_LE, N, edges, traffic_weight=traffic_weight).objective
    swaps, improved = 0, N > 1
    while improved and time.perf_counter() - t0 < time_limit:
        improved = False
        for l in range(L):
            for e1 in range(E):
                for e2 in range(e1 + 1, E):
                    if rank_LE[l, e1] == rank_LE[l, e2]:
                        continue
                    rank_LE[l, [e1, e2]] = rank_LE[l, [e2, e1]]
                    obj = _cost(trace, rank_LE, N, edges, traffic_weight=traffic_weight).objective
                    if obj < best - 1e-12:
                        best, improved, swaps = obj, True, swaps + 1
                    else:
                        rank_LE[l, [e1, e2]] = rank_LE[l, [e2, e1]]
                if time.perf_counter() - t0 >= time_limit:
                    break
    info = {"solver": "greedy + pairwise swaps", "why": why, "swaps": swaps,
            "time_s": round(time.perf_counter() - t0, 3)}
    return Placement.from_ranks(rank_LE, trace.layers, N, "greedy", info)
