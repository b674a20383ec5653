"""What SQLite will drop from a write-ahead log: its torn or uncommitted tail.

SQLite's WAL recovery keeps the frames up to the last valid commit frame and silently ignores
the rest. To *say* what was lost we read only the frame headers (no checksums: SQLite checks
those) and compare with how many frames SQLite accepted (`mx_frame`, known after opening).
A frame past mx_frame that carries the header's salts belongs to this WAL generation: it is a
torn or unacknowledged transaction. Frames with other salts are stale leftovers of an earlier
generation (SQLite reuses the file after a checkpoint): normal, not a loss.

File format: https://www.sqlite.org/fileformat2.html#walformat (all fields big-endian).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

WAL_MAGIC = (0x377F0682, 0x377F0683)
HEADER = struct.Struct(">IIIIII")      # magic, version, page size, checkpoint seq, salt1, salt2
FRAME_HEADER = struct.Struct(">IIII")  # page number, db size after commit (0: not a commit), salts
WAL_HEADER_BYTES, FRAME_HEADER_BYTES = 32, 24


@dataclass
class WalScan:
    """The frame headers of one WAL file, read before SQLite opens it."""

    size: int = 0                       # bytes in the file
    frame_bytes: int = 0                # 24 + page size (0: no readable header)
    current: list[bool] | None = None   # per whole frame: carries this generation's salts

    def cut(self, mx_frame: int) -> tuple[int, int]:
        """(frames, bytes) of this generation past the mx_frame frames SQLite accepted."""
        if self.size == 0:
            return 0, 0
        if self.current is None:        # no readable header: SQLite ignores the whole file
            return 0, self.size
        frames = 0
        for cur in self.current[mx_frame:]:
            if not cur:                 # an older generation's leftovers start here
                return frames, frames * self.frame_bytes
            frames += 1
        tail = self.size - WAL_HEADER_BYTES - len(self.current) * self.frame_bytes
        return frames + (tail > 0), frames * self.frame_bytes + tail


def scan(wal: Path) -> WalScan:
    """Read the WAL's header and every frame header (24 bytes per page)."""
    if not wal.exists():
        return WalScan()
    size = wal.stat().st_size
    with open(wal, "rb") as f:
        head = f.read(WAL_HEADER_BYTES)
        if len(head) < WAL_HEADER_BYTES:
            return WalScan(size=size)
        magic, _version, page_size, _seq, salt1, salt2 = HEADER.unpack_from(head)
        if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
            return WalScan(size=size)
        frame_bytes = FRAME_HEADER_BYTES + page_size
        current = []
        for offset in range(WAL_HEADER_BYTES, size - frame_bytes + 1, frame_bytes):
            f.seek(offset)
            _page, _commit, s1, s2 = FRAME_HEADER.unpack(f.read(FRAME_HEADER.size))
            current.append((s1, s2) == (salt1, salt2))
    return WalScan(size, frame_bytes, current)


def wal_path(db: Path) -> Path:
    return Path(os.fspath(db) + "-wal")
