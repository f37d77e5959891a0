"""Rich tables for `moetool params`."""

from __future__ import annotations

from moetool.families import ALL_ROLES
from moetool.render import console, human_bytes, human_count

ROLE_LABELS = {
    "embeddings": "embeddings",
    "attention": "attention",
    "router": "router",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "dense_mlp": "dense MLP layers",
    "norms": "norms",
    "lm_head": "LM head",
    "mixers": "linear-attention / SSM / conv mixers",
    "other": "other (residual gates, scales)",
}


def render_params(report: dict) -> None:
    from rich.table import Table

    con = console()
    arch = report["architecture"]
    level = " family derived from transformers" if report.get("family_level") == "derived" else ""
    title = f"{report['model']}  ({arch['family']}{level}, from {report['source']})"
    table = Table(title=title, title_justify="left")
    table.add_column("role")
    table.add_column("total", justify="right")
    table.add_column("active / token", justify="right")
    table.add_column("share of total", justify="right")
    for role in ALL_ROLES:
        counts = report["roles"].get(role, {"total": 0})
        if counts["total"] == 0:
            continue
        table.add_row(
            ROLE_LABELS[role],
            f"{counts['total']:,}",
            f"{counts['active']:,}",
            f"{counts['total'] / report['total']:.1%}",
        )
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{report['total']:,}[/]", f"[bold]{report['active']:,}[/]",
                  f"{report['activated_fraction']:.1%} active")
    con.print(table)

    lines = [
        f"total [bold]{human_count(report['total'])}[/], active per token [bold]{human_count(report['active'])}[/] "
        f"({human_count(report['active_without_embeddings'])} without the input embedding)",
        f"{arch['layers']} layers ({arch['moe_layers']} MoE, {arch['dense_layers']} dense); "
        f"{arch['routed_experts']} routed experts, top-{arch['experts_per_token']}"
        + (f", {arch['shared_experts']} shared" if arch["shared_experts"] else "")
        + f"; {human_count(arch['params_per_expert'])} params per expert per layer; {arch['scoring']} scoring"
        + (f", group-limited ({arch['topk_group']} of {arch['n_group']} groups)" if (arch.get("n_group") or 1) > 1 else ""),
    ]
    if "active_min" in report:
        lines.append(f"zero-computation experts ({arch['zero_experts']} beside the {arch['routed_experts']} routed): active "
                     f"per token is {human_count(report['active_min'])} to {human_count(report['active'])} "
                     f"({human_count(report['active_min_without_embeddings'])} to "
                     f"{human_count(report['active_without_embeddings'])} without the input embedding), by how many "
                     "of its choices are zero experts; `moetool trace` measures that share")
    if report.get("unused_expert_params"):
        lines.append(f"zero-computation experts' gate/up rows on disk (in total, never computed): "
                     f"{report['unused_expert_params']:,}")
    if report["mtp_params"]:
        lines.append(f"multi-token-prediction layers (not in total): {report['mtp_params']:,}")
    if report["scale_params"]:
        lines.append(f"quantization scale tensors (not in total): {report['scale_params']:,} values")
    mem = report["memory"]
    lines.append(
        f"weights: bf16 {human_bytes(mem['bf16'])}, fp8 {human_bytes(mem['fp8'])} (128x128 block scales), "
        f"4-bit {human_bytes(mem['int4'])} (NF4, blocksize 64, fp32 absmax)"
    )
    kv = report["kv_cache_bytes_per_token"]
    kv_line = f"KV cache per token: {human_bytes(kv['bf16'])} at bf16"
    if "mla_compressed_bf16" in kv:
        kv_line += f" as transformers caches it, {human_bytes(kv['mla_compressed_bf16'])} MLA-compressed"
    if "sliding_window_layers" in kv:
        windows = "/".join(f"{w:,}" for w in kv["windows"])
        kv_line += (f" in {kv['full_attention_layers']} full-attention layers; {kv['sliding_window_layers']} "
                    f"sliding-window layers ({windows} tokens) hold at most {human_bytes(kv['sliding_bf16_per_sequence'])}"
                    " per sequence")
    state = report.get("fixed_state_bytes_per_sequence")
    if state:
        kv_line += f" ({kv['attention_layers']} attention layers)"
        fixed = f"{human_bytes(state['bf16'])} at bf16" if "bf16" in state else "size not described"
        kv_line += f"; fixed state per sequence: {fixed} ({state['state_layers']} Mamba / linear-attention layers)"
    lines.append(kv_line)
    fl = report["flops_per_token"]
    lines.append(
        f"forward FLOPs per token: {human_count(fl['matmul'])} in matmuls, "
        f"{human_count(fl['total'])} with attention over {fl['context']:,} tokens of context"
    )
    if "disk" in report:
        disk = report["disk"]
        mix = ", ".join(f"{dt} {human_bytes(d['bytes'])}" for dt, d in disk["dtypes"].items())
        lines.append(f"on disk: {disk['tensors']:,} tensors in {disk['files']} files, {human_bytes(disk['bytes'])} ({mix})")
    pub = (report.get("preset") or {}).get("published")
    if pub:
        lines.append(
            f"published: {human_count(pub['total'])} total, {human_count(pub['active'])} active: {pub['convention']} "
            f"[dim]({pub['source']})[/]"
        )
    for line in lines:
        con.print(line)
    for note in report.get("notes", []):
        con.print(f"[dim]note:[/] {note}")
    for warning in report["warnings"]:
        con.print(f"[yellow]warning:[/] {warning}")
    if "layers" in report:
        render_layers(report["layers"], con)


def render_layers(rows: list[dict], con) -> None:
    from rich.table import Table

    table = Table(title="per layer", title_justify="left")
    for col in ("layer", "kind", "total", "active", "attention", "routed experts", "shared", "dense MLP"):
        table.add_column(col, justify="right")
    for row in rows:
        r = row["roles"]
        table.add_row(
            str(row["layer"]), row["kind"], f"{row['total']:,}", f"{row['active']:,}",
            f"{r.get('attention', 0):,}", f"{r.get('routed_experts', 0):,}",
            f"{r.get('shared_experts', 0):,}", f"{r.get('dense_mlp', 0):,}",
        )
    con.print(table)


def render_preset_list(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="presets (real configs)", title_justify="left")
    for col in ("name", "aliases", "family", "total", "active", "Hub repo"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["aliases"]), row["family"], human_count(row["total"]),
                      human_count(row["active"]), row["repo"])
    console().print(table)
