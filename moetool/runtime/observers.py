"""What commands record while ``moetool.runtime.executor.Executor`` runs a model.

- :class:`RoutingRecorder` (trace, prune, merge-experts, distill init): per token and MoE layer
  the chosen experts and their weights, read at the experts module's inputs
  ``(hidden_states, top_k_index, top_k_weights)`` (what the experts really received), or at the
  router's output for families whose experts module has another interface (gpt-oss); router
  logits from the router's output when asked.
- :class:`ExpertProbe` (prune ``--by reap``, merge-experts): REAP sums and every expert's output
  on sample tokens, by calling the layer's experts module itself.
- :class:`SharedGateMeans` (distill init): the mean of a sigmoid shared-expert gate.
- :func:`next_token_logprobs` and :class:`NextTokenMetrics` (eval, distill's held-out
  evaluation): log-probabilities of the next token, NLL, KL against a reference, agreement.
- :class:`TeacherTopK` (distill's teacher cache and held-out reference).

Every hook ignores calls made while ``executor.busy`` (an observer running a module itself)
and counts only ``executor.current.valid`` rows (never padding).
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from moetool.errors import MoetoolError
from moetool.runtime.executor import Batch, Observer


def experts_take_routing(experts) -> bool:
    """Whether EXPERTS is called as (hidden_states, top_k_index, top_k_weights) (transformers 5)."""
    flag = getattr(experts, "moetool_routing_inputs", None)
    if isinstance(flag, bool):
        return flag
    try:
        params = list(inspect.signature(experts.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 3 and params[1] == "top_k_index" and params[2] == "top_k_weights"


def experts_take_indices(experts) -> bool:
    """Whether EXPERTS is called with the routing (hidden states, expert indices, weights), under
    whatever names (gpt-oss: router_indices, routing_weights); False for an experts module that
    takes only hidden states (Llama 4: every expert gets every token, scaled before the call)."""
    try:
        return len(inspect.signature(experts.forward).parameters) >= 3
    except (TypeError, ValueError):
        return True


def _sorted_dispatch(output, tensors, k: int, E: int):
    """A router that returns its choices grouped by expert (JetMoE: the flat top-k positions
    sorted by expert, the token of each, its gate, the number of tokens per expert as a list of
    E ints, and the logits): (ids, weights, logits) per token, or None for any other output."""
    import torch

    sizes = next((v for v in output if isinstance(v, (list, tuple)) and len(v) == E
                  and all(isinstance(x, int) for x in v)), None)
    if sizes is None:
        return None
    n = sum(sizes)
    flat = [t for t in tensors if t.dim() == 1 and t.numel() == n]
    order = next((t for t in flat if not t.is_floating_point()), None)
    gates = next((t for t in flat if t.is_floating_point()), None)
    if order is None or gates is None or n % k:
        return None
    experts = torch.repeat_interleave(torch.arange(E, device=order.device), torch.tensor(sizes, device=order.device))
    ids = torch.empty(n, dtype=torch.long, device=order.device)
    w = torch.empty(n, dtype=gates.dtype, device=gates.device)
    ids[order.long()] = experts
    w[order.long()] = gates
    lg = next((t for t in tensors if t.is_floating_point() and t.dim() == 2 and t.shape[-1] == E), None)
    return ids.reshape(-1, k), w.reshape(-1, k), lg


def split_router_output(output, k: int, E: int):
    """(ids, weights, logits) from what a router returned; any may be None."""
    import torch

    if isinstance(output, torch.Tensor):
        return None, None, output
    if not isinstance(output, (tuple, list)):
        return None, None, None
    if (len(output) >= 3 and all(isinstance(t, torch.Tensor) for t in output[:3])
            and not output[2].is_floating_point() and output[1].is_floating_point()):
        return output[2], output[1], output[0]  # transformers 5: (logits, weights, indices)
    tensors = [t for t in output if isinstance(t, torch.Tensor) and t.dim() >= 1]
    sorted_dispatch = _sorted_dispatch(output, tensors, k, E)
    if sorted_dispatch is not None:
        return sorted_dispatch
    ids = next((t for t in tensors if not t.is_floating_point() and t.shape[-1] == k), None)
    if ids is None:  # a dense [tokens, E] routing-weight tensor, zero off the chosen (Llama 4: scores, logits)
        dense = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == E > k
                      and bool(((t != 0).sum(dim=-1) <= k).all())), None)
        if dense is None:
            return None, None, None
        w, ids = torch.topk(dense, k, dim=-1)
        lg = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == E and t is not dense), None)
        return ids, w, lg
    w = next((t for t in tensors if t.is_floating_point() and t.shape == ids.shape), None)
    lg = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == E and t is not w), None)
    return ids, w, lg


def run_expert(experts, x, e: int):
    """Expert E of the experts module EXPERTS on every token of X (each routed to E alone, weight 1),
    through the module's own forward."""
    import torch

    n = x.shape[0]
    if not getattr(experts, "_moetool_two_slots", False):
        index = torch.full((n, 1), e, dtype=torch.long, device=x.device)
        ones = torch.ones((n, 1), dtype=x.dtype, device=x.device)
        try:
            return experts(x, index, ones)
        except (ValueError, RuntimeError):  # LongCat's experts squeeze a top-1 routing away: fails
            experts._moetool_two_slots = True
    # the same expert in two slots, weights 1 and 0: f_e(x) + 0 * f_e(x) = f_e(x) exactly
    index = torch.full((n, 2), e, dtype=torch.long, device=x.device)
    weights = torch.zeros((n, 2), dtype=x.dtype, device=x.device)
    weights[:, 0] = 1
    return experts(x, index, weights)


class RoutingRecorder(Observer):
    """Routing of every MoE layer; ``take`` keeps a forward's valid rows on the CPU under a key
    (batch index, decode step), ``result`` concatenates them in key order."""

    def __init__(self, loaded, logits: bool = False):
        import torch

        from moetool.runtime.loading import moe_blocks

        self.loaded = loaded
        self.rc = loaded.rc
        self.blocks = moe_blocks(loaded)
        self.moe_layers = [L for L, *_ in self.blocks]
        self.k, self.E = int(self.rc.top_k), int(self.rc.num_experts)
        self.width = self.rc.router_width  # router rows: routed experts, then zero-computation ones
        self.want_logits = logits
        self.id_dtype = torch.uint8 if self.width <= 256 else torch.int16
        self.buffers: dict[int, list] = {L: [] for L in self.moe_layers}
        self.logit_buffers: dict[int, list] = {L: [] for L in self.moe_layers}
        self.rows: dict[int, dict] = {L: {} for L in self.moe_layers}  # layer -> key -> (ids, w, lg)
        self.tokens: dict = {}  # key -> (sequence, position, token id, decode)
        self.recomputed = False
        self.from_logits: set[int] = set()
        self.ex = None

    # -- hooks ------------------------------------------------------------------------------------------
    def attach(self, executor, hooks) -> None:
        self.ex = executor
        for L, _block, router, experts in self.blocks:
            if experts_take_routing(experts):
                hooks.pre(experts, self._experts_hook(L), with_kwargs=True)
                hooks.forward(router, self._router_hook(L, logits_only=True))
            else:
                hooks.forward(router, self._router_hook(L, logits_only=False))

    def _busy(self) -> bool:
        return self.ex is not None and self.ex.busy

    def _experts_hook(self, L: int):
        buf, k, id_dtype = self.buffers[L], self.k, self.id_dtype

        def hook(module, args, kwargs):
            if self._busy() or L in self.from_logits:
                return None
            values = list(args) + list(kwargs.values())
            if len(values) < 3:
                raise MoetoolError(f"layer {L}: the experts module was not called with (hidden, indices, weights)")
            import torch

            ids, w = values[1], values[2]
            buf.append((ids.detach().reshape(-1, k).to(id_dtype), w.detach().reshape(-1, k).to(torch.float16)))
            return None

        return hook

    def _router_hook(self, L: int, logits_only: bool):
        import torch

        buf, lbuf = self.buffers[L], self.logit_buffers[L]
        k, E, id_dtype, want_logits = self.k, self.width, self.id_dtype, self.want_logits

        def hook(module, args, output):
            if self._busy():
                return None
            ids, w, lg = split_router_output(output, k, E)
            if want_logits:
                if lg is None:
                    raise MoetoolError("--logits: this model's router does not return its logits")
                lbuf.append(lg.detach().reshape(-1, E).to(torch.float16))
            if logits_only and ids is not None and w is not None:
                return None  # the experts' inputs are recorded
            if ids is None or w is None:
                self.from_logits.add(L)  # a router that gives only logits (4.x style): re-derive
                if lg is None:
                    raise MoetoolError(f"layer {L}: cannot read the router's output (expected logits, weights, indices)")
                ids, w = self._recompute(lg)
            buf.append((ids.detach().reshape(-1, k).to(id_dtype), w.detach().reshape(-1, k).to(torch.float16)))
            return None

        return hook

    def _recompute(self, logits):
        """A router that returns only logits (the 4.x ``nn.Linear`` gate): softmax top-k as the
        4.x blocks did, renormalised where the config says so. Other scorings are refused."""
        import torch

        scoring = str(self.rc.fields.get("scoring", "softmax"))
        if scoring != "softmax":
            raise MoetoolError(f"this model's router returns only logits; moetool cannot re-derive {scoring} routing")
        n_group = int(self.rc.fields.get("n_group") or 1)
        if n_group > 1 and int(self.rc.fields.get("topk_group") or n_group) < n_group:
            raise MoetoolError("this model's router returns only logits; moetool cannot re-derive group-limited routing")
        self.recomputed = True
        probs = torch.softmax(logits.detach().reshape(-1, self.width).float(), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        renorm = self.rc.names.get("norm_topk_prob", self.rc.family.name == "mixtral")
        if renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        scale = self.rc.names.get("routed_scaling_factor")
        if isinstance(scale, (int, float)) and scale != 1:
            w = w * scale
        return ids, w

    # -- collecting ------------------------------------------------------------------------------------------
    def batch_end(self, batch: Batch, layer, logits) -> None:
        whole = self.ex is None or self.ex.mode == "whole"
        if layer is None and not whole:
            return  # the head pass of a layerwise run: routing was taken layer by layer
        if layer is not None and layer not in self.buffers:
            return
        keep = batch.keep
        rows, cols = keep.nonzero(as_tuple=True)
        meta = (batch.rows[rows.numpy()].astype(np.int32), batch.positions[rows, cols].numpy().astype(np.int32),
                batch.input_ids[keep].numpy().astype(np.int32), 0)
        self.take((batch.index, 0), keep, meta, None if layer is None else [layer])

    def take(self, key, mask, meta, layers=None) -> None:
        """Keep the last forward's rows where MASK ([B, S] bool) is True, under KEY."""
        import torch

        flat = mask.reshape(-1)
        if key not in self.tokens:
            self.tokens[key] = meta
        for L in (layers or self.moe_layers):
            buf = self.buffers[L]
            if not buf:
                raise MoetoolError(f"layer {L}: the router did not run during the forward pass")
            ids = torch.cat([b[0] for b in buf]) if len(buf) > 1 else buf[0][0]
            w = torch.cat([b[1] for b in buf]) if len(buf) > 1 else buf[0][1]
            buf.clear()
            lbuf = self.logit_buffers[L]
            lg = None
            if lbuf:
                lg = torch.cat(lbuf) if len(lbuf) > 1 else lbuf[0]
                lbuf.clear()
            if ids.shape[0] != flat.shape[0]:
                raise MoetoolError(f"layer {L}: the router saw {ids.shape[0]} rows for {flat.shape[0]} positions")
            sel = flat.to(ids.device)
            self.rows[L][key] = (ids[sel].cpu(), w[sel].cpu(), None if lg is None else lg[sel].cpu())

    def result(self) -> tuple[dict, dict, dict, dict]:
        """(token columns, {layer: ids}, {layer: weights}, {layer: logits}) in key order."""
        import torch

        keys = sorted(self.tokens)
        if not keys:
            raise MoetoolError("nothing was traced")
        cols = {}
        for j, name in enumerate(("sequence", "position", "token_ids")):
            cols[name] = np.concatenate([self.tokens[key][j] for key in keys])
        cols["decode"] = np.concatenate([np.full(len(self.tokens[key][0]), self.tokens[key][3], np.uint8) for key in keys])
        ids, w, lg = {}, {}, {}
        for L in self.moe_layers:
            missing = [key for key in keys if key not in self.rows[L]]
            if missing:
                raise MoetoolError(f"layer {L}: no routing recorded for batch {missing[0][0]}")
            ids[L] = torch.cat([self.rows[L][key][0] for key in keys]).numpy()
            w[L] = torch.cat([self.rows[L][key][1] for key in keys]).numpy()
            if self.want_logits:
                lg[L] = torch.cat([self.rows[L][key][2] for key in keys]).numpy()
        return cols, ids, w, lg

    # -- resume ---------------------------------------------------------------------------------------------
    def state(self):
        tensors, keys = {}, [list(k) for k in sorted(self.tokens)]
        for j, key in enumerate(sorted(self.tokens)):
            seq, pos, tok, dec = self.tokens[key]
            tensors[f"t{j}.sequence"], tensors[f"t{j}.position"], tensors[f"t{j}.token_ids"] = seq, pos, tok
        done = {}
        for L in self.moe_layers:
            done[str(L)] = [j for j, key in enumerate(sorted(self.tokens)) if key in self.rows[L]]
            for j, key in enumerate(sorted(self.tokens)):
                if key in self.rows[L]:
                    a, b, c = self.rows[L][key]
                    tensors[f"r{L}.{j}.ids"], tensors[f"r{L}.{j}.w"] = a, b
                    if c is not None:
                        tensors[f"r{L}.{j}.lg"] = c
        return tensors, {"keys": keys, "done": done, "recomputed": self.recomputed}

    def load_state(self, tensors, meta) -> None:
        keys = [tuple(k) for k in meta["keys"]]
        for j, key in enumerate(keys):
            self.tokens[key] = (tensors[f"t{j}.sequence"].numpy(), tensors[f"t{j}.position"].numpy(),
                                tensors[f"t{j}.token_ids"].numpy(), 0)
        for L in self.moe_layers:
            for j in meta["done"].get(str(L), []):
                self.rows[L][keys[j]] = (tensors[f"r{L}.{j}.ids"], tensors[f"r{L}.{j}.w"], tensors.get(f"r{L}.{j}.lg"))
        self.recomputed = bool(meta.get("recomputed"))


class ExpertProbe(Observer):
    """Runs every expert on the tokens of a calibration forward pass, in a pre-hook on each
    MoE layer's experts module:

    - REAP: for each expert e, the tokens routed to it, f_e(x) by calling the experts module
      with all of those tokens sent to e alone with weight 1; accumulates sum(w * ||f_e(x)||)
      and the count;
    - outputs: every expert on the first ``sample_tokens`` non-padding tokens of the layer.
    """

    def __init__(self, loaded, reap: bool, outputs: bool, sample_tokens: int = 256):
        from moetool.runtime.loading import moe_blocks

        self.blocks = moe_blocks(loaded)
        self.E = int(loaded.rc.num_experts)
        self.want_reap, self.want_outputs = reap, outputs
        self.sample_tokens = sample_tokens
        self.reap_sum = {L: np.zeros(self.E) for L, *_ in self.blocks}
        self.reap_n = {L: np.zeros(self.E, dtype=np.int64) for L, *_ in self.blocks}
        self.outputs: dict[int, list[list]] = {L: [[] for _ in range(self.E)] for L, *_ in self.blocks}
        self.sampled = {L: 0 for L, *_ in self.blocks}
        self.ex = None

    def attach(self, executor, hooks) -> None:
        self.ex = executor
        if not (self.want_reap or self.want_outputs):
            return
        for L, _block, _router, experts in self.blocks:  # gpt-oss names them (hidden, router_indices, routing_weights)
            if not experts_take_indices(experts):
                raise MoetoolError("REAP scores and expert-output similarity run each expert on its own tokens, and "
                                   "this model's experts module takes only hidden states (the routing is applied "
                                   "before it): use --by frequency, weight or random (merge: --similarity router "
                                   "or weight)")
            hooks.pre(experts, self._hook(L), with_kwargs=True)

    def _hook(self, L: int):
        import torch

        def hook(module, args, kwargs):
            ex = self.ex
            if ex.busy:
                return None
            values = list(args) + list(kwargs.values())
            if len(values) < 3:
                raise MoetoolError(f"layer {L}: the experts module was not called with (hidden, indices, weights)")
            hidden, idx, w = values[0], values[1], values[2]
            H = hidden.shape[-1]
            hidden = hidden.reshape(-1, H)
            idx = idx.reshape(hidden.shape[0], -1)
            w = w.reshape(hidden.shape[0], -1)
            valid = ex.current.valid if ex.current is not None else None
            if valid is None or valid.shape[0] != hidden.shape[0]:
                valid = torch.ones(hidden.shape[0], dtype=torch.bool)
            valid = valid.to(hidden.device)
            ex.busy = True
            try:
                if self.want_reap:
                    self._reap(L, module, hidden, idx, w, valid)
                if self.want_outputs and self.sampled[L] < self.sample_tokens:
                    self._sample(L, module, hidden, valid)
            finally:
                ex.busy = False
            return None

        return hook

    def _run(self, module, x, e: int):
        return run_expert(module, x, e)

    def _reap(self, L, module, hidden, idx, w, valid):
        routed = idx.long()
        for e in range(self.E):
            hit = (routed == e) & valid[:, None]
            tok, slot = hit.nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            out = self._run(module, hidden[tok], e).float()
            norms = out.norm(dim=-1)
            self.reap_sum[L][e] += float((w[tok, slot].float() * norms).sum())
            self.reap_n[L][e] += int(tok.numel())

    def _sample(self, L, module, hidden, valid):
        rows = valid.nonzero().reshape(-1)[: self.sample_tokens - self.sampled[L]]
        if rows.numel() == 0:
            return
        x = hidden[rows]
        for e in range(self.E):
            self.outputs[L][e].append(self._run(module, x, e).float().cpu().numpy())
        self.sampled[L] += int(rows.numel())

    def reap_scores(self) -> dict[int, np.ndarray]:
        return {L: np.divide(self.reap_sum[L], np.maximum(self.reap_n[L], 1)) for L in self.reap_sum}

    def output_features(self) -> dict[int, np.ndarray]:
        out = {}
        for L, per_expert in self.outputs.items():
            out[L] = np.stack([np.concatenate(chunks).reshape(-1) for chunks in per_expert])
        return out

    def state(self):
        tensors = {}
        for L in self.reap_sum:
            tensors[f"{L}.reap_sum"], tensors[f"{L}.reap_n"] = self.reap_sum[L], self.reap_n[L]
            if self.sampled[L]:
                for e in range(self.E):
                    tensors[f"{L}.out.{e}"] = np.concatenate(self.outputs[L][e])
        return tensors, {"sampled": {str(L): n for L, n in self.sampled.items()}}

    def load_state(self, tensors, meta) -> None:
        for L in self.reap_sum:
            self.reap_sum[L] = tensors[f"{L}.reap_sum"].numpy().copy()
            self.reap_n[L] = tensors[f"{L}.reap_n"].numpy().copy()
            self.sampled[L] = int(meta["sampled"][str(L)])
            if self.sampled[L]:
                self.outputs[L] = [[tensors[f"{L}.out.{e}"].numpy().copy()] for e in range(self.E)]


class SharedGateMeans(Observer):
    """Mean sigmoid of each MoE layer's shared-expert gate (Qwen2-MoE) over the valid tokens."""

    def __init__(self, gates: dict):
        self.gates = gates  # layer -> gate module
        self.sums: dict[int, list] = {L: [0.0, 0] for L in gates}
        self.ex = None

    def attach(self, executor, hooks) -> None:
        self.ex = executor
        for L, g in self.gates.items():
            hooks.forward(g, self._hook(L))

    def _hook(self, L: int):
        import torch

        def hook(module, args, output):
            if self.ex.busy:
                return None
            s = torch.sigmoid(output.detach().float()).reshape(-1, output.shape[-1])
            cur = self.ex.current
            if cur is not None and cur.valid.shape[0] == s.shape[0]:
                s = s[cur.valid.to(s.device)]
            self.sums[L][0] += float(s.sum())
            self.sums[L][1] += int(s.numel())
            return None

        return hook

    def means(self) -> dict[int, float]:
        return {L: total / n for L, (total, n) in self.sums.items() if n}

    def state(self):
        return {}, {"sums": {str(L): v for L, v in self.sums.items()}}

    def load_state(self, tensors, meta) -> None:
        self.sums = {int(L): list(v) for L, v in meta["sums"].items()}


# -- next-token metrics ----------------------------------------------------------------------------------
def next_token_logprobs(logits, temperature: float = 1.0):
    """Log-probabilities of the next token at every position but the last: [B, S-1, V] float32."""
    return (logits[:, :-1].float() / temperature).log_softmax(-1)


class NextTokenMetrics(Observer):
    """NLL of every predicted token of every sequence (a window / block); against a reference,
    KL(ref || model) and top-1 agreement. The reference is either a full log-probability
    store (rows per predicted token, in sequence order: ``ref_store``, filled by the reference
    model's own run with ``fill=True``) or, per sequence, callables. Used by `eval` and by
    distill's held-out evaluation."""

    needs_logits = True

    def __init__(self, lengths: list[int], ref_store=None, fill: bool = False, on_batch=None):
        self.lengths = list(lengths)
        self.offsets = np.cumsum([0] + [n - 1 for n in self.lengths])
        self.ref_store, self.fill = ref_store, fill
        self.on_batch = on_batch
        self.nll_sum, self.count, self.kl_sum, self.agree = 0.0, 0, 0.0, 0
        self.vocab_error = None

    def batch_end(self, batch: Batch, layer, logits) -> None:
        import torch

        if logits is None:
            return
        logp = next_token_logprobs(logits).cpu()
        store = self.ref_store
        if store is not None and logp.shape[-1] != store.shape[1]:
            raise MoetoolError(f"its vocabulary has {logp.shape[-1]} entries, the reference's {store.shape[1]}: "
                               "next-token distributions cannot be compared")
        for r, seq in enumerate(batch.rows):
            n = self.lengths[seq] - 1
            lp = logp[r, :n]
            target = batch.input_ids[r, 1:n + 1]
            self.nll_sum += float(-lp.gather(1, target[:, None]).sum())
            self.count += n
            a, b = self.offsets[seq], self.offsets[seq] + n
            if store is not None and self.fill:
                store[a:b] = lp.numpy()
            elif store is not None:
                ref = torch.from_numpy(np.asarray(store[a:b]))
                p = ref.exp()
                kl = (p * (ref - lp)).sum(dim=-1)
                self.kl_sum += float(kl.double().sum())
                self.agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        if self.on_batch:
            self.on_batch(len(batch.rows))

    def result(self) -> dict:
        out = {"nll": self.nll_sum / self.count, "perplexity": math.exp(self.nll_sum / self.count), "tokens": self.count}
        if self.ref_store is not None and not self.fill:
            out["kl"] = self.kl_sum / self.count
            out["top1_agreement"] = self.agree / self.count
        elif self.fill:
            out["kl"] = 0.0
            out["top1_agreement"] = 1.0
        return out


class TeacherTopK(Observer):
    """Per batch, the teacher's top-K log-probabilities at a temperature (distill's cache), or
    with ``reference=True`` its held-out reference: log-probabilities at every predicting
    position (all of them when K is None), per-block NLL and argmax."""

    needs_logits = True

    def __init__(self, k: int | None, temperature: float = 1.0, reference: bool = False, on_batch=None):
        self.k, self.temperature, self.reference = k, temperature, reference
        self.on_batch = on_batch
        self.out: list = []

    def batch_end(self, batch: Batch, layer, logits) -> None:

        if logits is None:
            return
        ids = batch.input_ids
        if not self.reference:
            v, ix, r = topk_of(logits, self.k, self.temperature)
            self.out.append((v.cpu(), ix.cpu(), r.cpu()))
        else:
            lg = logits[:, :-1].float()
            lp = lg.log_softmax(-1)
            nll = -lp.gather(-1, ids[:, 1:].to(lp.device).unsqueeze(-1)).squeeze(-1)
            top1 = lp.argmax(-1)
            if self.k is None:
                self.out.append((lp.cpu(), None, None, nll.sum(-1).double().cpu(), top1.cpu()))
            else:
                v, ix, r = topk_of(lg, self.k, 1.0)
                self.out.append((v.cpu(), ix.cpu(), r.cpu(), nll.sum(-1).double().cpu(), top1.cpu()))
        if self.on_batch:
            self.on_batch(len(batch.rows))


def topk_of(t_logits, k: int, temperature: float):
    """The teacher's top-k log-probabilities at a temperature, their token ids, and the log
    of the probability mass outside them (-inf when k covers the vocabulary)."""
    import torch

    lp = (t_logits.float() / temperature).log_softmax(-1)
    k = min(k, lp.shape[-1])
    vals, idx = lp.topk(k, dim=-1)
    rest = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return vals, idx.to(torch.int32), rest
