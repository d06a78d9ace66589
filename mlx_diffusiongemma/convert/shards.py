"""The output shards of a conversion on disk: where each tensor goes, positioned writes into preallocated
files, kernel-side copies of unchanged bytes, and the final names and index."""

from __future__ import annotations

import json
import os
from pathlib import Path

CHUNK_BYTES = 64 * 1024**2  # source bytes read, cast and quantized at a time




class Out:
    """One output tensor: its place in the output shards."""

    __slots__ = ("key", "code", "shape", "nbytes", "shard", "offset")

    def __init__(self, key: str, code: str, shape: tuple, nbytes: int):
        self.key, self.code, self.shape, self.nbytes = key, code, shape, nbytes
        self.shard, self.offset = 0, 0


def plan_shards(units: list, cap: int) -> list[list[Out]]:
    """Assign every output tensor (of each unit's `outs`) to a shard (a new one when adding it would pass `cap`) and an offset."""
    shards: list[list[Out]] = [[]]
    used = 0
    for unit in units:
        for out in unit.outs:
            if shards[-1] and used + out.nbytes > cap:
                shards.append([])
                used = 0
            out.shard, out.offset = len(shards) - 1, used
            shards[-1].append(out)
            used += out.nbytes
    return shards if shards[0] else []


def _header(outs: list[Out]) -> bytes:
    """A safetensors header (length prefix included), padded with spaces so the data starts 8-aligned."""
    header = {"__metadata__": {"format": "mlx"}}
    for out in outs:
        header[out.key] = {"dtype": out.code, "shape": list(out.shape),
                           "data_offsets": [out.offset, out.offset + out.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_range(src_fd: int, dst_fd: int, n: int, src_off: int, dst_off: int, buf: bytearray) -> None:
    """Copy n bytes between files at the given offsets (in the kernel where it can)."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while n and copy_file_range is not None:
        try:
            done = copy_file_range(src_fd, dst_fd, min(n, CHUNK_BYTES), src_off, dst_off)
        except OSError:
            break  # not supported between these files: copy through user space
        if done == 0:
            break
        n, src_off, dst_off = n - done, src_off + done, dst_off + done
    while n:
        chunk = min(n, len(buf))
        read_exact(src_fd, memoryview(buf)[:chunk], src_off)
        _pwrite(dst_fd, memoryview(buf)[:chunk], dst_off)
        n, src_off, dst_off = n - chunk, src_off + chunk, dst_off + chunk


class ReadError(Exception):
    """A source shard could not be read (the message says why)."""


def read_exact(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        try:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[got:]], offset + got)
            else:
                data = os.pread(fd, len(view) - got, offset + got)
                n = len(data)
                view[got : got + n] = data
        except OSError as e:
            raise ReadError(e.strerror or str(e)) from None
        if n == 0:
            raise ReadError("it ended early")
        got += n


class ShardFiles:
    """Output shards `model-XXXXX.partial.safetensors`, opened (header written) on first use."""

    def __init__(self, folder: Path, shards: list[list[Out]]):
        self.folder, self.shards = folder, shards
        self.fds: dict[int, int] = {}
        self.starts: dict[int, int] = {}  # shard -> where its data begins (after the header)

    def path(self, i: int) -> Path:
        return self.folder / f"model-{i + 1:05d}.partial.safetensors"

    def fd(self, i: int) -> int:
        if i not in self.fds:
            header = _header(self.shards[i])
            fd = os.open(self.path(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds[i] = fd
            _pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(o.nbytes for o in self.shards[i]))
            self.starts[i] = len(header)
        return self.fds[i]

    def write(self, out: Out, data, offset_in_tensor: int) -> None:
        fd = self.fd(out.shard)
        _pwrite(fd, data, self.starts[out.shard] + out.offset + offset_in_tensor)

    def close_before(self, i: int) -> None:
        """Close every shard before shard i (all their tensors are written)."""
        for j in [j for j in self.fds if j < i]:
            os.close(self.fds.pop(j))

    def close(self) -> None:
        self.close_before(len(self.shards) + 1)

    def finish(self) -> int:
        """Name the shards `model-XXXXX-of-YYYYY.safetensors`, write the index; return the total bytes."""
        self.close()
        n = len(self.shards)
        weight_map, total = {}, 0
        for i, outs in enumerate(self.shards):
            if i not in self.starts:
                self.fd(i)  # a shard of empty tensors only: still write its header
                self.close()
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self.path(i).rename(self.folder / name)
            weight_map.update({o.key: name for o in outs})
            total += sum(o.nbytes for o in outs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return total
