"""Expert parallelism simulated from a routing trace: where each expert (and replica) lives,
how much work each device gets, how many bytes the all-to-all moves, and what a capacity
factor drops. numpy only; everything is vectorised over tokens (a 1M-token DeepSeek-V3 trace
is planned in seconds, see bench/bench_plan.py).

Placement strategies, each per MoE layer:

- ``contiguous``: device d holds experts [d*E/N, (d+1)*E/N) (vLLM / SGLang's default expert
  map; when N does not divide E the first E mod N devices hold one more).
- ``round-robin``: expert e on device e mod N.
- ``balanced``: the idea of DeepSeek's Expert Parallelism Load Balancer (EPLB), written here
  with numpy: give the R redundant slots one at a time to the expert with the highest load per
  replica, then pack the E+R physical experts onto devices, heaviest first into the least
  loaded device that still has a free slot (every device holds (E+R)/N). Hierarchical when the
  number of nodes divides ``n_group`` (and R): expert groups are first packed onto nodes by
  load, replication and packing then happen inside each node, so a token's group-limited
  routing (DeepSeek-V3: 4 of 8 groups) stays on few nodes.

Loads are counted on tokens the placement did not see (``--holdout``). The assignments to a
replicated expert go to its replicas in turn, in token order (the i-th to replica i mod
replicas), so each replica gets an equal share.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from moetool.errors import MoetoolError

STRATEGIES = ("contiguous", "round-robin", "balanced")
DTYPE_BYTES = {"bf16": 2, "fp8": 1}


@dataclass
class Placement:
    """Physical expert slots of every MoE layer and the device each slot lives on."""

    name: str
    phys2log: np.ndarray  # [X, P] logical expert held by each physical slot
    phys_device: np.ndarray  # [X, P] device of each physical slot
    logcnt: np.ndarray  # [X, E] replicas of each logical expert
    log2phys: np.ndarray  # [X, E, max replicas] physical slots of each logical expert (-1 = none)

    @property
    def replicated(self) -> bool:
        return bool((self.logcnt > 1).any())

    def slots_per_device(self, devices: int) -> np.ndarray:
        """[X, N] physical experts on each device."""
        X = self.phys_device.shape[0]
        out = np.zeros((X, devices), dtype=np.int64)
        for x in range(X):
            out[x] = np.bincount(self.phys_device[x], minlength=devices)
        return out


# -- the three strategies ----------------------------------------------------------------------------------
def _log2phys(phys2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    X, P = phys2log.shape
    logcnt = np.zeros((X, num_experts), dtype=np.int64)
    for x in range(X):
        logcnt[x] = np.bincount(phys2log[x], minlength=num_experts)
    out = np.full((X, num_experts, max(1, int(logcnt.max()))), -1, dtype=np.int64)
    for x in range(X):
        order = np.argsort(phys2log[x], kind="stable")
        logs = phys2log[x][order]
        starts = np.searchsorted(logs, np.arange(num_experts))
        out[x, logs, np.arange(P) - starts[logs]] = order
    return logcnt, out


def _static(name: str, device_of_expert: np.ndarray, layers: int) -> Placement:
    E = device_of_expert.shape[0]
    phys2log = np.tile(np.arange(E), (layers, 1))
    logcnt, l2p = _log2phys(phys2log, E)
    return Placement(name, phys2log, np.tile(device_of_expert, (layers, 1)), logcnt, l2p)


def contiguous_devices(num_experts: int, devices: int) -> np.ndarray:
    base, extra = divmod(num_experts, devices)
    sizes = np.full(devices, base) + (np.arange(devices) < extra)
    return np.repeat(np.arange(devices), sizes)


def _balanced_packing(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of items -> packs of equal item count, heaviest item first into the lightest pack
    with room. Returns (pack of each item, rank of the item inside its pack), both [X, n]."""
    X, n = weight.shape
    per = n // packs
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_w = np.zeros((X, packs))
    pack_n = np.zeros((X, packs), dtype=np.int64)
    pack_index = np.zeros((X, n), dtype=np.int64)
    rank = np.zeros((X, n), dtype=np.int64)
    rows = np.arange(X)
    for j in range(n):
        item = order[:, j]
        p = np.argmin(np.where(pack_n < per, pack_w, np.inf), axis=1)
        pack_index[rows, item] = p
        rank[rows, item] = pack_n[rows, p]
        pack_w[rows, p] += weight[rows, item]
        pack_n[rows, p] += 1
    return pack_index, rank


def _replicate(weight: np.ndarray, physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Give physical - n extra slots, one at a time, to the expert with the highest load per
    replica. Returns (logical expert of each physical slot [X, physical], replicas [X, n])."""
    X, n = weight.shape
    phys2log = np.zeros((X, physical), dtype=np.int64)
    phys2log[:, :n] = np.arange(n)
    logcnt = np.ones((X, n), dtype=np.int64)
    rows = np.arange(X)
    for i in range(n, physical):
        best = np.argmax(weight / logcnt, axis=1)
        phys2log[:, i] = best
        logcnt[rows, best] += 1
    return phys2log, logcnt


def balanced(load: np.ndarray, physical: int, groups: int, nodes: int, devices: int) -> Placement:
    """EPLB-style placement from per-layer expert loads [X, E] (see the module docstring)."""
    X, E = load.shape
    load = load.astype(np.float64) + 1e-9  # unseen experts still get a place, in index order
    group_size = E // groups
    per_dev = physical // devices
    # 1. expert groups onto nodes, heaviest group first into the lightest node
    gpack, grank = _balanced_packing(load.reshape(X, groups, group_size).sum(-1), nodes)
    groups_per_node = groups // nodes
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[:, :, None] + np.arange(group_size)).reshape(X, E)
    mlog2log = np.argsort(log2mlog, axis=1)
    # 2. replicas inside each node
    per_node_log, per_node_phys = E // nodes, physical // nodes
    node_load = np.take_along_axis(load, mlog2log, 1).reshape(X * nodes, per_node_log)
    phy2mlog, mlogcnt = _replicate(node_load, per_node_phys)
    # 3. physical experts onto the node's devices
    phy_load = np.take_along_axis(node_load / mlogcnt, phy2mlog, 1)
    pack, rank = _balanced_packing(phy_load, devices // nodes)
    pphy2phy = np.argsort(pack * per_dev + rank, axis=1)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)
    pphy2mlog = pphy2mlog.reshape(X, nodes, -1) + (np.arange(nodes) * per_node_log)[None, :, None]
    pphy2mlog = pphy2mlog.reshape(X, physical)
    phys2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    phys_device = np.tile(np.arange(physical) // per_dev, (X, 1))
    logcnt, l2p = _log2phys(phys2log, E)
    return Placement("balanced", phys2log, phys_device, logcnt, l2p)


def check_ep(num_experts: int, devices: int, nodes: int, redundant: int) -> None:
    if devices < 1:
        raise MoetoolError("--ep must be at least 1 device")
    if nodes < 1 or devices % nodes:
        raise MoetoolError(f"--nodes {nodes}: the {devices} EP devices must split evenly over the nodes")
    if redundant < 0:
        raise MoetoolError("--redundant must be 0 or more")
    if devices > num_experts + redundant:
        raise MoetoolError(f"--ep {devices}: more devices than the {num_experts} experts + {redundant} redundant "
                           "replicas to put on them")
    physical = num_experts + redundant
    if physical % devices:
        ok = [r for r in range(0, redundant + 2 * devices) if (num_experts + r) % devices == 0]
        fix = sorted(sorted(ok, key=lambda r: abs(r - redundant))[:2])
        raise MoetoolError(f"{num_experts} experts + {redundant} redundant = {physical} physical experts do not split "
                           f"evenly over {devices} devices; try --redundant {' or '.join(map(str, fix))}")


def placements(fit_load: np.ndarray, devices: int, nodes: int, redundant: int, groups: int) -> tuple[dict, bool]:
    """The three strategies for per-layer loads [X, E]; returns ({name: Placement}, hierarchical)."""
    X, E = fit_load.shape
    groups = groups if groups and E % groups == 0 else 1
    hierarchical = groups % nodes == 0 and redundant % nodes == 0
    out = {
        "contiguous": _static("contiguous", contiguous_devices(E, devices), X),
        "round-robin": _static("round-robin", np.arange(E) % devices, X),
        "balanced": balanced(fit_load, E + redundant, groups if hierarchical else 1, nodes if hierarchical else 1,
                             devices),
    }
    return out, hierarchical


# -- simulation --------------------------------------------------------------------------------------------
def device_loads(placement: Placement, x: int, counts: np.ndarray, devices: int) -> np.ndarray:
    """Token-expert assignments per device of layer x from the expert counts [E]: the
    assignments to a replicated expert go to its replicas in turn (the i-th to replica
    i mod replicas), so each replica gets an equal share, the first ones one more."""
    cnt = placement.logcnt[x]
    l2p = placement.log2phys[x]
    counts = counts.astype(np.int64)
    share = counts[:, None] // cnt[:, None] + (np.arange(l2p.shape[1])[None, :] < (counts % cnt)[:, None])
    valid = l2p >= 0
    return np.bincount(placement.phys_device[x][l2p[valid]], weights=share[valid], minlength=devices).astype(np.int64)


def token_devices(placement: Placement, x: int, ids_t: np.ndarray) -> np.ndarray:
    """Device of each (choice, token) of layer x, for ids_t [k, T] (choices by row), with the
    replica rule of ``device_loads``: the assignments to a replicated expert, counted token by
    token, go to its replicas in turn."""
    table = placement.phys_device[x][placement.log2phys[x, :, 0]].astype(np.int32)
    if not placement.replicated:
        return np.take(table, ids_t)
    flat = np.ascontiguousarray(ids_t.T).ravel()  # token by token
    dev = np.take(table, flat)
    turn = np.arange(flat.shape[0], dtype=np.int32)
    for e in np.flatnonzero(placement.logcnt[x] > 1):
        where = np.flatnonzero(flat == e)
        c = int(placement.logcnt[x, e])
        replicas = placement.phys_device[x][placement.log2phys[x, e, :c]].astype(np.int32)
        dev[where] = np.take(replicas, turn[:where.shape[0]] % c)
    return np.ascontiguousarray(dev.reshape(ids_t.shape[1], ids_t.shape[0]).T)


def distinct_counts(index_t: np.ndarray, device_of: np.ndarray, devices: int,
                    nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct devices, distinct nodes) of each token, for index_t [k, T] of indices into
    DEVICE_OF (expert ids with a device per expert, or devices with ``arange``); device d is on
    node d // (devices / nodes)."""
    k, T = index_t.shape
    per_node = devices // nodes
    if devices <= 64 and k:
        dtype = np.uint32 if devices <= 32 else np.uint64
        bits = np.left_shift(dtype(1), device_of.astype(dtype))  # one bit per device, looked up per index
        mask = np.take(bits, index_t[0])
        for j in range(1, k):
            mask |= np.take(bits, index_t[j])
        n_dev = np.bitwise_count(mask)
        if nodes == 1:
            return n_dev, np.ones(T, dtype=np.uint8)
        node_bits = dtype((1 << per_node) - 1)
        n_node = np.zeros(T, dtype=np.uint8)
        for n in range(nodes):
            n_node += ((mask >> dtype(n * per_node)) & node_bits) != 0
        return n_dev, n_node
    rows = np.sort(np.take(device_of, index_t.T), axis=1)
    n_dev = 1 + (np.diff(rows, axis=1) != 0).sum(axis=1)
    return n_dev, 1 + (np.diff(rows // per_node, axis=1) != 0).sum(axis=1)


def layer_loads(placement: Placement, layer_counts: list[np.ndarray], devices: int) -> np.ndarray:
    """[X, N] device loads from per-layer expert counts."""
    return np.stack([device_loads(placement, x, c, devices) for x, c in enumerate(layer_counts)])


def all_to_all(placement: Placement, layer_ids_t: list[np.ndarray], devices: int, nodes: int) -> dict:
    """Mean number of devices, and of nodes, each token is sent to per MoE layer
    (LAYER_IDS_T: one [k, T] array per MoE layer, in placement row order)."""
    copies, node_copies = [], []
    for x, ids_t in enumerate(layer_ids_t):
        T = ids_t.shape[1]
        if T == 0:
            copies.append(0.0)
            node_copies.append(0.0)
            continue
        if placement.replicated:
            n_dev, n_node = distinct_counts(token_devices(placement, x, ids_t), np.arange(devices), devices, nodes)
        else:
            n_dev, n_node = distinct_counts(ids_t, placement.phys_device[x][placement.log2phys[x, :, 0]], devices,
                                            nodes)
        copies.append(float(n_dev.sum(dtype=np.int64)) / T)
        node_copies.append(float(n_node.sum(dtype=np.int64)) / T)
    return {"copies": np.array(copies), "node_copies": np.array(node_copies)}


def imbalance(loads: np.ndarray) -> np.ndarray:
    """max / mean device load of each layer (rows of [X, N]); nan where a layer has no load."""
    total = loads.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, loads.max(axis=1) / (total / loads.shape[1]), np.nan)


# -- capacity ----------------------------------------------------------------------------------------------
def _ceil_capacity(factor: Fraction, tokens: np.ndarray, k: int, E: int) -> np.ndarray:
    num = factor.numerator * tokens.astype(np.int64) * k
    den = factor.denominator * E
    return -(-num // den)


def parse_factor(text: str) -> Fraction:
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise MoetoolError(f"--capacity-factor: '{text}' is not a number") from None
    if value <= 0:
        raise MoetoolError(f"--capacity-factor: {text} must be more than 0")
    return value


def sequence_counts(layer_ids: dict[int, np.ndarray], sequence: np.ndarray, E: int, force: bool = False,
                    zero: int = 0):
    """(sequence ids [S], tokens per sequence [S], {layer: expert counts per sequence [S, E]}),
    or None when S x E is much larger than the trace itself (many tiny sequences) and not FORCE.
    ZERO: zero-computation experts (ids E .. E + ZERO - 1), counted apart and left out."""
    seqs, seq_idx, seq_len = np.unique(sequence, return_inverse=True, return_counts=True)
    S, W = seqs.shape[0], E + zero
    if not force and S * W > max(4 * sequence.shape[0], 1 << 22):
        return None
    key_dtype = np.int32 if S * W < 2**31 else np.int64
    offset = (seq_idx.astype(key_dtype) * W)[:, None]
    counts = {L: np.bincount((offset + ids).ravel(), minlength=S * W).reshape(S, W)[:, :E]
              for L, ids in layer_ids.items()}
    return seqs, seq_len, counts


def capacity_drops(layer_ids: dict[int, np.ndarray], sequence: np.ndarray, E: int, k: int, factors: list[str],
                   seq_counts=None, zero: int = 0) -> dict:
    """Share of token-expert assignments dropped per layer when each expert takes at most
    ceil(C x tokens x k / E) of them: ``batch`` = all traced tokens as one batch, ``sequence``
    = each sequence on its own (its own token count). SEQ_COUNTS: ``sequence_counts`` of the
    trace, if already counted."""
    _, seq_len, counts = seq_counts or sequence_counts(layer_ids, sequence, E, force=True, zero=zero)
    T = sequence.shape[0]
    per_layer_counts = {L: (c.sum(axis=0), c) for L, c in counts.items()}
    out = {}
    for text in factors:
        factor = parse_factor(text)
        cap_batch = int(_ceil_capacity(factor, np.array([T]), k, E)[0])
        cap_seq = _ceil_capacity(factor, seq_len, k, E)[:, None]
        rows = []
        tot_b = tot_s = 0
        for L, (batch, seq) in per_layer_counts.items():
            db = int(np.maximum(batch - cap_batch, 0).sum())
            ds = int(np.maximum(seq - cap_seq, 0).sum())
            tot_b += db
            tot_s += ds
            rows.append({"layer": int(L), "batch": db / (T * k) if T else 0.0, "sequence": ds / (T * k) if T else 0.0})
        n = len(rows) * T * k
        out[text] = {
            "batch": tot_b / n if n else 0.0,
            "sequence": tot_s / n if n else 0.0,
            "batch_capacity": cap_batch,
            "worst_layer": max(rows, key=lambda r: r["batch"])["layer"] if rows else None,
            "per_layer": rows,
        }
    return out


# -- synthetic traces (tests, benchmarks, docs) ------------------------------------------------------------
def synthetic_trace(rc, tokens: int, seq_len: int = 256, skew: float = 0.3, seed: int = 0, model: str = "synthetic",
                    pool: int = 65536):
    """A routing trace in the moetool trace format with skewed, stable expert popularity:
    per MoE layer a Dirichlet(``skew``) popularity over the experts (smaller = more skewed),
    each token choosing top_k distinct experts with those probabilities. Sequences of
    ``seq_len`` tokens. Beyond ``pool`` tokens, tokens reuse the routings of a pool of that
    many tokens drawn this way (drawing distinct experts is the slow part)."""
    from moetool.analysis.trace import Trace

    rng = np.random.default_rng(seed)
    E, k = int(rc.num_experts), int(rc.top_k)
    id_dtype = np.uint8 if E <= 256 else np.int16
    experts, weights = {}, {}
    w = rng.random((tokens, k)).astype(np.float32) + 0.1
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float16)  # routing weights: not used by plan, shared
    for L in rc.moe_layers:
        p = rng.dirichlet(np.full(E, skew))
        p = np.maximum(p, 1e-6)
        p /= p.sum()
        n = min(tokens, pool)
        ids = rng.choice(E, size=(n, k), p=p)
        for _ in range(200):  # redraw repeated experts within a token until every row is distinct
            s = np.sort(ids, axis=1)
            dup_rows = np.flatnonzero((np.diff(s, axis=1) == 0).any(axis=1))
            if dup_rows.size == 0:
                break
            ids[dup_rows] = rng.choice(E, size=(dup_rows.size, k), p=p)
        if n < tokens:
            ids = ids[rng.integers(0, n, tokens)]
        experts[L] = ids.astype(id_dtype)
        weights[L] = w
    seq = (np.arange(tokens) // seq_len).astype(np.int32)
    pos = (np.arange(tokens) % seq_len).astype(np.int32)
    n_seq = int(seq[-1]) + 1 if tokens else 0
    meta = {"model": model, "family": rc.family.name, "num_experts": E, "top_k": k, "num_layers": int(rc.num_layers),
            "moe_layers": [int(L) for L in rc.moe_layers], "texts": [f"synthetic sequence {i}" for i in range(n_seq)],
            "quantization": "none", "weight_bytes": 0, "expert_weight_bytes": 0, "dtype": "bfloat16",
            "routing": "synthetic", "created_by": f"moetool.analysis.plan_ep.synthetic_trace(skew={skew}, seed={seed})"}
    return Trace(rng.integers(0, max(int(rc.vocab_size), 1), tokens).astype(np.int32), seq, pos,
                 np.zeros(tokens, dtype=np.uint8), experts, weights, {}, meta)
