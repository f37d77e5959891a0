"""`moetool params`: count a model's total and activated parameters.

From a preset or config.json the count comes from the family's tensor templates; from a
checkpoint directory it is read exactly from the safetensors headers (no tensor data), and
compared with what the config implies.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from moetool.analysis.count import count_config, summarize
from moetool.families import ResolvedConfig
from moetool.families.resolve import resolve_family
from moetool.checkpoint.safetensors_header import HeaderEntry, checkpoint_files, read_checkpoint_headers
from moetool.checkpoint.source import ModelSource, resolve

# Tensors that are not parameters but quantization metadata, by name suffix:
# fp8 block scales (DeepSeek), compressed-tensors scales, MXFP4 scales (gpt-oss),
# bitsandbytes 4-bit/8-bit state.
SCALE_SUFFIXES = (
    ".weight_scale_inv", ".weight_scale", ".input_scale", "_scales", ".absmax", ".quant_map",
    ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
    ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4",
)
_LAYER_RX = re.compile(r"^model\.layers\.(\d+)\.")


def count_params(model: str, per_layer: bool = False, context: int = 4096) -> dict:
    """Count MODEL (preset name, config.json, checkpoint dir or cached Hub id)."""
    source = resolve(model)
    rc = resolve_family(source)
    report = count_config(rc, per_layer=per_layer, context=context)
    report["model"] = source.name
    report["source"] = source.kind
    report["family_level"] = rc.family.level
    report["notes"] = list(rc.family.spec.get("notes", []))  # what the family always says, not a problem found
    if source.wrapper:
        report["warnings"].append(f"counted the language model under text_config of a '{source.wrapper}' wrapper")
    if source.preset:
        report["preset"] = {k: source.preset[k] for k in ("name", "repo", "published")}
    if source.kind == "checkpoint":
        if checkpoint_files(source.path):
            report = _count_disk(rc, source.path, report, per_layer)
        else:
            report["source"] = "config"
            report["warnings"].append(
                f"{source.path} has no .safetensors files: counted from config.json "
                "(moetool never unpickles .bin weights)"
            )
    return report


def _logical_params(entry: HeaderEntry, names: set[str]) -> int:
    """Parameters a stored tensor represents (packed 4-bit formats hold two per byte)."""
    if entry.name.endswith("_blocks"):  # MXFP4: uint8 blocks, two fp4 values per byte
        return entry.numel * 2
    if entry.dtype == "U8" and (
        entry.name + ".quant_state.bitsandbytes__nf4" in names
        or entry.name + ".quant_state.bitsandbytes__fp4" in names
    ):
        return entry.numel * 2
    return entry.numel


def _count_disk(rc: ResolvedConfig, path: Path, config_report: dict, per_layer: bool) -> dict:
    entries = read_checkpoint_headers(path)
    names = {e.name for e in entries}
    fam = rc.family
    main: list[tuple[str, int, int | None]] = []
    mtp = scales = unused = 0
    unknown: list[str] = []
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    for e in entries:
        d = dtypes[e.dtype]
        d["tensors"] += 1
        d["bytes"] += e.nbytes
        if e.name.endswith(SCALE_SUFFIXES):
            scales += e.numel
            continue
        params = _logical_params(e, names)
        d["params"] += params
        layer_match = _LAYER_RX.match(e.name)
        if (layer_match and int(layer_match.group(1)) >= rc.num_layers) or fam.is_mtp_name(e.name):
            mtp += params
            continue
        base = e.name[: -len("_blocks")] if e.name.endswith("_blocks") else e.name
        match = fam.classify(base, rc)
        if match is None:
            unknown.append(e.name)
            continue
        if match.expert is not None and rc.num_experts <= match.expert < rc.router_width:
            unused += params  # rows of a zero-computation expert (transformers allocates them): never computed
            continue
        main.append((match.role, params, match.layer))

    report = summarize(rc, main, per_layer=per_layer)
    if unused:
        _add_unused_rows(report, unused)
    warnings = list(config_report["warnings"])
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        warnings.append(f"{len(unknown)} tensors match no {fam.name} template and are not counted: {shown}")
    for role, counts in report["roles"].items():
        expected = config_report["roles"].get(role, {}).get("total", 0)
        if counts["total"] - (unused if role == "routed_experts" else 0) != expected:
            warnings.append(
                f"disk and config disagree on {role}: {counts['total']:,} on disk, {expected:,} from config.json"
            )
    if mtp != config_report["mtp_params"] and not fam.mtp_prefixes:  # prefixed MTP weights: no config count
        warnings.append(
            f"disk and config disagree on multi-token-prediction layers: {mtp:,} on disk, "
            f"{config_report['mtp_params']:,} from config.json"
        )
    out = dict(config_report)
    out.update(report)
    out["mtp_params"] = mtp
    out["scale_params"] = scales
    out["source"] = "checkpoint"
    out["disk"] = {
        "files": len(checkpoint_files(path)),
        "tensors": len(entries),
        "bytes": sum(e.nbytes for e in entries),
        "dtypes": dict(sorted(dtypes.items())),
    }
    out["warnings"] = warnings
    return out


def _add_unused_rows(report: dict, unused: int) -> None:
    """Zero-computation experts' gate/up rows on disk (what save_pretrained writes for LongCat-Flash):
    in the total (they are in the checkpoint and in transformers' model) and in routed experts, never
    active; ``unused_expert_params`` says how many."""
    report["roles"]["routed_experts"]["total"] += unused
    report["total"] += unused
    report["activated_fraction"] = report["active"] / report["total"] if report["total"] else 0.0
    report["unused_expert_params"] = unused


def list_presets() -> list[dict]:
    from moetool.checkpoint.source import presets

    rows = []
    for name, preset in presets().items():
        rc = resolve_family(ModelSource(name, "preset", preset["config"], preset=preset))
        counted = count_config(rc)
        rows.append(
            {
                "name": name,
                "aliases": preset.get("aliases", []),
                "repo": preset["repo"],
                "family": rc.family.name,
                "total": counted["total"],
                "active": counted["active"],
            }
        )
    return rows
