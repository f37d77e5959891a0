"""Read safetensors headers without touching tensor data.

A safetensors file starts with an 8-byte little-endian header length and a JSON header that
names every tensor with its dtype, shape and byte range; reading those bytes is enough to
count a checkpoint of any size exactly.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from moetool.errors import MoetoolError

# bytes per element; F4 packs two values per byte
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
    "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8, "F4": 0.5,
}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str  # the file's name (the index's weight_map value)
    offset: int  # absolute byte offset of the tensor's data in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[list[HeaderEntry], dict]:
    """Entries and ``__metadata__`` of one safetensors file; corrupt input -> MoetoolError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MoetoolError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise MoetoolError(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
            raw = fh.read(n)
    except OSError as exc:
        raise MoetoolError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoetoolError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise MoetoolError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MoetoolError(f"{path}: corrupt safetensors header (bad entry for '{name}')") from None
        if dtype not in DTYPE_BYTES:
            raise MoetoolError(f"{path}: unknown dtype '{dtype}' for '{name}'")
        nbytes = end - begin
        if begin < 0 or end > data_len or nbytes != math.ceil(math.prod(shape) * DTYPE_BYTES[dtype]):
            raise MoetoolError(
                f"{path}: corrupt or truncated safetensors file ('{name}' spans bytes {begin}-{end} "
                f"of {data_len})"
            )
        entries.append(HeaderEntry(name, dtype, shape, nbytes, path.name, 8 + n + begin))
    return entries, metadata


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from its index if it has one, else by glob."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        from moetool.checkpoint.source import read_json

        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MoetoolError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise MoetoolError(f"{index} lists {missing[0]}, which is missing ({len(missing)} missing in all)")
        return [directory / f for f in files]
    return sorted(directory.glob("*.safetensors"))


def read_checkpoint_headers(directory: Path) -> list[HeaderEntry]:
    entries: list[HeaderEntry] = []
    for path in checkpoint_files(directory):
        entries.extend(read_header(path)[0])
    return entries
