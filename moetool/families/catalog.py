"""Which MoE families the installed transformers has, and at which level moetool supports each.

``moe_model_types`` scans transformers' model types (``CONFIG_MAPPING_NAMES``): a type whose default
config names experts is a candidate; it is built on the meta device from a small variant of its
default config (``tiny_config``), and it is an MoE family when the built model has routed experts.
Each family's level: ``curated`` (a ``moetool/families/*.json``), ``derived`` (derived from
transformers on demand) or ``unsupported`` (with the reason). The scan is cached per transformers
version.
"""

from __future__ import annotations

import json
import time
from typing import Any

from moetool.errors import MoetoolError

CATALOG_VERSION = 1

# keys that hold the number of routed experts / experts per token in transformers' configs
# (only used to make the small scan configs: derivation itself reads the built model)
_EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k", "num_experts_per_token",
              "experts_per_token", "moe_top_k")
_SCAN_LAYERS = 4
_SCAN_EXPERTS = 8


def _mentions_experts(d: dict) -> bool:
    for k, v in d.items():
        if "expert" in str(k).lower():
            return True
        if isinstance(v, dict) and _mentions_experts(v):
            return True
    return False


def tiny_config(model_type: str, layers: int = _SCAN_LAYERS, experts: int = _SCAN_EXPERTS) -> dict:
    """A plain config dict for MODEL_TYPE: transformers' defaults with fewer layers and experts
    (dimensions stay as they are: on the meta device they cost nothing). Lists with one entry
    per layer are cut to the new layer count."""
    from moetool.families.derive import _quiet_transformers

    _quiet_transformers()
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]().to_dict()
    cfg = _shrink(cfg, layers, experts)
    cfg["model_type"] = model_type
    return cfg


def _shrink(cfg: dict, layers: int, experts: int) -> dict:
    out = dict(cfg)
    layers_key = "num_hidden_layers" if "num_hidden_layers" in cfg else "num_layers"
    old_layers = cfg.get(layers_key)
    if isinstance(old_layers, int) and old_layers > layers:
        first_dense = cfg.get("first_k_dense_replace")
        new = max(layers, (first_dense + 2) if isinstance(first_dense, int) and first_dense < old_layers else 0)
        new = min(new, old_layers)
        out[layers_key] = new
        for k, v in cfg.items():
            if isinstance(v, list) and len(v) == old_layers:
                out[k] = v[:new]
            elif isinstance(v, list) and v and all(isinstance(x, int) for x in v) and "layer" in k and max(v) >= new:
                kept = [x for x in v if x < new]
                out[k] = kept
            elif isinstance(v, dict) and v and all(str(x).isdigit() for x in v):  # per-layer overrides
                out[k] = {x: y for x, y in v.items() if int(x) < new}
    for k, v in cfg.items():  # families whose MoE block is off by default (Gemma 4, Doge)
        if v is False and ("moe" in k.lower() or "expert" in k.lower()) and k.startswith(("enable", "is_", "use_moe")):
            out[k] = True
    n_group = cfg.get("n_group") or cfg.get("num_expert_group") or 1
    switched_on = any(out[k] is True and cfg[k] is False for k in cfg)
    if switched_on:  # a block that is off by default may leave its sizes unset
        for k in _EXPERT_KEYS:
            if k in cfg and cfg[k] is None:
                out[k] = experts
        if cfg.get("moe_intermediate_size", 0) is None:
            out["moe_intermediate_size"] = cfg.get("intermediate_size") or 64
    for k in _EXPERT_KEYS:
        v = cfg.get(k)
        if isinstance(v, int) and v > experts:
            e = max(experts, 2 * int(n_group)) if isinstance(n_group, int) else experts
            out[k] = e
    for k in _TOPK_KEYS:
        v = cfg.get(k, 0)
        if (isinstance(v, int) and v > 2) or v is None:
            out[k] = 2
    if isinstance(cfg.get("topk_group"), int) and isinstance(n_group, int):
        out["topk_group"] = min(cfg["topk_group"], int(n_group))
    for k, v in cfg.items():
        if isinstance(v, dict) and k in ("text_config",):
            out[k] = _shrink(v, layers, experts)
    return out


def scan(progress=None) -> list[dict]:
    """Every MoE family of the installed transformers: model type, whether it built, and why not."""
    from moetool.families.derive import _one_line, _quiet_transformers, build_meta_model, hf_config_for, spec_from_model

    _quiet_transformers()
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    rows = []
    for model_type in CONFIG_MAPPING_NAMES:
        try:
            default = CONFIG_MAPPING[model_type]().to_dict()
        except Exception as exc:
            if "expert" in model_type or "moe" in model_type:
                rows.append({"model_type": model_type, "status": "unsupported",
                             "reason": f"transformers cannot make its default config ({_one_line(exc)})"})
            continue
        if not _mentions_experts(default):
            continue
        if progress:
            progress(model_type)
        row: dict[str, Any] = {"model_type": model_type}
        t0 = time.perf_counter()
        text = default.get("text_config")
        if isinstance(text, dict) and text.get("model_type") and text["model_type"] != model_type and text["model_type"] in CONFIG_MAPPING:
            row.update(status="wrapper", text_model_type=text["model_type"],
                       reason=f"a multimodal wrapper: moetool counts its language model ({text['model_type']}) under text_config")
            rows.append(row)
            continue
        try:
            cfg = tiny_config(model_type)
            hf = hf_config_for(cfg)
            model = build_meta_model(hf)
            spec = spec_from_model(model, hf, cfg)
            row.update(status="moe", experts=_first_int(spec, "num_experts", cfg), top_k=_first_int(spec, "top_k", cfg),
                       routing=sorted({lay.get("routing") for lay in spec["runtime"]["layouts"]}),
                       model_class=spec.get("model_class"),
                       surgery=spec["surgery"].get("unsupported") or "ok")
        except MoetoolError as exc:
            msg = str(exc)
            row.update(status="unsupported", reason=msg)
        except Exception as exc:  # a family transformers cannot build from its own defaults
            row.update(status="unsupported", reason=f"cannot be derived from its defaults: {_one_line(exc)}")
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
    return rows


def _first_int(spec: dict, field: str, cfg: dict) -> int | None:
    from moetool.families.expr import evaluate

    names = {**spec.get("defaults", {}), **cfg}
    try:
        return int(evaluate(spec["fields"][field], names))
    except Exception:
        return None


def families(use_cache: bool = True, progress=None) -> dict:
    """The `moetool families` report: every MoE family with its level."""
    from moetool.families.derive import cache_dir, transformers_version, write_atomic
    from moetool.families import all_families

    version = transformers_version()
    path = cache_dir() / f"catalog-{version}-v{CATALOG_VERSION}.json"
    rows = None
    if use_cache and path.is_file():
        try:
            rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            rows = None
    if rows is None:
        if version == "none":
            rows = []
        else:
            rows = scan(progress=progress)
            try:
                write_atomic(path, json.dumps(rows, indent=1))
            except OSError:
                pass
    curated = {}
    for fam in all_families().values():
        for mt in fam.spec["model_types"]:
            curated[mt] = fam.name
    status = {r["model_type"]: r for r in rows}
    out = []
    seen = set()
    for row in rows:
        if row["status"] == "dense":
            continue
        mt = row["model_type"]
        seen.add(mt)
        entry = dict(row)
        if mt in curated:
            entry["level"] = "curated"
            entry["family"] = curated[mt]
        elif row["status"] == "moe":
            entry["level"] = "derived"
        elif row["status"] == "wrapper":
            inner = row["text_model_type"]
            inner_row = status.get(inner, {})
            if inner in curated:
                entry["level"], entry["family"] = "curated", curated[inner]
            elif inner_row.get("status") == "moe":
                entry["level"] = "derived"
            else:
                entry["level"] = "unsupported"
                entry["reason"] = f"its language model {inner}: {inner_row.get('reason', 'not an MoE family')}"
        else:
            entry["level"] = "unsupported"
        out.append(entry)
    for mt, name in sorted(curated.items()):
        if mt not in seen:
            out.append({"model_type": mt, "level": "curated", "family": name, "status": "moe",
                        "reason": "not a transformers model type (curated spec only)"})
    out.sort(key=lambda r: ({"curated": 0, "derived": 1, "unsupported": 2}[r["level"]], r["model_type"]))
    counts = {lvl: sum(1 for r in out if r["level"] == lvl) for lvl in ("curated", "derived", "unsupported")}
    return {"transformers": version, "families": out, "counts": counts}
