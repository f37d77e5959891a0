"""From a model's config to its family, and the config keys that hold each family field.

Shared by counting, checkpoint checks, loading and surgery: family knowledge stays in the
family specs; this module only reads them.
"""

from __future__ import annotations

import re

from moetool.errors import MoetoolError
from moetool.families.expr import MissingField
from moetool.families import ResolvedConfig, family_for_config


def resolve_family(source) -> ResolvedConfig:
    """The family and resolved config of SOURCE (a checkpoint.source.ModelSource); one-line
    errors for dense models, a missing top-k, or config fields the family needs."""
    fam = family_for_config(source.config)
    try:
        rc = fam.resolve(source.config)
        if not rc.num_experts:
            raise MoetoolError(f"{source.name}: a dense model (no routed experts), not a mixture of experts")
        top_k = rc.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            keys = ", ".join(config_keys(fam, "top_k")) or "top_k"
            raise MoetoolError(f"{source.name}: the config gives no number of experts per token "
                               f"({keys} is {top_k!r}); set it to the model's top-k")
        rc.moe_layers  # evaluate once, so config problems surface here
    except MissingField as exc:
        raise MoetoolError(f"{source.name}: {exc} (needed by the {fam.name} family)") from None
    return rc


_IDENT = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:or\s+[\w'\"]+\s*)?$")


def config_keys(family, field_name: str) -> list[str]:
    """The config keys that hold FIELD (e.g. num_experts): the key the family's ``fields``
    expression reads, then the keys its ``defaults`` fall back to (``n_routed_experts`` ->
    ``num_local_experts``). A field computed by an expression has no key: []."""
    explicit = family.spec.get("config_keys", {}).get(field_name)
    if explicit:
        return list(explicit)
    expr = family.spec["fields"].get(field_name)
    if not isinstance(expr, str):
        return []
    m = _IDENT.match(expr)
    if not m:
        return []
    keys = [m.group(1)]
    defaults = family.spec.get("defaults", {})
    while isinstance(defaults.get(keys[-1]), str) and _IDENT.match(defaults[keys[-1]]) \
            and not defaults[keys[-1]].startswith("'") and _IDENT.match(defaults[keys[-1]]).group(1) not in keys:
        keys.append(_IDENT.match(defaults[keys[-1]]).group(1))
    return keys


def field_keys_to_write(config: dict, family, field_name: str) -> list[str]:
    """The keys of CONFIG that hold FIELD (the family's first key for it when none does)."""
    keys = config_keys(family, field_name)
    if not keys:
        raise MoetoolError(f"the {family.name} family spec names no config key for {field_name}")
    return [k for k in keys if k in config] or keys[:1]
