"""`moetool params`: counts equal transformers' own model and published figures."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from conftest import FIXTURES, assert_one_line_error, run_cli
from moetool.analysis.params import count_params, list_presets
from moetool.checkpoint.source import presets

PRESETS = sorted(presets())


def _transformers_count(config: dict, model_type: str) -> int:
    """Parameters (and persistent buffers, which checkpoints store) of transformers' own model,
    built on the meta device from the same config (its causal-LM class, as moetool.families.derive builds it), less the
    weights a family's published checkpoints do not have (tests/test_curated.py: NOT_COUNTED)."""
    from moetool.families.derive import build_meta_model, hf_config_for, meta_count
    from test_curated import NOT_COUNTED

    model = build_meta_model(hf_config_for({**config, "model_type": model_type}))
    return meta_count(model) - (NOT_COUNTED[model_type](model) if model_type in NOT_COUNTED else 0)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_equals_transformers_meta_model(name):
    from moetool.families import family_for_config

    config = presets()[name]["config"]
    report = count_params(name)
    family = family_for_config(config)
    assert report["total"] == _transformers_count(config, family.transformers_model_type)


def test_fixture_equals_transformers_meta_model(tiny_fixture):
    from moetool.families import family_for_config

    config = json.loads((tiny_fixture / "config.json").read_text())
    report = count_params(str(tiny_fixture))
    assert report["source"] == "checkpoint"
    assert report["warnings"] == []
    # zero experts' gate/up rows: in a save_pretrained checkpoint (and counted), not in published ones (NOT_COUNTED)
    unused = report.get("unused_expert_params", 0)
    assert report["total"] - unused == _transformers_count(config, family_for_config(config).transformers_model_type)


def test_fixture_disk_count_equals_config_count(tiny_fixture):
    config_only = count_params(str(tiny_fixture / "config.json"))
    disk = count_params(str(tiny_fixture))
    assert config_only["source"] == "config"
    disk["roles"]["routed_experts"]["total"] -= disk.get("unused_expert_params", 0)  # on disk only (zero experts)
    assert disk["roles"] == config_only["roles"]
    assert disk["active"] == config_only["active"]
    index = json.loads((tiny_fixture / "model.safetensors.index.json").read_text())
    assert disk["disk"]["files"] == len(set(index["weight_map"].values())) > 1
    assert disk["disk"]["bytes"] == index["metadata"]["total_size"]


def test_mixtral_published_figures():
    r = count_params("mixtral")
    assert r["total"] == 46_702_792_704
    assert r["memory"]["bf16"] == 93_405_585_408  # the bf16 index total_size
    assert round(r["active"] / 1e9, 1) == 12.9


@pytest.mark.parametrize(
    "name,total,active,tol",
    [
        ("deepseek-v3", 671e9, 37e9, 0.02),
        ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),
        ("olmoe-1b-7b", 6.9e9, 1.3e9, 0.02),
        ("gpt-oss-120b", 116.8e9, 5.7e9, 0.01),
        ("mixtral-8x22b", 141e9, 39e9, 0.01),
        ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, 0.01),
        ("deepseek-v2", 236e9, 21e9, 0.02),
        ("deepseek-v2-lite", 15.7e9, 2.6e9, 0.02),
        ("qwen3-235b-a22b", 235e9, 22e9, 0.01),
    ],
)
def test_published_figures(name, total, active, tol):
    r = count_params(name)
    assert abs(r["total"] - total) / total < tol
    assert abs(r["active"] - active) / active < 0.03


def test_gpt_oss_published_active_leaves_out_input_embedding():
    r = count_params("gpt-oss-120b")
    assert round(r["active"] / 1e9, 1) == 5.7
    assert round(r["active_without_embeddings"] / 1e9, 1) == 5.1
    assert "input embedding" in r["preset"]["published"]["convention"]


def test_deepseek_v3_mtp_reported_apart():
    r = count_params("deepseek-v3")
    assert r["total"] == 671_026_419_200
    # one MoE decoder layer plus enorm, hnorm, eh_proj, shared head and its own embedding
    assert 13.0e9 < r["mtp_params"] < 14.0e9
    assert r["total"] + r["mtp_params"] > 684e9  # the Hub repo's "685B"


def test_json_contract_fields():
    result = run_cli("params", "mixtral", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for field in ("total", "active", "mtp_params", "scale_params"):
        assert isinstance(data[field], int)
    assert set(data["roles"]) == {
        "embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms", "lm_head",
    }


def test_roles_sum_to_total_and_active():
    r = count_params("deepseek-v3", per_layer=True)
    assert sum(c["total"] for c in r["roles"].values()) == r["total"]
    assert sum(c["active"] for c in r["roles"].values()) == r["active"]
    assert len(r["layers"]) == 61
    assert [row["kind"] for row in r["layers"][:4]] == ["dense", "dense", "dense", "moe"]
    # every layer plus embeddings, final norm and head
    layer_sum = sum(row["total"] for row in r["layers"])
    assert layer_sum == r["total"] - r["roles"]["embeddings"]["total"] - r["roles"]["lm_head"]["total"] - 7168


def test_kv_cache_is_mla_aware():
    ds = count_params("deepseek-v3")["kv_cache_bytes_per_token"]
    assert ds["mla_compressed_bf16"] == 61 * (512 + 64) * 2
    mixtral = count_params("mixtral")["kv_cache_bytes_per_token"]
    assert mixtral["bf16"] == 32 * 2 * 8 * 128 * 2
    assert "mla_compressed_bf16" not in mixtral


def test_memory_estimates_ordered_and_4bit_overhead():
    r = count_params("mixtral")
    mem = r["memory"]
    assert mem["int4"] < mem["fp8"] < mem["bf16"]
    experts = r["roles"]["routed_experts"]["total"]
    # 4-bit NF4 with an fp32 absmax per 64 weights: 4.5 bits per expert weight, not 4
    assert mem["int4"] > experts * 4.5 / 8


def test_flops_per_token():
    r = count_params("mixtral", context=0)
    fl = r["flops_per_token"]
    assert fl["attention"] == 0
    expected = 2 * (r["active"] - r["roles"]["embeddings"]["total"] - r["roles"]["norms"]["total"])
    assert fl["matmul"] == expected


def test_list_presets_covers_required_names():
    names = {row["name"] for row in list_presets()}
    required = {
        "mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "qwen1.5-moe-a2.7b",
        "qwen3-30b-a3b", "qwen3-235b-a22b", "olmoe-1b-7b", "gpt-oss-20b", "gpt-oss-120b",
    }
    assert required <= names
    result = run_cli("params", "--list")
    assert result.returncode == 0 and "mixtral-8x7b" in result.stdout


def test_params_is_instant_and_does_not_import_torch():
    from conftest import params_without_torch

    result, wall = params_without_torch("mixtral")
    assert result.returncode == 0, result.stderr
    assert wall < 1.0, f"moetool params mixtral took {wall:.2f}s"


# --- checkpoints with quantized tensors, MTP layers, remote code, wrappers -----------------

def _write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]):
    """A valid safetensors file with zero-filled data, written by hand (header first)."""
    sizes = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def _fp8_checkpoint(tmp_path, extra_layers: int = 1):
    """A tiny DeepSeek-V3-shaped checkpoint stored in fp8 with scales and an MTP layer."""
    from moetool.families import family_for_config

    config = json.loads((FIXTURES / "tiny-deepseek-v3" / "config.json").read_text())
    config["num_nextn_predict_layers"] = extra_layers
    fam = family_for_config(config)
    rc = fam.resolve(config)
    tensors = {}
    for t in fam.tensors(rc, include_mtp=True):
        quantized = len(t.shape) == 2 and t.role in ("attention", "routed_experts", "shared_experts", "dense_mlp")
        tensors[t.name] = ("F8_E4M3" if quantized else "BF16", list(t.shape))
        if quantized:
            tensors[t.name + "_scale_inv"] = ("F32", [-(-t.shape[0] // 128), -(-t.shape[1] // 128)])
    out = tmp_path / "fp8-ckpt"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    _write_safetensors(out / "model.safetensors", tensors)
    return out, config


def test_fp8_scales_and_mtp_reported_apart(tmp_path):
    path, config = _fp8_checkpoint(tmp_path)
    r = count_params(str(path))
    reference = count_params(str(FIXTURES / "tiny-deepseek-v3"))
    assert r["total"] == reference["total"]
    assert r["scale_params"] > 0
    assert r["mtp_params"] == count_params(str(path / "config.json"))["mtp_params"] > 0
    assert set(r["disk"]["dtypes"]) == {"BF16", "F32", "F8_E4M3"}
    assert r["warnings"] == []


def test_mxfp4_blocks_count_two_params_per_byte(tmp_path):
    """gpt-oss ships experts as MXFP4: uint8 blocks (2 values a byte) plus uint8 scales."""
    from moetool.families import family_for_config

    config = dict(presets()["gpt-oss-20b"]["config"], num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                  num_local_experts=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=128,
                  layer_types=["full_attention"])
    fam = family_for_config(config)
    rc = fam.resolve(config)
    tensors = {}
    for t in fam.tensors(rc):
        if t.name.endswith(("gate_up_proj", "down_proj")):
            e, rows, cols = t.shape[0], t.shape[2], t.shape[1]  # stored transposed, 32 values per block
            tensors[t.name + "_blocks"] = ("U8", [e, rows, cols // 32, 16])
            tensors[t.name + "_scales"] = ("U8", [e, rows, cols // 32])
        else:
            tensors[t.name] = ("BF16", list(t.shape))
    out = tmp_path / "mxfp4"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    _write_safetensors(out / "model.safetensors", tensors)
    r = count_params(str(out))
    assert r["total"] == count_params(str(out / "config.json"))["total"]
    assert r["scale_params"] > 0 and r["warnings"] == []


def test_disk_config_disagreement_warns(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-mixtral", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 64  # disk has 48
    (ckpt / "config.json").write_text(json.dumps(config))
    r = count_params(str(ckpt))
    assert any("routed_experts" in w for w in r["warnings"])


def test_remote_code_model_type_resolved_by_architectures(tmp_path):
    config = json.loads((FIXTURES / "tiny-deepseek-v3" / "config.json").read_text())
    config["model_type"] = "my_remote_moe"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.DeepseekV3ForCausalLM"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    r = count_params(str(path))
    assert r["architecture"]["family"] == "deepseek_v3"
    assert r["total"] == count_params(str(FIXTURES / "tiny-deepseek-v3" / "config.json"))["total"]


def test_kimi_k2_is_a_deepseek_v3(tmp_path):
    r = count_params("kimi-k2")
    assert r["architecture"]["family"] == "deepseek_v3"
    assert abs(r["total"] - 1.04e12) / 1.04e12 < 0.02
    assert abs(r["active"] - 32e9) / 32e9 < 0.05


def test_multimodal_wrapper_text_config(tmp_path):
    inner = json.loads((FIXTURES / "tiny-qwen3-moe" / "config.json").read_text())
    wrapper = {"model_type": "some_vl_moe", "architectures": ["SomeVLForConditionalGeneration"],
               "text_config": inner, "vision_config": {"hidden_size": 16}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(wrapper))
    r = count_params(str(path))
    assert r["total"] == count_params(str(FIXTURES / "tiny-qwen3-moe" / "config.json"))["total"]
    assert any("text_config" in w for w in r["warnings"])


def test_hub_id_found_in_local_cache(tmp_path):
    import os

    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(FIXTURES / "tiny-olmoe", snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    result = run_cli("params", "acme/tiny-moe", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"] == count_params(str(FIXTURES / "tiny-olmoe"))["total"]
    missing = run_cli("params", "acme/not-cached", env=env)
    assert_one_line_error(missing, "never downloads")


# --- bad input: one line, non-zero exit, no traceback ---------------------------------------

def test_missing_path():
    assert_one_line_error(run_cli("params", "./no/such/dir"), "no such file")


def test_directory_without_config(tmp_path):
    assert_one_line_error(run_cli("params", str(tmp_path)), "no config.json")


def test_malformed_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert_one_line_error(run_cli("params", str(path)), "malformed JSON")


def test_dense_model(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    assert_one_line_error(run_cli("params", str(path)), "dense")


def test_moe_family_with_zero_experts_is_dense(tmp_path):
    config = json.loads((FIXTURES / "tiny-qwen3-moe" / "config.json").read_text())
    config["num_local_experts"] = 0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert_one_line_error(run_cli("params", str(path)), "dense")


def test_unknown_preset_suggests_close_names():
    assert_one_line_error(run_cli("params", "mixtrl"), "did you mean mixtral")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "huge-length", "bad-offsets"])
def test_corrupt_safetensors_header(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tiny-mixtral", ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        n = struct.unpack("<Q", data[:8])[0]
        shard.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    elif damage == "huge-length":
        shard.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    else:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        raw = json.dumps(header).encode().ljust(n)
        shard.write_bytes(data[:8] + raw[:n] + data[8 + n:])
    assert_one_line_error(run_cli("params", str(ckpt)), "safetensors")


def test_unsupported_family(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "not_a_model", "architectures": ["NotAModelForCausalLM"]}))
    assert_one_line_error(run_cli("params", str(path)), "unsupported model family")


def test_counting_never_reads_tensor_data(tmp_path, monkeypatch):
    """Headers only: reading a checkpoint reads a few KB however large the shards are."""
    import builtins

    read_bytes = 0
    real_open = builtins.open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            nonlocal read_bytes
            data = self.fh.read(n)
            read_bytes += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def counting_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return Counting(fh) if "b" in mode and str(path).endswith(".safetensors") else fh

    monkeypatch.setattr(builtins, "open", counting_open)
    count_params(str(FIXTURES / "tiny-mixtral"))
    total = sum(p.stat().st_size for p in (FIXTURES / "tiny-mixtral").glob("*.safetensors"))
    assert 0 < read_bytes < total / 5
