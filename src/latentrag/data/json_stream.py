"""Streaming reads of large JSON files: the elements of one array, one at a time.

DPR's retriever files and SQuAD files are single JSON documents (an array of questions;
an object whose ``data`` array holds the articles) that can be gigabytes long. `iter_array`
reads them in chunks and decodes one element at a time, so memory holds one element (plus
a read buffer), never the file. Errors are `DataError`s naming the file and line.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import IO, Any

from latentrag.data.readers import DataError, PathLike, json_error, no_duplicate_keys

CHUNK = 1 << 16
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder(object_pairs_hook=no_duplicate_keys)


class _Text:
    """A UTF-8 file decoded in chunks: `buf` holds the unread text from `pos` on."""

    def __init__(self, handle: IO[bytes], path: PathLike) -> None:
        self.handle, self.path = handle, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos = "", 0
        self.base_line = 1  # line number of buf[0]
        self.bytes_read = 0
        self.eof = False

    def line(self, index: int | None = None) -> int:
        index = self.pos if index is None else index
        return self.base_line + self.buf.count("\n", 0, index)

    def more(self, size: int = CHUNK) -> bool:
        """Read at least `size` more bytes (False at the end of the file)."""
        if self.eof:
            return False
        self.base_line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :], 0
        raw = self.handle.read(size)
        try:
            self.buf += self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as err:
            message = f"invalid UTF-8 at byte {self.bytes_read + err.start}"
            raise DataError(self.path, message, self.line(len(self.buf))) from None
        self.bytes_read += len(raw)
        self.eof = not raw
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, allowed: str, what: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            found = repr(char) if char else "the end of the file"
            message = f"malformed JSON: expected {what}, found {found}"
            raise DataError(self.path, message, self.line())
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode the JSON value starting at the next non-blank character."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if _truncated(err, len(self.buf)) and self.more(max(CHUNK, len(self.buf))):
                    continue  # the value goes on past the buffer
                raise json_error(self.path, err, self.line(err.pos), err.pos) from None
            except (ValueError, RecursionError) as err:
                raise json_error(self.path, err, self.line()) from None
            cut = end == len(self.buf) and not isinstance(value, (dict, list, str))
            if cut and self.more():  # a number or literal the buffer's end may have cut
                continue
            self.pos = end
            return value


def _truncated(err: json.JSONDecodeError, size: int) -> bool:
    """Whether the decode error may only mean that the buffer ends inside the value."""
    return err.pos >= size - 16 or err.msg.startswith("Unterminated string")


def iter_array(path: PathLike, key: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line, element) for each element of the file's top-level array, or of the array under
    `key` in its top-level object; other keys of that object are decoded and dropped."""
    with open(path, "rb") as handle:
        text = _Text(handle, path)
        if key is None:
            yield from _elements(text)
        else:
            yield from _keyed(text, key)
        if text.peek():
            raise DataError(path, "malformed JSON: extra data after the document", text.line())


def _elements(text: _Text) -> Iterator[tuple[int, Any]]:
    text.expect("[", "'['")
    if text.peek() == "]":
        text.pos += 1
        return
    while True:
        text.peek()
        line = text.line()
        yield line, text.value()
        if text.expect(",]", "',' or ']'") == "]":
            return


def _keyed(text: _Text, key: str) -> Iterator[tuple[int, Any]]:
    text.expect("{", "'{'")
    found = False
    if text.peek() == "}":
        text.pos += 1
    else:
        while True:
            name = text.value()
            if not isinstance(name, str):
                raise DataError(text.path, "malformed JSON: expected a key", text.line())
            text.expect(":", "':'")
            if name == key and text.peek() == "[":
                found = True
                yield from _elements(text)
            else:
                text.value()
            if text.expect(",}", "',' or '}'") == "}":
                break
    if not found:
        raise DataError(text.path, f"top level: missing field {key!r} (a JSON array)")
