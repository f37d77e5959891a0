"""Healing a pruned or merged MoE checkpoint against its original, layer by layer.

After experts are removed or merged the router still scores for the old expert set and the
surviving experts still produce the outputs they were trained to add to their old partners',
so each MoE block's output drifts from the original's. Healing repairs, per MoE layer in
order, what compression left mismatched, from calibration text only (no backpropagation
through the model):

1. **Inputs and target.** X = the hidden states that reach the block *in the compressed model
   so far* (earlier layers already healed, so their errors are corrected here rather than
   compounded); target Y = the ORIGINAL block's output on those same X. Every k-th token
   (``holdout``, 10%) is kept out of the fit and decides step 5.
2. **Router rows** (and a router bias where the family has one, gpt-oss) by a few L-BFGS
   steps on the block's output error, mean ||block(X) - Y||^2, plus a ridge pulling the rows
   towards their current values (scaled so that moving the rows by their own norm costs
   ``router_reg`` times the initial error). The routing weights are differentiable in the
   rows; which experts are chosen is not, and changes only as a side effect of the weights.
   Router buffers that act on the choice alone (DeepSeek's ``e_score_correction_bias``) have
   no gradient: an optional coordinate search (``selection_rounds``) moves them where that
   lowers the error.
3. **Down projections** in closed form, given the (new) routing. With the routing weights
   w_tk and every expert's intermediate activations a_e(x) = act(gate x) * up x fixed, the
   block's output, sum_k w_tk (D_e a_e(x_t) + b_e) + s_t S a_s(x_t) (a shared expert S with
   its per-token factor s_t: 1, or a sigmoid gate), is linear in the down matrices D_e, S (and
   biases), so fitting them to Y is least squares: the shared expert, which sees every token,
   can take over what the removed experts did. It is solved exactly: jointly when the system
   is small, else per matrix given the others, swept (block Gauss-Seidel) until the error stops
   falling; each matrix has a ridge towards its current value, lambda = ``ridge`` x the mean
   eigenvalue of its Gram matrix, so experts that see few tokens barely move.
4. **All routed-expert weights** by L-BFGS with the routing fixed (ridge ``experts_reg``), then
   step 3 again.
5. A layer whose healed block does worse on the held-out calibration tokens than before is
   restored.

Attention, norms, embeddings and the shared experts' other weights are never changed.

The driver (:func:`heal_models`) is an observer on moetool's executor in layerwise mode
(``HealObserver``): every decoder layer runs over all calibration batches with exactly the
arguments the model's own forward passes it (per-layer-type attention masks, position
embeddings), the MoE block's inputs are collected, and at the layer's end the block is healed
and the layer's outputs recomputed before the next layer runs. Either model may be streamed
(moetool.runtime.streaming): the compressed model's layer is in memory while the executor runs
it, the original's is read for its targets (``layer_in_memory``), and each healed layer's
changed tensors go to a :class:`LayerStore` (on disk beside the output when streamed), so a
model larger than memory heals in one pass over its layers.

The output is an ordinary checkpoint of the same family and expert count: only the changed
tensors (router rows, expert projections, shared down projections) are written anew, every
other tensor is copied byte for byte, atomically like every moetool output, with a model card
and ``moetool.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError
from moetool.runtime.executor import Observer

# transformers 5's fused expert parameters: [E, hidden, inter] or [E, inter, hidden]
DOWN = "down_proj"
DOWN_BIAS = "down_proj_bias"

DEFAULT_RIDGE = 0.1
DEFAULT_ROUTER_STEPS = 10
DEFAULT_ROUTER_REG = 1.0
DEFAULT_EXPERTS_STEPS = 20
DEFAULT_EXPERTS_REG = 1.0
DEFAULT_HOLDOUT = 0.1
CHUNK_TOKENS = 4096


@dataclass
class HealOptions:
    router_steps: int = DEFAULT_ROUTER_STEPS  # L-BFGS iterations on the router rows (0: down projections only)
    router_reg: float = DEFAULT_ROUTER_REG
    ridge: float = DEFAULT_RIDGE  # down projections: ridge towards the current matrices
    sweeps: int = 8  # Gauss-Seidel sweeps over the experts at most
    down: bool = True  # fit the down projections
    experts_steps: int = DEFAULT_EXPERTS_STEPS  # L-BFGS iterations on all routed-expert weights, routing fixed
    experts_reg: float = DEFAULT_EXPERTS_REG
    shared: bool = False  # step 3 also refits what the block has besides routed experts (shared experts)
    shared_down: bool = True  # steps 2 and 3 fit the shared expert's down projection jointly with the routed ones
    selection_rounds: int = 0  # coordinate-search rounds on selection-only router buffers (e_score_correction_bias)
    holdout: float = DEFAULT_HOLDOUT  # fraction of calibration tokens kept out of the fit to decide keep / revert

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- the math: pure functions ------------------------------------------------------------------------------
def fit_down_proj(acts, weights, experts, tokens, target, current, bias=None, ridge: float = DEFAULT_RIDGE,
                  sweeps: int = 8, tol: float = 1e-5, joint_limit: int = 4096, shared: dict | None = None) -> dict:
    """Least-squares fit of the experts' down projections to a target, given the routing.

    acts [N, I]: the intermediate activations of slot n's expert on its token; weights [N]: the
    routing weight of the slot; experts [N], tokens [N]: which expert, which token (each token
    has at most one slot per expert); target [T, H]; current [E, H, I] (output x input) and
    bias [E, H] or None: the current matrices (and biases), which the ridge pulls towards.
    SHARED (optional): a shared expert fitted jointly with the routed ones, {"acts" [T, Is] (its
    intermediate activations on every token), "weights" [T] (what the block multiplies its
    output by: 1, or a per-token gate), "current" [H, Is], "bias" [H] or None}.

    Minimises sum_t ||target_t - sum_{n: token t} w_n (M_e a_n + b_e) - s_t (S a^s_t + b^s)||^2
    + sum_e lambda_e ||[M_e b_e] - [M0_e b0_e]||^2 (+ the same for S), lambda_e = ridge x
    trace(G_e) / dim (G_e: the expert's Gram matrix of weighted activations). Solved exactly and
    jointly while the matrices have at most JOINT_LIMIT columns side by side, else by exact
    per-expert solves given the others, swept (block Gauss-Seidel, which converges to the joint
    solution) until the error falls by less than TOL (relative) or after SWEEPS. Experts with no
    slot keep their matrices. Returns {"down": [E, H, I], "bias": [E, H] | None, "shared":
    {"down", "bias"} | None, "loss_before", "loss_after", "sweeps", "fitted"} (losses: mean
    squared error per target element), float64 math, results in float32."""
    import torch

    dd = torch.float64
    R = target.to(dd)
    ex, tk = experts.long(), tokens.long()
    E, H, I = current.shape
    blocks = []  # (key, token index [n], weighted activations [n, d], theta0 [H, d], with_bias)

    def add(key, tok, a, w, cur, b):
        a = a.to(dd)
        if b is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=dd)], dim=1)
            cur = torch.cat([cur.to(dd), b.to(dd)[:, None]], dim=1)
        blocks.append((key, tok, w.to(dd)[:, None] * a, cur.to(dd).clone(), b is not None))

    for e in range(E):
        idx = (ex == e).nonzero().reshape(-1)
        if idx.numel():
            add(e, tk[idx], acts[idx], weights[idx], current[e], None if bias is None else bias[e])
    if shared is not None:
        add("shared", torch.arange(R.shape[0]), shared["acts"], shared["weights"], shared["current"],
            shared.get("bias"))
    theta0 = [b[3] for b in blocks]
    theta = [t.clone() for t in theta0]
    pred = torch.zeros_like(R)
    for (_k, t, WA, _c, _b), th in zip(blocks, theta):
        pred.index_add_(0, t, WA @ th.T)
    denom = max(R.numel(), 1)
    loss_before = float(((R - pred) ** 2).sum()) / denom
    grams = [WA.T @ WA for _k, _t, WA, _c, _b in blocks]
    lams = [ridge * float(torch.trace(G)) / G.shape[0] for G in grams]
    fitted = [i for i, G in enumerate(grams) if float(torch.trace(G)) > 0]
    done = 0
    if fitted and sum(blocks[i][2].shape[1] for i in fitted) <= joint_limit:
        sol = _joint_solve(blocks, fitted, grams, lams, R)
        for i, s in sol.items():
            theta[i] = s
        pred = torch.zeros_like(R)
        for (_k, t, WA, _c, _b), th in zip(blocks, theta):
            pred.index_add_(0, t, WA @ th.T)
        last = float(((R - pred) ** 2).sum()) / denom
    else:
        last = loss_before
        for sweep in range(max(1, sweeps) if fitted else 0):
            for i in fitted:
                _k, t, WA, _c, _b = blocks[i]
                resid = R[t] - pred[t] + WA @ theta[i].T
                d = WA.shape[1]
                new = torch.linalg.solve(grams[i] + lams[i] * torch.eye(d, dtype=dd),
                                         WA.T @ resid + lams[i] * theta0[i].T).T  # [H, d]
                pred.index_add_(0, t, WA @ (new - theta[i]).T)
                theta[i] = new
            done = sweep + 1
            loss = float(((R - pred) ** 2).sum()) / denom
            if last - loss <= tol * max(last, 1e-30):
                last = loss
                break
            last = loss
    down = current.to(torch.float32).clone()
    out_bias = None if bias is None else bias.to(torch.float32).clone()
    out_shared = None
    if shared is not None:
        out_shared = {"down": shared["current"].to(torch.float32).clone(),
                      "bias": None if shared.get("bias") is None else shared["bias"].to(torch.float32).clone()}
    for (key, _t, _WA, _c, with_bias), th in zip(blocks, theta):
        th = th.to(torch.float32)
        m, b = (th[:, :-1], th[:, -1]) if with_bias else (th, None)
        if key == "shared":
            out_shared = {"down": m, "bias": b}
        else:
            down[key] = m
            if b is not None:
                out_bias[key] = b
    return {"down": down, "bias": out_bias, "shared": out_shared, "loss_before": loss_before, "loss_after": last,
            "sweeps": done, "fitted": sum(1 for i in fitted if blocks[i][0] != "shared")}


def _joint_solve(blocks, fitted: list[int], grams: list, lams: list, R, chunk: int = 2048) -> dict:
    """The exact joint ridge solution over the FITTED blocks (their matrices side by side), the
    normal equations accumulated over token chunks. Returns {block: theta [H, d]}."""
    import torch

    dd = torch.float64
    offs, n = {}, 0
    for i in fitted:
        offs[i] = n
        n += blocks[i][2].shape[1]
    G = torch.zeros(n, n, dtype=dd)
    C = torch.zeros(n, R.shape[1], dtype=dd)
    for a in range(0, R.shape[0], chunk):
        m = min(chunk, R.shape[0] - a)
        Z = torch.zeros(m, n, dtype=dd)
        for i in fitted:
            _k, t, WA, _c, _b = blocks[i]
            sel = (t >= a) & (t < a + m)
            d = WA.shape[1]
            Z[(t[sel] - a)[:, None], offs[i] + torch.arange(d)[None, :]] = WA[sel]
        G += Z.T @ Z
        C += Z.T @ R[a:a + m]
    for i in fitted:
        d = blocks[i][2].shape[1]
        o = offs[i]
        G[o:o + d, o:o + d] += lams[i] * torch.eye(d, dtype=dd)
        C[o:o + d] += lams[i] * blocks[i][3].T
    sol = torch.linalg.solve(G, C)  # [n, H]
    return {i: sol[offs[i]:offs[i] + blocks[i][2].shape[1]].T.clone() for i in fitted}



def fit_router(loss_fn, params: list, steps: int, reg: float) -> dict:
    """A few L-BFGS iterations (strong Wolfe line search) on LOSS_FN() + ridge, over PARAMS (the
    router's rows, and bias), in place. LOSS_FN computes the block's output error and calls
    backward itself (it may work in chunks) and returns the loss as a float. The ridge is
    reg x loss0 x sum ||p - p0||^2 / ||p0||^2: moving the rows by their own norm costs REG times
    the initial error. The parameters are restored when the fit ends worse than it began.
    Returns {"loss_before", "loss_after", "evaluations", "kept"}."""
    import torch

    p0 = [p.detach().clone() for p in params]
    norms = [max(float(p.pow(2).sum()), 1e-30) for p in p0]
    for p in params:
        p.grad = None
    loss0 = loss_fn()
    for p in params:
        p.grad = None
    if steps <= 0 or loss0 == 0.0:
        return {"loss_before": loss0, "loss_after": loss0, "evaluations": 1, "kept": False}
    scale = reg * loss0
    evals = [0]

    def closure():
        for p in params:
            p.grad = None
        total = loss_fn()
        penalty = 0.0
        for p, q, n in zip(params, p0, norms):
            diff = p - q
            pen = scale * diff.pow(2).sum() / n
            pen.backward()
            penalty += float(pen.detach())
        evals[0] += 1
        return torch.tensor(total + penalty, dtype=torch.float64)

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)
    opt.step(closure)
    for p in params:
        p.grad = None
    loss1 = loss_fn()
    for p in params:
        p.grad = None
    kept = loss1 < loss0
    if not kept:
        with torch.no_grad():
            for p, q in zip(params, p0):
                p.copy_(q)
        loss1 = loss0
    return {"loss_before": loss0, "loss_after": loss1, "evaluations": evals[0] + 2, "kept": bool(kept)}


def fit_selection(loss_fn, buf, rounds: int, step: float) -> dict:
    """Coordinate search on BUF (a router buffer that only decides which experts are chosen, such
    as DeepSeek's e_score_correction_bias; it has no gradient): for step sizes STEP, STEP/2, ...
    (ROUNDS of them), each entry moved by +-step where that lowers LOSS_FN() (no gradient, a
    float). In place; returns {"loss_before", "loss_after", "evaluations", "moved"}."""
    import torch

    best = loss0 = loss_fn()
    evals, moved = 1, 0
    with torch.no_grad():
        for r in range(max(0, rounds)):
            s = step / (2 ** r)
            for e in range(buf.shape[0]):
                old = buf[e].clone()
                for sign in (1.0, -1.0):
                    buf[e] = old + sign * s
                    loss = loss_fn()
                    evals += 1
                    if loss < best:
                        best = loss
                        moved += 1
                        break
                else:
                    buf[e] = old
    return {"loss_before": loss0, "loss_after": best, "evaluations": evals, "moved": moved}


def _selection_buffers(router, num_experts: int) -> list:
    """The router's floating buffers with one entry per expert (DeepSeek's e_score_correction_bias):
    they act on the choice of experts alone."""
    return [b for _n, b in router.named_buffers(recurse=False)
            if b.is_floating_point() and b.dim() == 1 and b.shape[0] == num_experts]


# -- one block --------------------------------------------------------------------------------------------------
def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def run_block(block, x, grad: bool = False):
    """BLOCK on X [T, H] (as one sequence), in chunks; [T, H]."""
    import torch

    outs = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for a in range(0, x.shape[0], CHUNK_TOKENS):
            outs.append(_block_out(block(x[a:a + CHUNK_TOKENS][None]))[0])
    return torch.cat(outs)


def check_experts_take_routing(experts, family: str) -> None:
    """Heal refits the experts from the (indices, weights) their module is called with: refuse a
    family whose experts module takes only hidden states (Llama 4: each expert sees every token,
    scaled by its routing score before the call)."""
    from moetool.runtime.observers import experts_take_indices

    if not experts_take_indices(experts):
        raise MoetoolError(f"cannot heal a {family} model: its experts module takes only hidden states (the routing "
                           "is applied before it), and heal refits the experts from the expert indices and "
                           "weights they are called with")


class _RoutingProbe:
    """Hooks on a block's experts module: the (indices, weights) it was called with and what it
    returned, so that the rest of the block's output (shared experts) is known."""

    def __init__(self, experts):
        self.experts = experts
        self.idx, self.w, self.out = [], [], []

    def __enter__(self):
        self.h1 = self.experts.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.h2 = self.experts.register_forward_hook(self._post)
        return self

    def __exit__(self, *exc):
        self.h1.remove()
        self.h2.remove()

    def _pre(self, module, args, kwargs):
        values = list(args) + list(kwargs.values())
        if len(values) < 3:
            raise MoetoolError("the experts module was not called with (hidden, indices, weights)")
        n = values[0].reshape(-1, values[0].shape[-1]).shape[0]
        self.idx.append(values[1].reshape(n, -1).detach().long())
        self.w.append(values[2].reshape(n, -1).detach().float())

    def _post(self, module, args, output):
        out = _block_out(output)
        self.out.append(out.reshape(-1, out.shape[-1]).detach().float())


def down_orientation(experts, hidden: int, inter: int, sample) -> str:
    """How the experts module holds its down projections: "out_in" ([E, hidden, inter], used as
    a linear layer's weight) or "in_out" ([E, inter, hidden], multiplied from the right). From the
    shape, or (hidden == inter) by a probe on SAMPLE tokens."""
    import torch

    down = getattr(experts, DOWN, None)
    if down is None or down.dim() != 3:
        raise MoetoolError(f"the experts module has no fused 3-D `{DOWN}` (transformers 5 layout); cannot heal")
    shape = tuple(down.shape[1:])
    if hidden != inter:
        if shape == (hidden, inter):
            return "out_in"
        if shape == (inter, hidden):
            return "in_out"
        raise MoetoolError(f"`{DOWN}` has shape {list(down.shape)}, expected hidden {hidden} and intermediate {inter}")
    # square: route a probe token through expert 0 with a one-entry matrix
    a = expert_activations(experts, sample[:1], 0, hidden, inter, "out_in")  # identity: either orientation
    probe = torch.zeros(hidden, inter, dtype=down.dtype)
    probe[0, 1] = 1.0
    y = _with_down(experts, 0, probe, lambda: _call_expert(experts, sample[:1], 0))
    if torch.allclose(y[0, 0], a[0, 1].to(y.dtype), rtol=1e-3, atol=1e-6) and float(a[0, 1].abs()) > 0:
        return "out_in"
    return "in_out"


def _call_expert(experts, x, e: int):
    from moetool.runtime.observers import run_expert

    return _block_out(run_expert(experts, x, e))


def _with_down(experts, e: int, matrix, fn):
    """Run FN with expert E's down matrix replaced by MATRIX (as stored) and its bias zeroed."""
    import torch

    down = getattr(experts, DOWN)
    bias = getattr(experts, DOWN_BIAS, None)
    with torch.no_grad():
        saved = down.data[e].clone()
        saved_b = bias.data[e].clone() if bias is not None else None
        down.data[e].copy_(matrix.to(down.dtype))
        if bias is not None:
            bias.data[e].zero_()
        try:
            return fn()
        finally:
            down.data[e].copy_(saved)
            if bias is not None:
                bias.data[e].copy_(saved_b)


def expert_activations(experts, x, e: int, hidden: int, inter: int, orientation: str):
    """Expert E's intermediate activations on tokens X [n, hidden] -> [n, inter] (float32): the
    experts module itself run with E's down projection replaced by a selector of ``hidden``
    activations at a time (bias zeroed), so every family's own activation function is used."""
    import torch

    parts = []
    with torch.no_grad():
        for c in range(0, inter, hidden):
            width = min(hidden, inter - c)
            sel = torch.zeros(hidden, inter)
            sel[torch.arange(width), c + torch.arange(width)] = 1.0
            stored = sel if orientation == "out_in" else sel.T
            outs = []
            for a in range(0, x.shape[0], CHUNK_TOKENS):
                outs.append(_with_down(experts, e, stored, lambda: _call_expert(experts, x[a:a + CHUNK_TOKENS], e)))
            parts.append(torch.cat(outs)[:, :width].float())
    return torch.cat(parts, dim=1)


def _router_params(router) -> list:
    return [p for _, p in router.named_parameters()]


def _refit_down(experts, x, idx, w, target, hidden: int, inter: int, opts: HealOptions, shared=None) -> dict:
    """The closed-form down-projection fit of one experts module (in place), given the routing
    (IDX, W [T, k]) and the routed target [T, hidden]. SHARED (optional): (the shared expert's
    down projection, a Linear; its input activations [T, Is]; the per-token factor [T] the block
    multiplies its output by), fitted jointly with the routed experts; the target then includes
    the shared expert's part."""
    import torch

    down = getattr(experts, DOWN)
    bias = getattr(experts, DOWN_BIAS, None)
    orientation = down_orientation(experts, hidden, inter, x)
    E = down.shape[0]
    T, k = idx.shape
    tok = torch.arange(T)[:, None].expand(T, k).reshape(-1)
    ex, wt = idx.reshape(-1), w.reshape(-1)
    ok = (ex >= 0) & (ex < E)
    tok, ex, wt = tok[ok], ex[ok], wt[ok]
    acts = torch.zeros(ex.numel(), inter)
    for e in range(E):
        sl = (ex == e).nonzero().reshape(-1)
        if sl.numel():
            acts[sl] = expert_activations(experts, x[tok[sl]], e, hidden, inter, orientation)
    current = down.detach().float()
    if orientation == "in_out":
        current = current.transpose(1, 2)
    extra = None
    if shared is not None:
        lin, s_acts, s_w = shared
        extra = {"acts": s_acts, "weights": s_w, "current": lin.weight.detach().float(),
                 "bias": None if lin.bias is None else lin.bias.detach().float()}
    fit = fit_down_proj(acts, wt, ex, tok, target, current, None if bias is None else bias.detach().float(),
                        ridge=opts.ridge, sweeps=opts.sweeps, shared=extra)
    new = fit["down"] if orientation == "out_in" else fit["down"].transpose(1, 2)
    with torch.no_grad():
        down.copy_(new.to(down.dtype))
        if bias is not None:
            bias.copy_(fit["bias"].to(bias.dtype))
        if shared is not None:
            lin = shared[0]
            lin.weight.copy_(fit["shared"]["down"].to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_(fit["shared"]["bias"].to(lin.bias.dtype))
    info = {k2: fit[k2] for k2 in ("loss_before", "loss_after", "sweeps", "fitted")}
    info["orientation"] = orientation
    info["shared"] = shared is not None
    return info


def shared_down(shared_mod, hidden: int):
    """The shared expert's down projection: its one Linear that writes the hidden size (None when
    there is not exactly one)."""
    import torch

    if shared_mod is None:
        return None
    lins = [m for m in shared_mod.modules() if isinstance(m, torch.nn.Linear) and m.out_features == hidden]
    return lins[0] if len(lins) == 1 else None


def shared_module(loaded, block):
    """BLOCK's shared expert, by the family's runtime layouts ("shared"), or None."""
    for layout in loaded.rc.family.runtime_layouts:
        name = layout.get("shared")
        if name:
            try:
                return block.get_submodule(name)
            except AttributeError:
                continue
    return None


class _SharedProbe:
    """Hooks on the shared expert's down projection: its input activations and its output."""

    def __init__(self, lin):
        self.lin = lin
        self.acts, self.out = [], []

    def __enter__(self):
        if self.lin is not None:
            self.h1 = self.lin.register_forward_pre_hook(self._pre)
            self.h2 = self.lin.register_forward_hook(self._post)
        return self

    def __exit__(self, *exc):
        if self.lin is not None:
            self.h1.remove()
            self.h2.remove()

    def _pre(self, module, args):
        a = args[0]
        self.acts.append(a.reshape(-1, a.shape[-1]).detach().float())

    def _post(self, module, args, output):
        self.out.append(output.reshape(-1, output.shape[-1]).detach().float())


def _shared_factor(rest, s_out):
    """Per-token factor f with REST = f * S_OUT (the block multiplies its shared expert's output
    by 1, or by a gate per token), or None when REST is not such a multiple (then the shared
    expert is left out of the fit)."""
    import torch

    power = (s_out ** 2).sum(-1)
    f = (rest * s_out).sum(-1) / power.clamp_min(1e-30)
    f = torch.where(power > 0, f, torch.zeros_like(f))
    scale = float(rest.abs().max()) if rest.numel() else 0.0
    if not torch.allclose(f[:, None] * s_out, rest, rtol=1e-3, atol=1e-4 * max(scale, 1e-12)):
        return None
    if torch.allclose(f, torch.ones_like(f), atol=1e-5):
        f = torch.ones_like(f)
    return f


@contextlib.contextmanager
def _trainable_only(block, params):
    """Within the block, only PARAMS take gradients; every flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _chunked_mse(target, output_of):
    """A closure for fit_router: the summed squared error of OUTPUT_OF(a, b) against
    TARGET[a:b] over token chunks, divided by TARGET's size, back-propagated chunk by chunk so
    that only one chunk's graph is alive at a time."""
    import torch

    denom = float(target.numel())

    def loss_fn() -> float:
        total = 0.0
        with torch.enable_grad():
            for a in range(0, target.shape[0], CHUNK_TOKENS):
                b = a + CHUNK_TOKENS
                loss = ((output_of(a, b) - target[a:b]) ** 2).sum() / denom
                loss.backward()
                total += float(loss.detach())
        return total

    return loss_fn


def _probe_block(block, experts, lin, x):
    """Run BLOCK on X recording the routing: (indices [T, k], weights [T, k], what the block adds
    besides the routed experts and the shared expert's fitted part [T, H], the shared expert's
    (LIN, activations, per-token factor) or None). With LIN None (or a shared expert that is not
    a per-token multiple of LIN's output) the shared expert's whole output is in the third."""
    import torch

    with _RoutingProbe(experts) as probe, _SharedProbe(lin) as sp:
        full = run_block(block, x).float()
    idx, w = torch.cat(probe.idx), torch.cat(probe.w)
    rest = full - torch.cat(probe.out)
    shared = None
    if lin is not None and sp.out:
        s_out = torch.cat(sp.out)
        f = _shared_factor(rest, s_out) if s_out.shape == rest.shape else None
        if f is not None:
            shared = (lin, torch.cat(sp.acts), f)
            rest = rest - f[:, None] * s_out
    return idx, w, rest, shared


def heal_block(block, router, experts, x, y, hidden: int, inter: int, opts: HealOptions, shared_mod=None) -> dict:
    """Heal one MoE block in place so that its output on the calibration inputs X [T, hidden]
    approaches the target Y [T, hidden]: router rows, then down projections (see the module
    docstring). Returns what was done and the block's output error before and after (mean
    squared error per element, and relative to the target's mean square)."""
    import torch

    started = time.perf_counter()
    x = x.detach()
    y = y.detach().float()
    hold = holdout_mask(x.shape[0], opts.holdout)
    xv, yv = x[hold], y[hold]  # never fitted: they decide whether the healed block is kept
    x, y = x[~hold], y[~hold]
    ref_power = float((y ** 2).mean())
    before = float(((run_block(block, x).float() - y) ** 2).mean())
    info: dict[str, Any] = {"tokens": int(x.shape[0]), "mse_before": before,
                            "relative_before": before / max(ref_power, 1e-30), "holdout_tokens": int(xv.shape[0])}
    val_power = float((yv ** 2).mean()) if xv.shape[0] else 0.0
    val_before = float(((run_block(block, xv).float() - yv) ** 2).mean()) if xv.shape[0] else 0.0
    params = _router_params(router)
    down = getattr(experts, DOWN, None)
    saved_block = [p.detach().clone() for p in block.parameters()]
    saved_buffers = [b.detach().clone() for b in block.buffers()]

    # 1. router rows
    if opts.router_steps > 0 and params:
        loss_fn = _chunked_mse(y, lambda a, b: _block_out(block(x[a:b][None]))[0].float())
        with _trainable_only(block, params):
            info["router"] = fit_router(loss_fn, params, opts.router_steps, opts.router_reg)
    # 1b. selection-only router buffers, by a coordinate search on the block's output error
    sel = _selection_buffers(router, int(down.shape[0])) if down is not None else []
    if opts.selection_rounds > 0 and sel:
        sub = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], CHUNK_TOKENS)).long()]
        ysub = y[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], CHUNK_TOKENS)).long()]

        def sel_loss():
            return float(((run_block(block, sub).float() - ysub) ** 2).mean())

        spread = float(torch.cat([b.detach().reshape(-1) for b in sel]).std()) if sel[0].numel() > 1 else 0.0
        for b in sel:
            info["selection"] = fit_selection(sel_loss, b, opts.selection_rounds, max(spread, 1e-3))
    # 2. down projections (the shared expert's too), given the routing
    if opts.down and down is not None:
        lin = shared_down(shared_mod, hidden) if opts.shared_down else None
        idx, w, rest, shared = _probe_block(block, experts, lin, x)
        info["down"] = _refit_down(experts, x, idx, w, y - rest, hidden, inter, opts, shared)
        # 3. every expert weight by L-BFGS with the routing fixed, then the down projections again
        if opts.experts_steps > 0:
            router_ids = {id(p) for p in params}
            if opts.shared:  # the whole block but its router: shared experts (and their gate) too
                eparams = [p for p in block.parameters() if id(p) not in router_ids]
                experts_loss = _chunked_mse(y, lambda a, b: _block_out(block(x[a:b][None]))[0].float())
            else:
                eparams = [p for _, p in experts.named_parameters()]
                _i, _w, rest_all, _s = _probe_block(block, experts, None, x)  # with the refitted shared expert
                experts_loss = _chunked_mse(
                    y - rest_all, lambda a, b: _block_out(experts(x[a:b], idx[a:b], w[a:b].to(x.dtype))).float())
            with _trainable_only(block, eparams):
                info["experts"] = fit_router(experts_loss, eparams, opts.experts_steps, opts.experts_reg)
            _i, _w, rest, shared = _probe_block(block, experts, lin, x)
            info["down"] = _refit_down(experts, x, idx, w, y - rest, hidden, inter, opts, shared)
    after = float(((run_block(block, x).float() - y) ** 2).mean())
    val_after = float(((run_block(block, xv).float() - yv) ** 2).mean()) if xv.shape[0] else 0.0
    worse = val_after >= val_before if xv.shape[0] else after >= before
    if worse:  # never worse on the held-out calibration tokens (or, without them, on the fitted ones)
        with torch.no_grad():
            for p, q in zip(block.parameters(), saved_block):
                p.copy_(q)
            for b, q in zip(block.buffers(), saved_buffers):
                b.copy_(q)
        after, val_after = before, val_before
        info["reverted"] = True
    else:
        info["reverted"] = False
    info["mse_after"] = after
    info["relative_after"] = after / max(ref_power, 1e-30)
    if xv.shape[0]:
        info["holdout_relative_before"] = val_before / max(val_power, 1e-30)
        info["holdout_relative_after"] = val_after / max(val_power, 1e-30)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return info


def holdout_mask(n: int, fraction: float):
    """Every k-th of N calibration tokens (k = round(1 / FRACTION)) held out of the fit, so that
    whether a healed block is kept is decided on tokens it was not fitted to; none below 20
    tokens or with FRACTION 0."""
    import torch

    mask = torch.zeros(n, dtype=torch.bool)
    if fraction > 0 and n >= 20:
        k = max(2, round(1 / fraction))
        mask[k - 1::k] = True
    return mask


# -- calibration tokens ------------------------------------------------------------------------------------------
def calibration_ids(tokenizer, texts: list[str], max_tokens: int | None) -> list[list[int]]:
    """Token ids of TEXTS as `moetool trace` tokenizes them (special tokens included), capped at
    MAX_TOKENS in input order."""
    seqs, left = [], max_tokens
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        if ids:
            seqs.append(ids)
        if left is not None and left <= 0:
            break
    if not seqs:
        raise MoetoolError("no calibration tokens: the text is empty")
    return seqs


def make_batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[tuple]:
    """[(input_ids [B, S], attention_mask [B, S])], similar lengths together, right-padded."""
    import torch

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for a in range(0, len(order), batch_size):
        rows = [seqs[i] for i in order[a:a + batch_size]]
        S = max(len(r) for r in rows)
        ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), S), dtype=torch.long)
        for r, s in enumerate(rows):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        out.append((ids, mask))
    return out


# -- the layer-by-layer driver -------------------------------------------------------------------------------------
class HealObserver(Observer):
    """Heals every MoE layer of the compressed model when moetool's executor (layerwise mode) has
    run all calibration batches through it: the block's inputs are collected by a pre-hook (real
    tokens only), the target is the original block on them, and ``layer_end`` heals the block in
    place and returns True, so the executor recomputes the layer's outputs with the healed
    weights before the next layer runs (which therefore sees the healed model's hidden states)."""

    needs_logits = False

    def __init__(self, ref_loaded, loaded, opts: HealOptions, log=None, ckpt=None, store=None,
                 signature: dict | None = None):
        from moetool.runtime.loading import moe_blocks

        self.ref_loaded, self.loaded = ref_loaded, loaded
        self.ref_blocks = {L: blk for L, blk, _r, _e in moe_blocks(ref_loaded)}
        self.blocks = {L: (blk, router, experts) for L, blk, router, experts in moe_blocks(loaded)}
        self.shared = {L: shared_module(loaded, blk) for L, (blk, _r, _e) in self.blocks.items()}
        self.hidden = int(loaded.rc.fields["hidden_size"])
        self.opts, self.log = opts, log
        self.ckpt, self.store = ckpt, store  # with a checkpoint: each healed layer's tensors kept in STORE
        self.inputs: dict[int, list] = {}
        self.rows: list[dict] = []
        self.fitting = False
        self.executor = None
        # what a resumed run must agree with besides the executor's tokens and model (JSON-able)
        self.signature = json.loads(json.dumps(signature if signature is not None else {"options": opts.as_dict()}))

    def attach(self, executor, hooks) -> None:
        self.executor = executor
        for L, (blk, _router, _experts) in self.blocks.items():
            hooks.pre(blk, self._collect(L))

    def _collect(self, L: int):
        def hook(module, args):
            ex = self.executor
            if self.fitting or ex.busy or ex.current is None:  # our own calls, the executor's recompute
                return None
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            self.inputs.setdefault(L, []).append(x[ex.current.valid.to(x.device)].detach())
            return None

        return hook

    def heal(self, L: int, x, opts: HealOptions | None = None) -> dict:
        from moetool.runtime.streaming import layer_in_memory

        blk, router, experts = self.blocks[L]
        with layer_in_memory(self.ref_loaded, L):  # a streamed original: this layer read from disk, freed after
            y = run_block(self.ref_blocks[L], x)
        return heal_block(blk, router, experts, x, y, self.hidden, _intermediate(experts, self.hidden),
                          opts or self.opts, shared_mod=self.shared[L])

    def layer_end(self, layer: int) -> bool:
        import torch

        if layer not in self.blocks:
            return False
        x = torch.cat(self.inputs.pop(layer))
        opts, plan = self.opts, None
        if self.ckpt is not None:  # which on-disk tensors this layer's healing changes (the layer is in memory now)
            plan = write_plan(self.ckpt, self.loaded, {layer})
            if opts.shared_down and not plan_covers_shared(plan, self.loaded):
                opts = HealOptions(**{**opts.as_dict(), "shared_down": False})
        self.fitting = True
        try:
            info = self.heal(layer, x, opts)
        finally:
            self.fitting = False
        if info is None:
            return False
        info["layer"] = layer
        self.rows.append(info)
        if plan is not None and not info["reverted"] and self.store is not None:
            self.store.put(layer, healed_values(plan, self.loaded))
        if self.log:
            self.log(f"layer {layer}: block error {info['relative_before']:.4f} -> {info['relative_after']:.4f} "
                     f"(relative), {info['seconds']:.1f} s")
        return not info["reverted"]

    # -- resume (the executor checkpoints this after every layer, with the next layer's inputs) ----------------
    def state(self) -> tuple[dict, dict]:
        """The per-layer records, which layers' healed tensors the store holds (their files are in
        the run directory, written before the checkpoint that names them), and the signature. No
        optimizer or random state crosses layers: each layer's fits start afresh and are
        deterministic."""
        stored = self.store.layers() if self.store is not None else {}
        return {}, {"heal": self.signature, "rows": self.rows, "stored": {str(L): n for L, n in stored.items()}}

    def load_state(self, tensors: dict, meta: dict) -> None:
        where = getattr(self.executor, "run_dir", None) or "the run directory"
        if meta.get("heal") != self.signature:
            theirs, ours = meta.get("heal") or {}, self.signature
            diff = sorted(_differences(theirs, ours)) or ["signature"]
            raise MoetoolError(f"--resume: the checkpoint in {where} was made by a heal of another model or with other "
                               f"options ({', '.join(diff[:4])} differ); use the same input or another --run-dir")
        self.rows = list(meta.get("rows") or [])
        stored = {int(L): names for L, names in (meta.get("stored") or {}).items()}
        if stored and (self.store is None or self.store.dir is None):
            raise MoetoolError(f"--resume: the checkpoint in {where} names healed layers kept on disk, and this run "
                               "keeps them in memory")
        if self.store is not None:
            self.store.restore(stored)


class LayerStore:
    """The healed tensors of each layer, kept until the checkpoint is written: in memory, or in a
    directory (one safetensors file per layer, each written to a temporary name and renamed into
    place) so that a streamed model's healed layers need not stay in memory, and a checkpointed
    run's survive the process."""

    def __init__(self, directory: Path | None = None):
        self.dir = directory
        self.names: dict[str, Any] = {}
        self._layers: dict[int, list[str]] = {}

    def _file(self, layer: int) -> Path:
        return self.dir / f"layer-{layer:05d}.safetensors"

    def put(self, layer: int, values: dict) -> None:
        self._layers[int(layer)] = sorted(values)
        if self.dir is None:
            self.names.update(values)
            return
        import os

        from safetensors.torch import save_file

        path = self._file(layer)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
        os.replace(tmp, path)
        self.names.update({k: path for k in values})

    def layers(self) -> dict[int, list[str]]:
        """{layer: the on-disk names of its healed tensors} for every layer put so far."""
        return dict(self._layers)

    def restore(self, layers: dict[int, list[str]]) -> None:
        """Take over LAYERS (as ``layers()`` gave them) from the directory, and remove any other
        layer file there (a layer healed after the last checkpoint: it is healed again)."""
        self.names, self._layers = {}, {}
        if self.dir is None:
            return
        for L, names in sorted(layers.items()):
            path = self._file(L)
            if not path.is_file():
                raise MoetoolError(f"--resume: {path} is missing (the run directory was changed); "
                                   "start again without --resume")
            self._layers[L] = list(names)
            self.names.update({k: path for k in names})
        keep = {self._file(L).name for L in layers}
        for f in self.dir.glob("layer-*.safetensors*"):
            if f.name not in keep:
                f.unlink()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str):
        v = self.names[name]
        if isinstance(v, Path):
            from safetensors import safe_open

            with safe_open(str(v), "pt") as fh:
                return fh.get_tensor(name)
        return v


def _differences(a, b, prefix: str = "") -> list[str]:
    """The dotted keys where the JSON values A and B differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "signature"]


def heal_models(ref_loaded, loaded, sequences: list[list[int]], opts: HealOptions, batch_size: int = 8,
                log=None, progress=None, ckpt=None, store=None, signature: dict | None = None) -> list[dict]:
    """Heal LOADED (the compressed model, in place) against REF_LOADED (its original) on the
    calibration token SEQUENCES, one decoder layer at a time (moetool.runtime.executor, layerwise mode:
    every decoder layer runs over all batches with exactly the arguments the model's own forward
    passes it: attention masks by layer type, position embeddings). Either model may be streamed
    (moetool.runtime.streaming: each layer read from disk when it runs, freed after); with CKPT
    (the compressed checkpoint) the healed tensors of each layer go to STORE (a LayerStore) while
    the layer is in memory. Returns one row per MoE layer.

    Checkpoints: when LOADED was loaded with a run directory (``load_model(run_dir=...)``), the
    executor checkpoints every finished layer there (the healed model's hidden states entering the
    next layer, and this observer's state: the rows, which layers STORE holds, SIGNATURE and the
    options), STORE keeps its layers on disk in the executor's run directory (``healed-layers/``),
    and ``resume`` continues from the first unfinished layer. The original model needs no
    checkpoint: it is only run block by block on the healed model's hidden states."""
    from moetool.runtime.executor import Executor

    from moetool.runtime.loading import moe_blocks

    for _L, _block, _router, experts in moe_blocks(loaded):  # before any work: one line, not a failed run
        check_experts_take_routing(experts, loaded.family.name)
    for m in (loaded.model, ref_loaded.model):
        _eager_experts(m)
    executor = Executor(loaded, batch_size=batch_size, mode="layerwise", progress=progress, description="heal")
    if executor.run_dir is not None and store is not None:  # healed layers must outlive the process
        store.dir = executor.run_dir / "healed-layers"
        store.dir.mkdir(parents=True, exist_ok=True)
    observer = HealObserver(ref_loaded, loaded, opts, log, ckpt=ckpt, store=store,
                            signature={**(signature or {}), "options": opts.as_dict()})
    executor.run(sequences, [observer])
    if executor.run_dir is not None and store is not None:  # files of an earlier run no checkpoint names
        store.restore(store.layers())
    return observer.rows


def _eager_experts(model) -> None:
    """transformers' own per-expert loop (``experts_implementation="eager"``, public API): on a
    CPU its grouped-matmul default is many times slower, and healing runs the experts often."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return
    try:
        setter("eager")
    except (ValueError, TypeError, AttributeError, KeyError):
        pass


def _intermediate(experts, hidden: int) -> int:
    down = getattr(experts, DOWN, None)
    if down is None or down.dim() != 3:
        raise MoetoolError(f"the experts module has no fused 3-D `{DOWN}` (transformers 5 layout); cannot heal")
    a, b = int(down.shape[1]), int(down.shape[2])
    return b if a == hidden else a


# -- writing -------------------------------------------------------------------------------------------------------
@dataclass
class _Target:
    layer: int
    module: str  # "router" | "experts"
    attr: str
    expert: int | None = None  # per-expert on-disk tensor: which expert of the fused in-memory one
    piece: tuple | None = None  # (axis, start, step, length): a slice of that expert's matrix
    transpose: bool = False  # on disk = in memory with the last two dims swapped

    def value(self, mods):
        import torch

        t = mods[self.layer][self.module]
        for part in self.attr.split("."):
            t = getattr(t, part)
        t = t.detach()
        if self.expert is not None:
            t = t[self.expert]
        if self.piece is not None:
            axis, start, step, length = self.piece
            t = t.narrow(axis, start, length) if step == 1 else t.index_select(
                axis, torch.arange(start, start + step * length, step))
        return t.transpose(-1, -2) if self.transpose else t


def _match(value, disk) -> bool | None:
    """True / False: DISK is VALUE / VALUE with its last two dims swapped; None: neither."""
    import torch

    value = value.to(torch.float32)
    if tuple(value.shape) == tuple(disk.shape) and torch.equal(value, disk):
        return False
    if value.dim() >= 2 and tuple(value.transpose(-1, -2).shape) == tuple(disk.shape) \
            and torch.equal(value.transpose(-1, -2), disk):
        return True
    return None


def _pieces(value, disk_shape) -> list[tuple]:
    """Ways DISK_SHAPE can be a slice of the 2-D VALUE along one axis: the first or second half,
    or the even or odd rows (fused [gate; up] and interleaved gate/up layouts)."""
    out = []
    for axis in (0, 1):
        full = value.shape[axis]
        for n in set(disk_shape):
            if 2 * n == full:
                out += [(axis, 0, 1, n), (axis, n, 1, n), (axis, 0, 2, n), (axis, 1, 2, n)]
    return out


def write_plan(ckpt, loaded, layers: set[int] | None = None) -> dict[str, _Target]:
    """For every on-disk tensor that healing may change (router rows and biases, every routed
    expert tensor), where its value lives in the loaded model: the router's tensor of the same
    name, or an experts-module parameter (the whole of it, one expert's matrix, or a half /
    every other row of it, possibly transposed), found by comparing values with the bytes on
    disk, so every family's conversion between disk and memory layouts is followed exactly, and
    a layout that cannot be followed fails here, before any work. LAYERS: only those layers'
    tensors (which must be in memory)."""
    import torch

    from moetool.compression.surgery import classify

    mods = _healable_modules(loaded)
    if layers is not None:
        mods = {L: m for L, m in mods.items() if L in layers}
    plan: dict[str, _Target] = {}
    for name, ent in ckpt.entries.items():
        kind = classify(ckpt, name)
        if kind.layer in mods and kind.kind == "plain" and mods[kind.layer]["shared"] is not None:
            m = ckpt.family.classify(name)
            if m is not None and m.role == "shared_experts" and ent.dtype in ("F64", "F32", "F16", "BF16"):
                t = _shared_target(kind.layer, mods, ckpt.read(name).to(torch.float32))
                if t is not None:
                    plan[name] = t
            continue
        if kind.layer not in mods or kind.kind not in ("rows", "expert", "fused"):
            continue
        if ent.dtype not in ("F64", "F32", "F16", "BF16"):
            raise MoetoolError(f"{name} is {ent.dtype}: healing refits weights and needs float tensors "
                               "(dequantize the checkpoint first)")
        disk = ckpt.read(name).to(torch.float32)
        found = None
        if kind.kind == "rows":
            attr = name.rsplit(".", 1)[1]
            if getattr(mods[kind.layer]["router"], attr, None) is None:
                continue  # not a tensor healing touches
            t = _Target(kind.layer, "router", attr)
            flip = _match(t.value(mods), disk)
            found = None if flip is None else t
            if found:
                found.transpose = flip
        else:
            last = name.rsplit(".", 1)[1]
            params = sorted(mods[kind.layer]["experts"].named_parameters(recurse=False),
                            key=lambda kv: (kv[0] != last, kv[0] != (DOWN if kind.proj == "down" else kv[0])))
            for attr, param in params:
                cands = [_Target(kind.layer, "experts", attr)] if kind.kind == "fused" else \
                    [_Target(kind.layer, "experts", attr, expert=kind.expert)]
                if kind.kind == "expert" and param.dim() == 3 and kind.expert < param.shape[0]:
                    cands += [_Target(kind.layer, "experts", attr, expert=kind.expert, piece=pc)
                              for pc in _pieces(param[kind.expert], tuple(disk.shape))]
                for t in cands:
                    try:
                        flip = _match(t.value(mods), disk)
                    except (IndexError, RuntimeError):
                        continue
                    if flip is not None:
                        t.transpose = flip
                        found = t
                        break
                if found:
                    break
        if found is None:
            raise MoetoolError(f"cannot find {name} in the loaded model (its values differ from every "
                               "candidate): this checkpoint's layout cannot be healed")
        plan[name] = found
    return plan


def plan_covers_shared(plan: dict[str, _Target], loaded) -> bool:
    """Whether every MoE layer's shared-expert down projection (weight and bias) is in PLAN, so
    that refitting it reaches the output (else healing leaves shared experts alone)."""
    mods = _healable_modules(loaded)
    hidden = int(loaded.rc.fields["hidden_size"])
    for L, m in mods.items():
        if not any(t.layer == L for t in plan.values()):
            continue  # a layer the plan does not cover
        lin = shared_down(m["shared"], hidden)
        if lin is None:
            continue
        have = {id(_param(m["shared"], t.attr)) for t in plan.values() if t.layer == L and t.module == "shared"}
        if id(lin.weight) not in have or (lin.bias is not None and id(lin.bias) not in have):
            return False
    return True


def _param(module, attr: str):
    for part in attr.split("."):
        module = getattr(module, part)
    return module


def _healable_modules(loaded) -> dict:
    """{MoE layer: {"router", "experts", "shared" (or None)}} of LOADED."""
    from moetool.runtime.loading import moe_blocks

    return {L: {"router": r, "experts": e, "shared": shared_module(loaded, b)} for L, b, r, e in moe_blocks(loaded)}


def _shared_target(layer: int, mods: dict, disk) -> _Target | None:
    """The shared-expert parameter whose values are DISK (possibly transposed), or None."""
    for attr, param in mods[layer]["shared"].named_parameters():
        t = _Target(layer, "shared", attr)
        flip = _match(param.detach(), disk)
        if flip is not None:
            t.transpose = flip
            return t
    return None


def healed_values(plan: dict[str, _Target], loaded, layers: set[int] | None = None) -> dict:
    """{on-disk name: its value now in LOADED (a CPU copy)} for PLAN's tensors (in LAYERS)."""
    mods = _healable_modules(loaded)
    return {name: t.value(mods).detach().to("cpu", copy=True) for name, t in plan.items()
            if layers is None or t.layer in layers}


def write_healed(ckpt, values, out: Path, force: bool, card: str, provenance: dict) -> dict:
    """Write the healed checkpoint to OUT: the tensors in VALUES (a mapping of on-disk name to new
    value, e.g. a LayerStore) whose values changed; every other tensor copied byte for byte from
    CKPT; same shard files, index, config and side files; README.md = CARD; moetool.json =
    PROVENANCE (a moetool.checkpoint.outdir marker). Atomic."""
    import json

    import torch

    from moetool.checkpoint.outdir import atomic_output_dir, check_disk_space
    from moetool.compression.surgery import (INDEX_NAME, OutTensor, _copy_side_files, _copy_tensor, torch_dtype,
                                             write_safetensors, write_tensor_bytes)

    rewritten = 0
    shards = []
    for path in ckpt.files:
        tensors = []
        for ent in ckpt.file_entries[path]:
            if ent.name in values:
                value = values.get(ent.name).to(torch_dtype(ent.dtype)).contiguous()
                if tuple(value.shape) != tuple(ent.shape):
                    raise MoetoolError(f"internal: healed {ent.name} has shape {list(value.shape)}, on disk {ent.shape}")
                if not torch.equal(value, ckpt.read(ent.name)):
                    def write(fd, name=ent.name, dtype=ent.dtype):
                        write_tensor_bytes(fd, values.get(name).to(torch_dtype(dtype)).contiguous())

                    tensors.append(OutTensor(ent.name, ent.dtype, ent.shape, ent.nbytes, write, ent.nbytes))
                    rewritten += 1
                    continue
            tensors.append(_copy_tensor(ckpt, ent, ent.name))
        shards.append((path, tensors))
    total = sum(t.nbytes for _, ts in shards for t in ts)
    check_disk_space(out.resolve().parent, total + 2**20)
    files = []
    with atomic_output_dir(out, force, provenance) as tmp:
        weight_map = {}
        try:
            for path, tensors in shards:
                meta = dict(ckpt.file_metadata.get(path) or {})
                meta["format"] = meta.get("format", "pt")
                size = write_safetensors(tmp / path.name, tensors, meta)
                files.append({"file": path.name, "bytes": size, "tensors": len(tensors)})
                weight_map.update({t.name: path.name for t in tensors})
        finally:
            ckpt.close()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_bytes((ckpt.path / "config.json").read_bytes())
        copied, skipped = _copy_side_files(ckpt.path, tmp)
        (tmp / "README.md").write_text(card)
    return {"files": files, "tensors_rewritten": rewritten, "tensors_copied": len(ckpt.entries) - rewritten,
            "bytes": total, "copied_files": copied, "skipped_files": skipped}


# -- provenance ----------------------------------------------------------------------------------------------------
def check_ref(compressed, ref) -> dict:
    """Refuse a REF that is not what COMPRESSED (a moetool output) was made from: its recorded
    source or origin fingerprint must be REF's. Returns the compressed model's provenance."""
    from moetool.checkpoint.fingerprint import model_fingerprint
    from moetool.checkpoint.outdir import MARKER
    from moetool.compression.surgery import read_provenance

    prov = read_provenance(compressed.path)
    if prov is None:
        raise MoetoolError(f"{compressed.name}: its {MARKER} records no source (not written by moetool prune / "
                           "merge-experts), so --ref cannot be checked to be its original")
    fp = model_fingerprint(ref.rc, ref.path)
    lin = prov["lineage"]
    recorded = [x for x in (lin.get("source"), lin.get("origin")) if isinstance(x, dict)]
    if not any(x.get("fingerprint") == fp for x in recorded):
        names = " or ".join(dict.fromkeys(f"`{x.get('name')}`" for x in recorded))
        raise MoetoolError(f"--ref {ref.name} is not the model {compressed.name} was made from (it was made from "
                           f"{names}; fingerprints differ)")
    return prov


# -- the command's library function -------------------------------------------------------------------------------
def heal_checkpoint(compressed: str, ref: str, file: str, out: str, max_tokens: int | None = None,
                    batch_size: int = 8, options: HealOptions | None = None, force: bool = False,
                    load_options: dict | None = None, progress: bool = True, log=None,
                    display_name: str | None = None) -> dict:
    """Heal COMPRESSED (a moetool prune / merge-experts output) against REF (the model it was made
    from) on the calibration text FILE and write the result to OUT. Returns plain data.
    DISPLAY_NAME: what the card and provenance call COMPRESSED (`prune --heal`: a temporary
    directory that will not exist)."""
    from moetool.runtime.loading import load_model
    from moetool.compression.prune import file_digest
    from moetool.checkpoint.outdir import check_output
    from moetool.compression.surgery import Checkpoint
    from moetool.analysis.trace import read_texts

    import shutil
    import tempfile

    started = time.perf_counter()
    opts = options or HealOptions()
    if opts.router_steps < 0 or opts.ridge < 0 or opts.router_reg < 0 or opts.sweeps < 1:
        raise MoetoolError("--router-steps, --ridge and --router-reg must be >= 0")
    ckpt = Checkpoint(compressed)
    ref_ckpt = Checkpoint(ref)
    check_output(out, [ckpt.path, ref_ckpt.path], force)
    prov = check_ref(ckpt, ref_ckpt)
    rc, rrc = ckpt.rc, ref_ckpt.rc
    if rc.family.name != rrc.family.name or list(rc.moe_layers) != list(rrc.moe_layers) \
            or rc.num_layers != rrc.num_layers:
        raise MoetoolError(f"{compressed} and --ref {ref} do not have the same family and layers")
    if not rc.moe_layers:
        raise MoetoolError(f"{compressed}: no MoE layers to heal")
    if rc.family.layerwise_unsupported:
        raise MoetoolError(f"cannot heal a {rc.family.name} model: heal runs it one layer at a time, and "
                           f"{rc.family.layerwise_unsupported}")
    if rc.family.heal_unsupported:
        raise MoetoolError(f"cannot heal a {rc.family.name} model: {rc.family.heal_unsupported}")
    texts = read_texts((), file)
    load_options = dict(load_options or {})
    # --resume without --run-dir: load_model's one-line error, before anything is loaded
    run_dir, resume = load_options.pop("run_dir", None), bool(load_options.pop("resume", False))
    stream = load_options.pop("stream", False)
    from moetool.checkpoint.fingerprint import model_fingerprint

    from_fp, ref_fp = model_fingerprint(rc, ckpt.path), model_fingerprint(rrc, ref_ckpt.path)
    loaded = load_model(compressed, **load_options, stream=stream, run_dir=run_dir, resume=resume)
    ref_loaded = load_model(ref, **load_options, stream=stream)  # run block by block only: no checkpoints
    streamed = getattr(loaded, "layer_reader", None) is not None
    spill = None
    if streamed and not run_dir:  # healed layers wait on disk beside OUT, not in memory (with --run-dir: there)
        parent = Path(out).expanduser().resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        spill = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.layers-", dir=parent))
    try:
        if not streamed:
            write_plan(ckpt, loaded)  # every layer's layout followed before any work
        if loaded.tokenizer is None:
            raise MoetoolError(f"{compressed}: no tokenizer in this checkpoint; cannot read the calibration text")
        seqs = calibration_ids(loaded.tokenizer, texts, max_tokens)
        store = LayerStore(spill)
        t0 = time.perf_counter()
        signature = {"model": from_fp, "ref": {"name": ref, "fingerprint": ref_fp},  # --stream may change on resume
                     "load": {"dtype": loaded.dtype, "quantization": loaded.quantization, "ref_dtype": ref_loaded.dtype,
                              "ref_quantization": ref_loaded.quantization}}
        layers = heal_models(ref_loaded, loaded, seqs, opts, batch_size=batch_size, log=log, ckpt=ckpt, store=store,
                             signature=signature)
        fit_seconds = time.perf_counter() - t0
        tokens = sum(len(s) for s in seqs)
        calibration = {"file": str(file), "sha256": file_digest(file), "tokens": tokens, "texts": len(seqs)}
        if max_tokens is not None:
            calibration["max_tokens"] = int(max_tokens)
        from moetool.checkpoint.outdir import marker

        provenance = marker("heal", source=display_name or compressed, family=rc.family.name,
                            lineage=prov["lineage"], experts=prov.get("experts"), healed={
                                "from": {"name": display_name or compressed,
                                         "fingerprint": from_fp, "command": prov.get("command")},
                                "ref": {"name": ref, "fingerprint": ref_fp},
                                "calibration": calibration, "options": opts.as_dict()})
        result = {"model": display_name or compressed, "ref": ref, "out": str(out), "family": rc.family.name,
                  "num_experts": int(rc.num_experts), "calibration": calibration, "options": opts.as_dict(),
                  "layers": layers, "fit_seconds": round(fit_seconds, 3)}
        result["streamed"] = streamed
        card = _card(result, ckpt)
        written = write_healed(ckpt, store, Path(out), force, card, provenance)
    finally:
        del loaded, ref_loaded
        gc.collect()
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    result.update(written)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _card(result: dict, ckpt) -> str:
    from moetool import __version__

    cal = result["calibration"]
    o = result["options"]
    lines = ["---", f"base_model: {result['ref']}", "tags:", "- moetool", "- heal", "- mixture-of-experts", "---", "",
             f"# {Path(result['out']).name}: healed",
             "",
             f"`{result['model']}` (a compressed {result['family']} checkpoint, {result['num_experts']} routed experts "
             f"per MoE layer) healed by moetool against its original `{result['ref']}`: each MoE layer in turn, on the "
             "hidden states that reach it in the healed model so far, the router rows were refitted by "
             f"{o['router_steps']} L-BFGS steps, the routed experts' weights by {o['experts_steps']} L-BFGS steps with "
             f"the routing fixed, and their down projections (with the shared expert's, where there is one) by ridge "
             f"least squares (ridge {o['ridge']}) so that the block's output matches the original block's on the same "
             f"inputs; a layer that did not improve on {o.get('holdout', 0):.0%} of the calibration tokens kept out of "
             "the fit was restored. Attention, embeddings, norms and the rest of the shared experts are unchanged; so "
             "are the expert count and config.",
             "",
             f"- Written by: moetool {__version__} (`moetool heal`)",
             f"- Calibration text: `{cal['file']}` (sha256 `{cal['sha256'][:16]}...`), {cal['tokens']:,} tokens "
             f"in {cal['texts']} texts",
             f"- Fitting: {result['fit_seconds']:.1f} s",
             "",
             "## Block output error per MoE layer",
             "",
             "Mean squared error of the block's output against the original block's on the fitted calibration "
             "tokens and on the held-out ones, relative to the mean square of the original block's output.",
             "",
             "| layer | before | after | held out before | held out after | router refit kept | down projections solved |",
             "|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["layers"]:
        router = r.get("router") or {}
        down = r.get("down") or {}
        hb, ha = r.get("holdout_relative_before"), r.get("holdout_relative_after")
        lines.append(f"| {r['layer']} | {r['relative_before']:.4f} | {r['relative_after']:.4f} | "
                     f"{'-' if hb is None else format(hb, '.4f')} | {'-' if ha is None else format(ha, '.4f')} | "
                     f"{'reverted' if r['reverted'] else ('yes' if router.get('kept') else 'no')} | "
                     f"{'-' if not down else ('jointly' if down.get('sweeps') == 0 else str(down['sweeps']) + ' sweeps')} |")
    previous = (ckpt.path / "README.md")
    if previous.is_file():
        body = previous.read_text()
        m = re.match(r"^---\n.*?\n---\n", body, flags=re.S)
        body = body[m.end():] if m else body
        lines += ["", "## How the compressed model was made", "", re.sub(r"^# ", "### ", body.strip(), count=1, flags=re.M)]
    lines += ["", "Loads with `transformers.AutoModelForCausalLM.from_pretrained` (no custom code).", ""]
    return "\n".join(lines)



def heal_after(write, model: str, out: str, file: str | None, max_tokens: int | None, batch_size: int,
               options: HealOptions | None, force: bool, load_options: dict | None, progress: bool) -> dict:
    """`prune --heal` / `merge-experts --heal`: WRITE(path) writes the compressed checkpoint to
    PATH; it is then healed against MODEL, its input, on the same calibration text into OUT, and
    PATH removed. Returns WRITE's result with ``out`` = OUT and ``heal`` = the heal result.

    PATH is a temporary directory beside OUT; with a run directory (``load_options["run_dir"]``,
    which the calibration before this used too) it is RUN_DIR/unhealed, so that a resumed run
    (``resume``) writes the same compressed checkpoint to the same place (the surgery is
    deterministic given the calibration, which resumes to the same statistics) and the heal's
    checkpoints under RUN_DIR match it; the heal then resumes from its first unfinished layer."""
    import shutil
    import tempfile

    if not file:
        raise MoetoolError("--heal needs calibration text: give --file TEXT")
    load_options = dict(load_options or {})
    run_dir = load_options.get("run_dir")
    if run_dir:
        tmp = Path(run_dir) / "unhealed"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's: written again, the same
        tmp.mkdir(parents=True)
    else:
        parent = Path(out).expanduser().resolve().parent
        tmp = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.unhealed-", dir=parent))
    try:
        result = write(tmp / "compressed")
        result["heal"] = heal_checkpoint(str(tmp / "compressed"), model, file, out, max_tokens=max_tokens,
                                         batch_size=batch_size, options=options, force=force,
                                         load_options=load_options, progress=progress, display_name=str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["out"] = str(out)
    return result


def write_compressed(ckpt, plan, out, card, force: bool, progress, heal: bool, model: str, file: str | None,
                     max_tokens: int | None, batch_size: int, heal_options: HealOptions | None,
                     load_options: dict | None) -> dict:
    """The surgery PLAN on CKPT written to OUT (prune and merge-experts), healed against MODEL on
    FILE first when HEAL (--heal)."""
    from moetool.compression.surgery import run_surgery

    if not heal:
        return run_surgery(ckpt, plan, out, force=force, card=card, progress=progress)
    return heal_after(lambda path: run_surgery(ckpt, plan, path, card=card, progress=progress), model, out,
                      file, max_tokens, batch_size, heal_options, force, load_options, progress)
