"""What every command that reads weights checks first, from the safetensors headers alone (no
tensor data, no torch): the weights are safetensors (pickles only when asked for), every file
the index names is there and sound, and every tensor the model needs is present.

``check_weights`` is the one entry point (trace, eval, distill and calibration through
``moetool.runtime.loading.load_model``; prune and merge-experts through ``moetool.compression.surgery.Checkpoint``).
Which tensors a model needs comes from its family (``Family.tensors(rc)``: the family spec's
templates, or whatever a derived family enumerates), so the check works for every family.
"""

from __future__ import annotations

from pathlib import Path

from moetool.errors import MoetoolError
from moetool.checkpoint.safetensors_header import HeaderEntry, checkpoint_files, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
PACKED_SUFFIXES = ("_blocks", "_scales")  # MXFP4: a fused expert tensor stored as blocks + scales
SHOWN = 3  # missing tensors named in the message; the rest are counted


def pickled_files(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    except OSError:
        return []


def read_entries(name: str, files: list[Path]) -> dict[str, HeaderEntry]:
    """Every tensor's header entry, by name, over FILES (each header validated)."""
    entries: dict[str, HeaderEntry] = {}
    for path in files:
        for ent in read_header(path)[0]:
            if ent.name in entries:
                raise MoetoolError(f"{name}: tensor {ent.name} is in both {entries[ent.name].file} and {path.name}")
            entries[ent.name] = ent
    return entries


def _shown(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def missing_tensors(rc, entries: dict[str, HeaderEntry] | set[str]) -> tuple[list[str], list[tuple[str, tuple, tuple]]]:
    """(missing names, [(name, shape on disk, shape the config gives)]) of the main model
    (multi-token-prediction layers are optional: transformers does not load them).

    A tensor is present under its own name, as a packed companion (gpt-oss MXFP4
    ``..._blocks``/``..._scales``), or in the family's alias layout for its layer and role
    (transformers-5 fused experts ``mlp.experts.gate_up_proj`` instead of per-expert tensors).
    Shapes are compared for float tensors only (quantized ones are packed)."""
    fam = rc.family
    present = set(entries)
    stems = {n[: -len(s)] for n in present for s in PACKED_SUFFIXES if n.endswith(s)}
    alias_templates = {a["name"] for a in fam.spec.get("aliases", [])} if hasattr(fam, "spec") else set()
    alias_layout: set[tuple] = set()
    if alias_templates:
        for n in present:
            m = fam.classify(n)
            if m is not None and m.template in alias_templates:
                alias_layout.add((m.layer, m.role))
    missing: list[str] = []
    mismatched: list[tuple[str, tuple, tuple]] = []
    for t in fam.tensors(rc):
        if t.name in present:
            if isinstance(entries, dict):
                ent = entries[t.name]
                if ent.dtype in FLOAT_DTYPES and tuple(ent.shape) != tuple(t.shape):
                    mismatched.append((t.name, tuple(ent.shape), tuple(t.shape)))
            continue
        if t.name in stems or (t.layer, t.role) in alias_layout:
            continue
        missing.append(t.name)
    return missing, mismatched


def check_complete(name: str, rc, entries: dict[str, HeaderEntry]) -> None:
    """A one-line MoetoolError naming what is missing (first few + count) or misshapen."""
    missing, mismatched = missing_tensors(rc, entries)
    if missing:
        raise MoetoolError(
            f"{name}: incomplete checkpoint: {len(missing)} tensor{'s' if len(missing) > 1 else ''} the "
            f"{rc.family.name} config needs {'are' if len(missing) > 1 else 'is'} missing: {_shown(missing)} "
            "(moetool never runs or writes a model with missing weights)")
    if mismatched:
        n, got, want = mismatched[0]
        more = f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise MoetoolError(f"{name}: {n} has shape {list(got)} on disk, the config gives {list(want)}{more}")


def check_weights(name: str, path: str | Path, rc, allow_pickle: bool = False) -> dict[str, HeaderEntry] | None:
    """The check every command that reads weights runs before anything expensive.

    Returns the header entries of the safetensors files (complete, sound); None only for a
    pickle-only checkpoint with ALLOW_PICKLE (then transformers' own load report is the check:
    ``moetool.runtime.loading`` treats missing or unexpected keys as an error)."""
    path = Path(path)
    files = checkpoint_files(path)  # an index naming a missing shard is refused here
    if not files:
        pickles = pickled_files(path)
        if pickles and not allow_pickle:
            raise MoetoolError(f"{name}: only pickled weights ({pickles[0]}); moetool reads safetensors and never "
                               "unpickles unless asked (--allow-pickle, loaded with torch's weights_only)")
        if pickles:
            return None
        raise MoetoolError(f"{name}: no weights in {path} (no .safetensors files)")
    entries = read_entries(name, files)
    check_complete(name, rc, entries)
    return entries


def check_model(model: str, allow_pickle: bool = False, what: str = "run"):
    """Resolve MODEL (checkpoint directory or cached Hub id) and ``check_weights`` it: for a
    command that checks every model it will read before loading the first. Returns
    (source, rc)."""
    from moetool.families.resolve import resolve_family
    from moetool.checkpoint.source import resolve

    source = resolve(model)
    rc = resolve_family(source)
    if source.kind != "checkpoint" or source.path is None:
        raise MoetoolError(f"{model}: a {source.kind} has no weights to {what}; give a checkpoint directory "
                           "or a cached Hub id")
    check_weights(model, source.path, rc, allow_pickle=allow_pickle)
    return source, rc


def check_if_checkpoint(model: str, source, rc) -> None:
    """For commands that also take presets and configs (plan): when MODEL is a checkpoint with
    safetensors files, it must be complete (its sizes are read from those headers)."""
    if source.kind != "checkpoint" or source.path is None:
        return
    files = checkpoint_files(Path(source.path))
    if files:
        check_complete(model, rc, read_entries(model, files))
