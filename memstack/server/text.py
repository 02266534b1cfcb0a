"""Tokens to text as they are generated: incremental detokenization and stop strings.

`Detokenizer.push(token)` returns the new text the token completes. Byte-level tokenizers
(byte, GPT-2/BPE, SmolLM2) decode a sequence to the concatenation of its tokens' bytes, so
decoding a short window of recent tokens is exact; text is held back while it ends in an
incomplete UTF-8 character (U+FFFD), as vLLM and HF's TextStreamer do. Cost per token: one decode
of a few tokens, not of the whole output.

`StopMatcher` finds the first stop string in the text and holds back the tail that could still
become one, so a stop string never leaks into the output, streamed or not (OpenAI semantics:
the stop string itself is not returned).
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0        # window start: tokens before it are already text
        self._read = 0          # tokens up to here are already emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        done = self.tok.decode(self.ids[self._prefix:self._read])
        text = self.tok.decode(self.ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character is emitted as U+FFFD)."""
        done = self.tok.decode(self.ids[self._prefix:self._read])
        text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


class StopMatcher:
    """Text in, text out; stops at the first stop string (excluded)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of buffered text that can be emitted now."""
        if self.stopped:
            return ""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out
