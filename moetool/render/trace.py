"""Rich tables for `moetool trace` (from the plain data of ``trace_stats.summarize``)."""

from __future__ import annotations

from moetool.render import console, human_bytes

WIDE_EXPERTS = 16  # up to this many experts, the load table has one column per expert


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def render_trace(s: dict) -> None:
    from rich.table import Table

    con = console()
    load = s["load"]
    dev = load.get("devices") or {}
    devices = "" if set(dev) == {"cpu"} and dev.get("cpu") == 1 else "; device map: " + ", ".join(
        f"{n} module{'s' if n > 1 else ''} on {d}" for d, n in dev.items())
    if load.get("streamed"):
        devices = "; streamed: one decoder layer at a time, read from disk"
    con.print(
        f"[bold]{s['model']}[/]  ({s['family']}, top-{s['top_k']} of {s['num_experts']} experts, "
        f"{len(s['moe_layers'])} MoE layers of {s['num_layers']})"
    )
    con.print(
        f"traced {s['tokens']:,} tokens from {s['sequences']} text(s)"
        + (f" ({s['prompt_tokens']:,} prompt + {s['decode_tokens']:,} generated)" if s["decode_tokens"] else "")
        + (" [yellow](cut at --max-tokens)[/]" if s.get("truncated") else "")
    )
    con.print(
        f"loaded: {load.get('dtype')}, quantization {load['quantization']}, weights {human_bytes(load['weight_bytes'])}"
        f" (experts {human_bytes(load['expert_weight_bytes'])})" + devices
    )

    table = Table(title="routing per MoE layer", title_justify="left")
    for col, just in (("layer", "right"), ("max/mean", "right"), ("CV", "right"), ("load entropy", "right"),
                      ("routing entropy", "right"), ("LB loss", "right"), ("top co-selected pair", "left"),
                      ("unused", "left")):
        table.add_column(col, justify=just)
    for lay in s["layers"]:
        pair = lay["top_pairs"][0] if lay["top_pairs"] else None
        pair_text = (f"{pair['experts'][0]}+{pair['experts'][1]}: {pair['count']} ({pair['fraction']:.0%})"
                     if pair else "-")
        unused = lay["unused_experts"]
        table.add_row(
            str(lay["layer"]), _fmt(lay["max_over_mean"]), _fmt(lay["cv"]),
            f"{_fmt(lay['load_entropy'])} b ({_fmt(lay['load_entropy_normalized'], '.0%')})",
            f"{_fmt(lay['routing_entropy'])} b", _fmt(lay["lb_loss"], ".3f"), pair_text,
            (", ".join(map(str, unused[:8])) + (f" +{len(unused) - 8}" if len(unused) > 8 else "")) if unused else "-",
        )
    o = s["overall"]
    table.add_section()
    table.add_row("mean", _fmt(o["max_over_mean"]), _fmt(o["cv"]), f"({_fmt(o['load_entropy_normalized'], '.0%')})",
                  f"{_fmt(o['routing_entropy'])} b", _fmt(o["lb_loss"], ".3f"), "",
                  str(o["unused_expert_slots"]) if o["unused_expert_slots"] else "-")
    con.print(table)
    src = s["layers"][0]["lb_loss_source"] if s["layers"] else "weights"
    con.print(
        "[dim]max/mean and CV of tokens per expert: 1 and 0 are balanced. entropies in bits: load over experts "
        "(% of log2 E), routing = mean over tokens of the top-k weight mix. LB loss = E * sum f_i P_i "
        f"(1.0 = balanced), P from {'softmax of the router logits' if src == 'logits' else 'the recorded top-k weights (no --logits)'}.[/]"
    )
    if s.get("zero_experts"):
        con.print(f"zero-computation experts ({s['zero_experts']} beside the {s['num_experts']} routed ones): "
                  f"{_fmt(o['zero_expert_share'], '.1%')} of the top-{s['top_k']} choices computed nothing, so a "
                  f"token ran {_fmt(o['routed_experts_per_token'])} routed experts on average")
    _render_load(con, s)
    if s.get("token_view"):
        _render_tokens(con, s)


def _render_load(con, s: dict) -> None:
    from rich.table import Table

    E = s["num_experts"]
    balanced = s["top_k"] / E
    if E <= WIDE_EXPERTS:
        table = Table(title="tokens per expert (fraction of tokens; balanced = "
                      f"{balanced * 100:.3g}%)", title_justify="left")
        table.add_column("layer", justify="right")
        for e in range(E):
            table.add_column(str(e), justify="right")
        for lay in s["layers"]:
            cells = []
            for c, f in zip(lay["expert_counts"], lay["expert_fraction"]):
                style = "bold red" if f > 2 * balanced else ("dim" if f < balanced / 2 else "")
                text = f"{c} ({f:.0%})"
                cells.append(f"[{style}]{text}[/]" if style else text)
            table.add_row(str(lay["layer"]), *cells)
        con.print(table)
        return
    table = Table(title=f"busiest and idlest experts (fraction of tokens; balanced = {balanced:.1%})",
                  title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("busiest")
    table.add_column("idlest")
    for lay in s["layers"]:
        fr = lay["expert_fraction"]
        order = sorted(range(E), key=lambda i: -fr[i])
        table.add_row(str(lay["layer"]),
                      ", ".join(f"{i}: {fr[i]:.1%}" for i in order[:5]),
                      ", ".join(f"{i}: {fr[i]:.1%}" for i in order[-5:][::-1]))
    con.print(table)


def _render_tokens(con, s: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    con.print("[italic]token by token (␣ = space): experts chosen per MoE layer, highest weight first[/]")
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("token")
    for L in s["moe_layers"]:
        table.add_column(f"L{L}")
    seq = None
    for row in s["token_view"]:
        if seq is not None and row["sequence"] != seq:
            table.add_section()
        seq = row["sequence"]
        text = row["token"] if row["token"] is not None else f"<{row['token_id']}>"
        shown = escape(repr(text)[1:-1].replace(" ", "␣"))  # spaces visible: "␣the" vs "the"
        if row["decode"]:
            shown = f"[cyan]{shown}[/] [dim](gen)[/]"
        cells = []
        for ids, ws in zip(row["experts"], row["weights"]):
            pairs = sorted(zip(ids, ws), key=lambda p: -p[1])
            cells.append(" ".join(str(e) for e, _ in pairs))
        table.add_row(str(row["position"]), shown, *cells)
    con.print(table)
