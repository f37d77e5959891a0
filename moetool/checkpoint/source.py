"""Resolve what the user named (preset, config.json, checkpoint directory, cached Hub id)
into a config dict and, where there is one, a local checkpoint directory. No torch."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from moetool.errors import MoetoolError

PRESET_DIR = Path(__file__).parent.parent / "families" / "presets"


@dataclass
class ModelSource:
    name: str  # what the user typed
    kind: str  # "preset" | "config" | "checkpoint"
    config: dict  # the language-model config (unwrapped from text_config where needed)
    path: Path | None = None  # checkpoint directory, if any
    preset: dict | None = None  # preset metadata (repo, published figures)
    wrapper: str | None = None  # model_type of a multimodal wrapper we unwrapped


@lru_cache(maxsize=1)
def presets() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(PRESET_DIR.glob("*.json"))}


def preset_names() -> dict[str, str]:
    """Every accepted name (including aliases) -> canonical preset name."""
    names = {}
    for name, preset in presets().items():
        names[name] = name
        for alias in preset.get("aliases", []):
            names[alias] = name
    return names


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def find_in_hf_cache(repo_id: str, revision: str = "main") -> Path | None:
    """A snapshot directory of ``repo_id`` in the local Hugging Face cache, never downloading."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return snaps[0] if snaps else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoetoolError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise MoetoolError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise MoetoolError(f"{path}: expected a JSON object")
    return data


def unwrap_text_config(config: dict) -> tuple[dict, str | None]:
    """Multimodal wrappers keep the language model under ``text_config``."""
    from moetool.families import all_families

    known = {t for f in all_families().values() for t in f.spec["model_types"]}
    text = config.get("text_config")
    if isinstance(text, dict) and config.get("model_type") not in known:
        inner = dict(text)
        # the wrapper's dtype/tie flags apply when the inner config does not say
        for key in ("tie_word_embeddings", "torch_dtype", "dtype"):
            if key not in inner and key in config:
                inner[key] = config[key]
        return inner, config.get("model_type")
    return config, None


def resolve(model: str) -> ModelSource:
    """Turn a user's MODEL argument into a ModelSource (offline, never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise MoetoolError(f"{path}: no config.json in this directory")
        config, wrapper = unwrap_text_config(read_json(cfg_path))
        return ModelSource(model, "checkpoint", config, path, wrapper=wrapper)
    if path.is_file():
        config, wrapper = unwrap_text_config(read_json(path))
        return ModelSource(model, "config", config, wrapper=wrapper)
    names = preset_names()
    if model.lower() in names:
        preset = presets()[names[model.lower()]]
        return ModelSource(model, "preset", dict(preset["config"]), preset=preset)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        snap = find_in_hf_cache(model)
        if snap is not None:
            return resolve(str(snap)) if (snap / "config.json").is_file() else _missing_config(model, snap)
        raise MoetoolError(
            f"'{model}' is not a preset, a local path, or a Hub id in the local cache "
            f"({hf_cache_dir()}); moetool never downloads: fetch it first with `hf download {model}`"
        )
    close = difflib.get_close_matches(model.lower(), list(names), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `moetool params --list` shows the presets"
    if any(sep in model for sep in "/\\.") or model.endswith(".json"):
        raise MoetoolError(f"{model}: no such file or directory")
    raise MoetoolError(f"unknown preset '{model}'{hint}")


def _missing_config(model: str, snap: Path):
    raise MoetoolError(f"{model}: cached snapshot {snap} has no config.json")
