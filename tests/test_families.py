"""Family specs are data: check their shape, and the safe expression evaluator they use."""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from moetool.errors import MoetoolError
from moetool.families.expr import MissingField, evaluate
from moetool.families import ALL_ROLES, all_families, family_for_config

FAMILIES = sorted(all_families())
REQUIRED_FIELDS = {
    "num_layers", "hidden_size", "vocab_size", "num_experts", "top_k", "expert_intermediate",
    "num_shared_experts", "shared_intermediate", "tie_embeddings", "scoring", "kv_elements_per_layer",
    "attn_qk_width", "attn_v_width",
}


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_is_well_formed(name):
    spec = all_families()[name].spec
    assert spec["model_types"] and spec["architectures"]
    assert REQUIRED_FIELDS <= set(spec["fields"]), REQUIRED_FIELDS - set(spec["fields"])
    groups = spec["tensors"]
    assert set(groups) <= {"model", "layer", "moe_layer", "expert", "dense_layer", "mtp_layer"}
    for group, templates in groups.items():
        for t in templates:
            assert t["role"] in ALL_ROLES, (group, t)
            assert ("{E}" in t["name"]) == (group == "expert"), t["name"]
            assert ("{L}" in t["name"]) == (group != "model"), t["name"]
    routers = [t for t in groups["moe_layer"] if t["role"] == "router"]
    # every router tensor has one row per expert (or says it has none: Gemma 4's router.scale, one value per
    # hidden unit), or the family says why surgery is refused
    assert routers and (all(t.get("expert_rows") or t.get("expert_rows") is False for t in routers)
                        or spec.get("surgery", {}).get("unsupported"))
    for layout in spec["runtime"]["layouts"]:
        assert {"block", "router", "experts"} <= set(layout)


def test_every_family_has_a_fixture_or_preset():
    from moetool.checkpoint.source import presets

    covered = {family_for_config(p["config"]).name for p in presets().values()}
    covered |= {family_for_config(json.loads((p / "config.json").read_text())).name for p in TINY}
    assert covered == set(FAMILIES)


def test_every_template_name_classifies_back_to_its_role(tiny_fixture):
    config = json.loads((tiny_fixture / "config.json").read_text())
    fam = family_for_config(config)
    rc = fam.resolve(config)
    for t in fam.tensors(rc):
        match = fam.classify(t.name, rc)  # the config picks between templates sharing a name (Kimi Linear)
        assert match is not None and match.role == t.role and match.layer == t.layer and match.expert == t.expert


def test_transformers_5_fused_names_classify():
    fam = all_families()["mixtral"]
    assert fam.classify("model.layers.3.mlp.experts.gate_up_proj").role == "routed_experts"
    assert fam.classify("model.layers.3.mlp.gate.weight").role == "router"
    assert fam.classify("model.layers.3.block_sparse_moe.experts.7.w2.weight").expert == 7


def test_expression_evaluator():
    names = {"a": 3, "b": None, "xs": [1, 2]}
    assert evaluate("a * 2 + 1", names) == 7
    assert evaluate("b or a", names) == 3
    assert evaluate("a if 2 in xs else 0", names) == 3
    assert evaluate("(a + 1) // 2 == 2 and not b", names) is True
    with pytest.raises(MissingField):
        evaluate("c + 1", names)


@pytest.mark.parametrize("source", ["__import__('os').system('true')", "a.__class__", "(lambda: 1)()", "open('x')"])
def test_expression_evaluator_refuses_code(source):
    with pytest.raises((ValueError, MoetoolError)):
        evaluate(source, {"a": 1})
