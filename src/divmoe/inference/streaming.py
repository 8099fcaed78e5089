"""Bytes to text as they arrive: a byte-level model emits UTF-8 one byte at a time, and a
character of 2-4 bytes is printable only once all of them are there."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """``feed(bytes)`` returns the text completed so far (a partial character waits for its
    remaining bytes); bytes that are not valid UTF-8 become U+FFFD, never an exception."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def finish(self) -> str:
        """The text of a character left incomplete at the end (as U+FFFD)."""
        return self._decoder.decode(b"", final=True)
