"""Model families as data.

Each ``*.json`` file beside this module describes one MoE family, in the spirit of mergekit's
per-architecture files: which config fields mean what, which layers are MoE, and every tensor
of the on-disk layout as a name template (``{L}`` = layer, ``{E}`` = expert) with its shape
written as an expression over the config. Counting, header classification, checkpoint
surgery and module lookup are generic code driven by these files, so adding a family is one
new JSON file (and one test).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterator

from moetool.errors import MoetoolError
from moetool.families.expr import evaluate

ROLES = (
    "embeddings",
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "norms",
    "lm_head",
)
# roles that only some families have: token mixers that are not softmax attention (linear
# attention, Mamba/SSM, convolution), and parameters no other role describes. Reports list them
# only when a model has them.
EXTRA_ROLES = ("mixers", "other")
ALL_ROLES = ROLES + EXTRA_ROLES
_MISSING = object()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a model as a family spec lays it out on disk."""

    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    expert: int | None = None
    mtp: bool = False
    spec: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Match:
    """What a tensor name on disk is, by the family's templates."""

    role: str
    layer: int | None
    expert: int | None
    template: str


class ResolvedConfig:
    """A config with the family's defaults and derived names applied.

    ``names`` is what shape expressions see; the canonical fields (``num_layers``,
    ``num_experts``, ``top_k``, ...) are attributes.
    """

    def __init__(self, family: "Family", raw: dict):
        self.family = family
        self.raw = raw
        names: dict[str, Any] = dict(raw)
        for key, default in family.spec.get("defaults", {}).items():
            if names.get(key, _MISSING) in (_MISSING, None):
                names[key] = evaluate(default, names) if isinstance(default, str) else default
        for key, expr in family.spec.get("derived", {}).items():
            names[key] = evaluate(expr, names)
        self.names = names
        self.fields = {key: evaluate(expr, names) for key, expr in family.spec["fields"].items()}

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("fields", {})
        if key in fields:
            return fields[key]
        raise AttributeError(key)

    @property
    def zero_experts(self) -> int:
        """Zero-computation (identity) experts the router scores beside the routed ones (LongCat-Flash):
        router rows and indices num_experts .. num_experts + zero_experts - 1; choosing one computes nothing."""
        return int(self.fields.get("zero_experts", 0) or 0)

    @property
    def router_width(self) -> int:
        """Rows of the router: one per routed expert and one per zero-computation expert."""
        return int(self.num_experts) + self.zero_experts

    @property
    def mtp_layers(self) -> int:
        return int(self.fields.get("mtp_layers", 0) or 0)

    def is_moe_layer(self, layer: int) -> bool:
        if not self.num_experts:
            return False
        return bool(evaluate(self.family.spec["is_moe_layer"], {**self.names, "L": layer}))

    @cached_property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    # -- what each layer caches during generation (the family's "cache" section: data, not code) -----------
    def _cache_rule(self, key: str, layer: int, default: Any) -> Any:
        rule = (self.family.spec.get("cache") or {}).get(key)
        if rule is None:
            return default
        return evaluate(rule, {**self.names, "L": layer})

    @cached_property
    def attention_layers(self) -> list[int]:
        """Layers with softmax attention, whose KV cache grows with the context: every layer unless the family's
        ``cache.attention_layer`` says otherwise (Mamba and linear-attention layers do not)."""
        return [i for i in range(self.num_layers) if self._cache_rule("attention_layer", i, True)]

    def attention_window(self, layer: int) -> int:
        """Tokens the KV cache of attention layer LAYER holds at most (a sliding window), 0 for no limit:
        the family's ``cache.window`` rule."""
        return int(self._cache_rule("window", layer, 0) or 0)

    def kv_elements(self, layer: int) -> int:
        """KV-cache elements per token of attention layer LAYER: the family's ``cache.kv_elements`` rule
        (layers of different shapes, layers that share another's cache) or ``kv_elements_per_layer``."""
        return int(self._cache_rule("kv_elements", layer, self.fields["kv_elements_per_layer"]))

    @cached_property
    def state_layers(self) -> list[int]:
        """Layers that keep a fixed-size state per sequence instead (Mamba, linear attention)."""
        return [i for i in range(self.num_layers) if self._cache_rule("state_layer", i, False)]

    @cached_property
    def state_elements_per_layer(self) -> int | None:
        """Elements of one state layer's fixed state per sequence (convolution window plus recurrent state),
        where the family describes it."""
        rule = (self.family.spec.get("cache") or {}).get("state_elements")
        return None if rule is None else int(evaluate(rule, self.names))


class Family:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name: str = spec["name"]

    def __repr__(self) -> str:
        return f"Family({self.name})"

    @property
    def description(self) -> str:
        return self.spec.get("description", "")

    @property
    def transformers_model_type(self) -> str:
        return self.spec.get("transformers_model_type", self.name)

    @property
    def level(self) -> str:
        """"curated" (a moetool/families/*.json) or "derived" (from transformers' model)."""
        return self.spec.get("level", "curated")

    @property
    def mtp_prefixes(self) -> tuple[str, ...]:
        """Name prefixes of multi-token-prediction weights kept apart from the model's layers (Qwen3-Next's
        ``mtp.``): not part of the model transformers builds; counted as MTP parameters, dropped by surgery."""
        return tuple(self.spec.get("mtp_prefixes", ()))

    def is_mtp_name(self, name: str) -> bool:
        return bool(self.mtp_prefixes) and name.startswith(self.mtp_prefixes)

    @property
    def runtime_layouts(self) -> list[dict]:
        return self.spec["runtime"]["layouts"]

    @property
    def unpadded(self) -> str | None:
        """Why the model must see one sequence at a time (padding changes its results), or None."""
        return self.spec["runtime"].get("unpadded")

    @property
    def layerwise_unsupported(self) -> str | None:
        """Why the model cannot run one decoder layer at a time (--stream, heal), or None."""
        return self.spec["runtime"].get("layerwise_unsupported")

    @property
    def heal_unsupported(self) -> str | None:
        """Why heal cannot repair the model's MoE blocks (it calls each block with hidden states alone), or None."""
        return self.spec["runtime"].get("heal_unsupported")

    @property
    def stream_unsupported(self) -> str | None:
        """Why the layer reader cannot build the model's layers from its checkpoint (--stream only: the model runs
        layer by layer in memory, as heal does), or None."""
        return self.spec["runtime"].get("stream_unsupported")

    def resolve(self, config: dict) -> ResolvedConfig:
        from moetool.families.validate import resolve_validated  # every field moetool uses, checked

        return resolve_validated(self, config)

    # -- tensor enumeration -------------------------------------------------------------
    def _expand(self, group: str, rc: ResolvedConfig, layer: int | None, expert: int | None, mtp: bool):
        scope = {**rc.names, "L": layer, "E": expert}
        for spec in self.spec["tensors"].get(group, []):
            if "when" in spec and not evaluate(spec["when"], scope):
                continue
            shape = tuple(int(evaluate(d, scope)) for d in spec["shape"])
            name = spec["name"].replace("{L}", str(layer)).replace("{E}", str(expert))
            yield TensorInfo(name, shape, spec["role"], layer, expert, mtp, spec)

    def layer_tensors(self, rc: ResolvedConfig, layer: int, mtp: bool = False) -> Iterator[TensorInfo]:
        yield from self._expand("layer", rc, layer, None, mtp)
        if rc.is_moe_layer(layer):
            yield from self._expand("moe_layer", rc, layer, None, mtp)
            # experts of a layer share shapes: evaluate the templates once, then rename
            first = list(self._expand("expert", rc, layer, 0, mtp))
            for e in range(rc.num_experts):
                for t in first:
                    name = t.spec["name"].replace("{L}", str(layer)).replace("{E}", str(e))
                    yield TensorInfo(name, t.shape, t.role, layer, e, mtp, t.spec)
        else:
            yield from self._expand("dense_layer", rc, layer, None, mtp)
        if mtp:
            yield from self._expand("mtp_layer", rc, layer, None, mtp)

    def tensor_groups(self, rc: ResolvedConfig, include_mtp: bool = False) -> Iterator[tuple[TensorInfo, int]]:
        """Like ``tensors`` but each expert template once per layer with its multiplicity:
        the same totals without materialising every expert tensor (DeepSeek-V3 has ~45k)."""
        yield from ((t, 1) for t in self._expand("model", rc, None, None, False))
        layers = [(i, False) for i in range(rc.num_layers)]
        if include_mtp:
            layers += [(rc.num_layers + i, True) for i in range(rc.mtp_layers)]
        for layer, mtp in layers:
            yield from ((t, 1) for t in self._expand("layer", rc, layer, None, mtp))
            if rc.is_moe_layer(layer):
                yield from ((t, 1) for t in self._expand("moe_layer", rc, layer, None, mtp))
                yield from ((t, rc.num_experts) for t in self._expand("expert", rc, layer, 0, mtp))
            else:
                yield from ((t, 1) for t in self._expand("dense_layer", rc, layer, None, mtp))
            if mtp:
                yield from ((t, 1) for t in self._expand("mtp_layer", rc, layer, None, mtp))

    def tensors(self, rc: ResolvedConfig, include_mtp: bool = False) -> Iterator[TensorInfo]:
        """Every tensor of the main model (and optionally the MTP layers), in on-disk names."""
        yield from self._expand("model", rc, None, None, False)
        for layer in range(rc.num_layers):
            yield from self.layer_tensors(rc, layer)
        if include_mtp:
            for i in range(rc.mtp_layers):
                yield from self.layer_tensors(rc, rc.num_layers + i, mtp=True)

    # -- name classification --------------------------------------------------------------
    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern, str, str, dict]]:
        templates = [t for group in self.spec["tensors"].values() for t in group]
        templates += self.spec.get("aliases", [])
        out = []
        for t in templates:
            rx = re.escape(t["name"]).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
            out.append((re.compile(rx + "$"), t["role"], t["name"], t))
        return out

    def classify(self, name: str, rc: ResolvedConfig | None = None) -> Match | None:
        """What tensor NAME is. Where one name has different roles by layer (Kimi Linear's ``self_attn.q_proj`` is
        MLA attention in some layers and linear attention in others), RC picks the template whose ``when`` holds
        for that layer; without RC the first template that matches the name."""
        first = None
        for rx, role, template, spec in self._patterns:
            m = rx.match(name)
            if not m:
                continue
            groups = m.groupdict()
            layer = int(groups["L"]) if groups.get("L") is not None else None
            expert = int(groups["E"]) if groups.get("E") is not None else None
            found = Match(role, layer, expert, template)
            if rc is None or "when" not in spec:
                return found
            try:
                holds = evaluate(spec["when"], {**rc.names, "L": layer, "E": expert})
            except Exception:  # a condition that does not apply to this name (no layer): not this template
                holds = False
            if holds:
                return found
            first = first or found
        return first


@lru_cache(maxsize=1)
def all_families() -> dict[str, Family]:
    out = {}
    for path in sorted(Path(__file__).parent.glob("*.json")):
        spec = json.loads(path.read_text())
        out[spec["name"]] = Family(spec)
    return out


# model_types that are known dense language models: a clear "dense, not MoE" error beats
# "unknown family" for the most common mistake.
DENSE_MODEL_TYPES = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi", "phi3",
    "gpt2", "gpt_neox", "olmo", "olmo2", "falcon", "starcoder2", "opt", "bloom", "gptj", "cohere",
}


def family_for_config(config: dict) -> Family:
    """Pick the family by ``model_type``, then by ``architectures`` (remote-code checkpoints)."""
    families = all_families().values()
    model_type = config.get("model_type")
    for fam in families:
        if model_type in fam.spec["model_types"]:
            return fam
    for arch in config.get("architectures") or []:
        for fam in families:
            if arch in fam.spec["architectures"]:
                return fam
    if model_type in DENSE_MODEL_TYPES:
        raise MoetoolError(f"'{model_type}' is a dense model, not a mixture of experts")
    if model_type:
        return derived_family(config)
    known = ", ".join(sorted(f.name for f in families))
    what = (config.get("architectures") or ["?"])[0]
    raise MoetoolError(f"unsupported model family '{what}' (known: {known}; a config.json without model_type "
                       "cannot be derived from transformers)")


def derived_family(config: dict) -> Family:
    """The family derived from transformers' own model for CONFIG (cached; see moetool.families.derive)."""
    from moetool.families.derive import derived_spec, transformers_available

    if not transformers_available():
        known = ", ".join(sorted(all_families()))
        raise MoetoolError(f"unsupported model family '{config.get('model_type')}' (curated: {known}; other "
                           "families are derived from transformers, which is not installed)")
    return Family(derived_spec(config))
