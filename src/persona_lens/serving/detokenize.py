"""Text of a reply as its tokens arrive: the piece each token adds, and stop strings.

:class:`ReplyText` decodes incrementally (a token that ends inside a multi-byte character adds
its text with the next one) and holds back the end of the text that could still begin a stop
string, so streamed content never shows a stop string, and the finished content ends before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ReplyText:
    """The growing reply of one request."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` given out as content
        self.stopped = False
        self._prefix = 0
        self._read = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def push(self, token: int) -> tuple[str, str]:
        """Add a token; returns (the text this token added, content that is now final)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        piece = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece, self._content()

    def _content(self) -> str:
        if self.stopped:
            return ""
        start = max(0, self.sent - self._hold)
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(max(self.sent, len(self.text) - self._hold))

    def _release(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> str:
        """The content still held back when the reply ends without a stop string."""
        if self.stopped:
            return ""
        return self._release(len(self.text))
