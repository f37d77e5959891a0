"""Validate a family config before anything counts, plans or loads with it.

``resolve_validated`` is what ``Family.resolve`` returns: the ResolvedConfig, after

- every canonical field moetool uses is checked against the rules below (data, not per-family
  code): sizes are positive integers, top-k is within 1..experts, routing groups divide the
  experts and ``topk_group`` <= ``n_group``, ...;
- every tensor the family lays out for the first layers of each kind has positive dimensions
  (a negative ``num_key_value_heads`` is caught here, by the tensor it would break);
- a config value that cannot be computed with at all (a string where a number belongs, a zero
  divisor) is named.

Each problem is one line that names the config key (the key the family's expression reads, and
the key it falls back to), its value, and what it must be.
"""

from __future__ import annotations

import ast
from typing import Any

from moetool.errors import MoetoolError
from moetool.families.expr import MissingField, evaluate

# canonical field -> (least value, what it is); None: may be absent. MoE-only rules apply when
# the config has routed experts (num_experts > 0).
FIELD_RULES: dict[str, tuple[int, str]] = {
    "num_layers": (1, "the number of decoder layers"),
    "hidden_size": (1, "the hidden size"),
    "vocab_size": (1, "the vocabulary size"),
    "num_experts": (0, "the number of routed experts per MoE layer"),
    "num_shared_experts": (0, "the number of shared experts"),
    "shared_intermediate": (0, "the shared experts' width"),
    "kv_elements_per_layer": (1, "the KV cache elements per token and layer"),
    "attn_qk_width": (1, "the attention query width"),
    "attn_v_width": (1, "the attention value width"),
    "mtp_layers": (0, "the number of multi-token-prediction layers"),
}
MOE_FIELD_RULES: dict[str, tuple[int, str]] = {
    "top_k": (1, "the number of experts per token"),
    "expert_intermediate": (1, "the routed experts' width"),
    "n_group": (1, "the number of routing groups"),
    "topk_group": (1, "the number of routing groups each token may use"),
}
# (field a, relation, field b, wording): checked when both are present
RELATIONS = [
    ("top_k", "<=", "num_experts", "top-k cannot exceed the number of routed experts"),
    ("topk_group", "<=", "n_group", "a token cannot use more routing groups than there are"),
    ("n_group", "divides", "num_experts", "routing groups must split the routed experts evenly"),
]


def _identifiers(expr: Any) -> list[str]:
    if not isinstance(expr, str):
        return []
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in ("True", "False", "None") and node.id not in out:
            out.append(node.id)
    return out


def _describe(family, rc_names: dict, raw: dict, expr: Any) -> str:
    """'num_local_experts = -4' for a bare key (following the family's defaults: the key the
    config really holds); 'hidden_size // num_attention_heads (num_attention_heads = 0)' for an
    expression."""
    idents = _identifiers(expr)
    defaults = family.spec.get("defaults", {}) if hasattr(family, "spec") else {}
    if isinstance(expr, str) and len(idents) == 1 and expr.strip().split(" or ")[0].strip() == idents[0]:
        key = idents[0]
        seen = [key]
        while key not in raw and isinstance(defaults.get(key), str) and len(_identifiers(defaults[key])) == 1:
            nxt = _identifiers(defaults[key])[0]
            if nxt in seen:
                break
            seen.append(nxt)
            key = nxt
        return f"config key {key} = {_show(rc_names.get(key, raw.get(key)))}"
    used = [f"{k} = {_show(rc_names.get(k, raw.get(k)))}" for k in idents if k in raw or k in rc_names]
    return f"{expr}" + (f" ({', '.join(used)})" if used else "")


def _show(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(rc, field: str, why: str) -> None:
    fam = rc.family
    expr = fam.spec["fields"].get(field) if hasattr(fam, "spec") else None
    raise MoetoolError(f"invalid config: {_describe(fam, rc.names, rc.raw, expr)}: {why} ({field})")


def validate(rc) -> None:
    """Raise a one-line MoetoolError for the first config field moetool cannot work with."""
    fields = rc.fields
    experts = fields.get("num_experts")
    rules = dict(FIELD_RULES)
    if _is_int(experts) and experts > 0:
        rules.update(MOE_FIELD_RULES)
    for field, (least, what) in rules.items():
        if field not in fields:
            continue
        value = fields[field]
        if value is None and field in ("n_group", "topk_group", "mtp_layers", "num_shared_experts", "shared_intermediate"):
            continue
        if not _is_int(value):
            _fail(rc, field, f"{what} must be an integer")
        if value < least:
            _fail(rc, field, f"{what} must be {'positive' if least == 1 else str(least) + ' or more'}")
    for a, rel, b, wording in RELATIONS:
        va, vb = fields.get(a), fields.get(b)
        if a not in rules or b not in rules or not (_is_int(va) and _is_int(vb)):
            continue
        ok = va <= vb if rel == "<=" else (vb % va == 0)
        if not ok:
            _fail(rc, a, f"{wording} ({a} {va}, {b} {vb})")
    _check_shapes(rc)


def _check_shapes(rc) -> None:
    """Every tensor of the first layer of each kind (dense, MoE) and the model-level ones has
    positive dimensions."""
    fam = rc.family
    if not hasattr(fam, "tensor_groups"):
        return
    seen_kinds: set = set()
    try:
        for t, _count in fam.tensor_groups(rc):
            kind = (t.layer is None, t.spec.get("name") if t.spec else t.name)
            if kind in seen_kinds:
                continue
            seen_kinds.add(kind)
            if any((not _is_int(d)) or d <= 0 for d in t.shape):
                exprs = t.spec.get("shape", []) if t.spec else []
                bad = [e for e, d in zip(exprs, t.shape) if (not _is_int(d)) or d <= 0]
                where = _describe(fam, rc.names, rc.raw, bad[0]) if bad else "its shape"
                raise MoetoolError(f"invalid config: {t.name} would have shape {list(t.shape)}: {where} must give a "
                                   "positive size")
    except (MissingField, TypeError, ZeroDivisionError, ValueError):  # reported where the field is needed
        return


def resolve_validated(family, config: dict):
    """``ResolvedConfig(family, config)``, validated (see the module docstring)."""
    from moetool.families import ResolvedConfig

    try:
        rc = ResolvedConfig(family, config)
    except MissingField:
        raise
    except (TypeError, ZeroDivisionError, ValueError, IndexError, KeyError) as exc:
        raise MoetoolError(f"invalid config: {_which(family, config)}: {exc}") from None
    validate(rc)
    return rc


def _which(family, raw: dict) -> str:
    """The first of the family's expressions that fails on RAW, described."""
    spec = family.spec
    names: dict[str, Any] = dict(raw)
    for section in ("defaults", "derived", "fields"):
        for key, expr in spec.get(section, {}).items():
            if section == "defaults" and names.get(key) is not None:
                continue
            try:
                names[key] = evaluate(expr, names)
            except MissingField:
                raise
            except (TypeError, ZeroDivisionError, ValueError, IndexError, KeyError):
                return f"{key} = {_describe(family, names, raw, expr)}"
    return "a field"
