"""Write a DRAFT curated family JSON for MODEL_TYPE from transformers' own model.

    python scripts/derive_family.py glm4_moe > moetool/families/glm4_moe.json.draft
    python scripts/derive_family.py kimi_linear --set num_hidden_layers=5 --set 'moe_layer_freq=2' > draft.json

``--set KEY=VALUE`` (VALUE as JSON, else a string) overrides the config before building: give the
family's own dimension keys distinct values so that the draft can name them.

The model is built on the meta device (moetool.families.derive) from transformers' default config with
its dimension keys set to distinct values, so every literal shape can be written back as an
expression over the config: a key (``hidden_size``), a product of two keys
(``num_attention_heads * head_dim``), a sum (``qk_nope_head_dim + qk_rope_head_dim``) or twice a
key (``2 * moe_intermediate_size``). Dimensions no expression explains stay literal and are
listed on stderr; so are layer conditions (``when``), which the draft gives as literal layer
lists: write them as expressions over the config (``L >= first_k_dense_replace``) by hand.
Review, fix, then add a test against transformers (tests/test_curated.py) before committing.
"""

from __future__ import annotations

import itertools
import json
import sys

# distinct values for the keys that shape a model: products and sums of two of them are
# (almost always) unique, so a literal dimension names its expression
_DISTINCT = {
    "hidden_size": 1536, "intermediate_size": 2816, "moe_intermediate_size": 704, "shared_expert_intermediate_size": 1408,
    "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 160, "vocab_size": 250007,
    "q_lora_rank": 448, "kv_lora_rank": 320, "qk_nope_head_dim": 96, "qk_rope_head_dim": 40, "v_head_dim": 112,
    "linear_num_value_heads": 14, "linear_num_key_heads": 7, "linear_key_head_dim": 72, "linear_value_head_dim": 88,
    "linear_conv_kernel_dim": 5, "expert_ffn_hidden_size": 928,
}


def _ints(config: dict) -> dict[str, int]:
    return {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}


def expression_for(value: int, names: dict[str, int], prefer: tuple[str, ...] = (), chosen: frozenset = frozenset()
                   ) -> str | None:
    hits = [k for k, v in names.items() if v == value]
    if hits:
        return sorted(hits, key=lambda k: (k not in prefer, k not in chosen, k not in _DISTINCT, len(k)))[0]
    keys = [k for k in names if k in _DISTINCT or k in chosen or "expert" in k or "layers" in k]
    for a, b in itertools.combinations_with_replacement(keys, 2):
        if names[a] * names[b] == value:
            return f"{a} * {b}"
    for a, b in itertools.combinations(keys, 2):
        if names[a] + names[b] == value:
            return f"{a} + {b}"
    for a in keys:
        for m in (2, 3, 4):
            if m * names[a] == value:
                return f"{m} * {a}"
    return None


def draft(model_type: str, overrides: dict | None = None) -> tuple[dict, list[str]]:
    from moetool.families.catalog import tiny_config
    from moetool.families.derive import derive_spec

    config = tiny_config(model_type)
    for key, value in _DISTINCT.items():
        if isinstance(config.get(key), int):
            config[key] = value
    config.update(overrides or {})
    spec = derive_spec(config)
    names = _ints(config)
    chosen = frozenset(overrides or ())
    todo: list[str] = []
    for group in spec["tensors"].values():
        for t in group:
            shape = []
            for d in t["shape"]:
                expr = expression_for(int(d), names, ("hidden_size", "vocab_size"), chosen)
                if expr is None:
                    todo.append(f"{t['name']}: dimension {d} left literal")
                shape.append(expr or int(d))
            t["shape"] = shape
            if "when" in t:
                todo.append(f"{t['name']}: when {t['when']} (write it over the config)")
    spec["level"] = "curated"
    spec["description"] = f"{model_type}: DRAFT from scripts/derive_family.py; describe the family"
    spec["is_moe_layer"] = spec["is_moe_layer"]
    todo.append(f"is_moe_layer: {spec['is_moe_layer']} (write it over the config)")
    for key in ("derived_from", "meta_total", "model_class", "disk_extra_patterns"):
        spec.pop(key, None)
    fields = spec["fields"]
    for key, expr in list(fields.items()):
        try:
            value = int(expr)
        except (TypeError, ValueError):
            continue
        better = expression_for(value, names, ("num_hidden_layers", "hidden_size", "vocab_size"), chosen)
        if better:
            fields[key] = better
    return spec, todo


def _parse_sets(args: list[str]) -> dict | None:
    out = {}
    while args:
        flag = args.pop(0)
        if flag != "--set" or not args or "=" not in args[0]:
            return None
        key, _, value = args.pop(0).partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str]) -> int:
    overrides = _parse_sets(list(argv[1:])) if argv else None
    if not argv or overrides is None:
        print(__doc__, file=sys.stderr)
        return 2
    spec, todo = draft(argv[0], overrides)
    print(json.dumps(spec, indent=1))
    for line in todo:
        print(f"TODO {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
