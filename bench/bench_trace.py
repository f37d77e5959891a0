"""`moetool trace` recording cost: a forward pass with the router hooks, compaction of the
recorded routing and its move to the CPU, vs the same forward pass without hooks, on a
mid-size random Mixtral built on the fly (real transformers layer structure); and the trace's
size on disk per token and MoE layer vs top_k x 3 bytes (uint8 expert id + float16 weight)."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = dict(hidden_size=1024, intermediate_size=2048, num_local_experts=8, num_experts_per_tok=2,
              num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, vocab_size=4096,
              max_position_embeddings=1024, tie_word_embeddings=False)
BATCH, SEQ = 2, 256


def build_model():
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).eval()
    with torch.no_grad():  # transformers may zero-init the router: give it signal so routing varies
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.05)
    return model


class _Timed:
    """Accumulates the time spent inside the recorder's hooks and its compaction (``take``):
    the recording work itself, measured apart from the forward pass around it."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        from moetool.runtime.observers import RoutingRecorder as R

        self._saved = (R._experts_hook, R._router_hook, R.take)
        timed = self

        def timed_hook(make):
            def factory(rec, *args, **kwargs):
                inner = make(rec, *args, **kwargs)

                def wrapped(*hook_args):
                    t0 = time.perf_counter()
                    out = inner(*hook_args)
                    timed.seconds += time.perf_counter() - t0
                    return out

                return wrapped

            return factory

        def take(rec, *args, **kwargs):
            t0 = time.perf_counter()
            out = timed._saved[2](rec, *args, **kwargs)
            timed.seconds += time.perf_counter() - t0
            return out

        R._experts_hook, R._router_hook = timed_hook(self._saved[0]), timed_hook(self._saved[1])
        R.take = take
        return self

    def __exit__(self, *exc):
        from moetool.runtime.observers import RoutingRecorder as R

        R._experts_hook, R._router_hook, R.take = self._saved


def run(repeats: int = 9) -> list[dict]:
    import torch

    from moetool.runtime.loading import loaded_from_model
    from moetool.analysis.trace import record_token_ids

    model = build_model()
    loaded = loaded_from_model(model, name="random-mixtral-1024x8x2048x4")
    mb = loaded.weight_bytes / 2**20
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)
    seqs = [row.tolist() for row in ids]
    mask = torch.ones_like(ids)

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def traced(logits=False):
        return record_token_ids(loaded, seqs, batch_size=BATCH, logits=logits)

    plain(), traced()  # warm up
    times: dict[str, list[float]] = {"plain": [], "traced": [], "logits": []}
    for _ in range(repeats):  # interleaved, so load from other processes hits all alike
        for name, fn in (("plain", plain), ("traced", traced), ("logits", lambda: traced(True))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    pair_ratio = statistics.median(t / p for t, p in zip(times["traced"], times["plain"]))
    with _Timed() as timed:
        for _ in range(3):
            traced()
    recording = timed.seconds / 3

    trace = traced()
    with_logits = traced(True)
    with tempfile.TemporaryDirectory() as d:
        size = trace.save(os.path.join(d, "t.safetensors"))
        size_logits = with_logits.save(os.path.join(d, "l.safetensors"))
    T, L, k, E = trace.tokens, len(trace.moe_layers), trace.top_k, trace.num_experts
    routing_bytes = sum(v.nbytes for name, v in trace.tensors().items() if name.startswith("layers."))
    tokens = BATCH * SEQ
    command = "python bench/run.py trace"
    return [
        {
            "name": f"trace recording end to end, {tokens} tokens/forward, random Mixtral {mb:.0f} MiB fp32 "
                    f"(hidden 1024, 8 experts, intermediate 2048, 4 layers), {repeats} interleaved runs",
            "measured": f"median {med['traced'] * 1000:.0f} ms, best {best['traced'] * 1000:.0f} ms",
            "alternative": f"unhooked forward: median {med['plain'] * 1000:.0f} ms, best {best['plain'] * 1000:.0f} ms",
            "ratio": f"{pair_ratio:.3f}x (median of per-run ratios); best/best {best['traced'] / best['plain']:.3f}x",
            "command": command,
        },
        {
            "name": "recording work alone: time inside the router hooks + compaction and move to CPU (instrumented)",
            "measured": f"{recording * 1000:.2f} ms per {tokens}-token forward",
            "alternative": f"fastest unhooked forward: {best['plain'] * 1000:.0f} ms",
            "ratio": f"{recording / best['plain'] * 100:.3f}% of the forward",
            "command": command,
        },
        {
            "name": "trace recording with --logits (full router logits kept), end to end",
            "measured": f"median {med['logits'] * 1000:.0f} ms",
            "alternative": f"unhooked forward: median {med['plain'] * 1000:.0f} ms",
            "ratio": f"{statistics.median(t / p for t, p in zip(times['logits'], times['plain'])):.3f}x "
                     "(median of per-run ratios)",
            "command": command,
        },
        {
            "name": f"trace size per token per MoE layer (top-{k}, {T} tokens, {L} layers)",
            "measured": f"{routing_bytes / (T * L):.2f} B routing tensors; {size / (T * L):.2f} B whole file "
                        f"(+ token id/sequence/position/decode, header)",
            "alternative": f"top_k x 3 = {k * 3} B",
            "ratio": f"{routing_bytes / (T * L) / (k * 3):.3f}x (whole file {size / (T * L) / (k * 3):.3f}x)",
            "command": command,
        },
        {
            "name": f"trace size per token per MoE layer with --logits ({E} experts)",
            "measured": f"{size_logits / (T * L):.2f} B whole file",
            "alternative": f"top_k x 3 + E x 2 = {k * 3 + E * 2} B",
            "ratio": f"{size_logits / (T * L) / (k * 3 + E * 2):.3f}x",
            "command": command,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']}: {row['measured']} vs {row['alternative']} -> {row['ratio']}")
