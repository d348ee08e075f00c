"""Where the last lines of a file begin, as `tail -n` counts them (standard library only)."""

from __future__ import annotations

import os
from typing import BinaryIO

BLOCK_BYTES = 64 * 1024


def start_of_last_lines(file: BinaryIO, lines: int) -> int:
    """The offset of the first of the last `lines` lines of a seekable binary file.

    A final line without its newline counts as a line, as in `tail -n`."""
    size = file.seek(0, os.SEEK_END)
    if lines <= 0 or size == 0:
        return size
    file.seek(size - 1)
    # A newline that ends the file closes the last line; it does not start another.
    wanted = lines + 1 if file.read(1) == b"\n" else lines
    end = size
    while end > 0:
        begin = max(0, end - BLOCK_BYTES)
        file.seek(begin)
        block = file.read(end - begin)
        position = len(block)
        while (position := block.rfind(b"\n", 0, position)) >= 0:
            wanted -= 1
            if wanted == 0:
                return begin + position + 1
        end = begin
    return 0
