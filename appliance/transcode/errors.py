"""The two ways a conversion ends without a result, told apart because a clinic treats them apart.

- `CannotConvert`: the target syntax cannot hold this image (an 8-bit codec
  for 12-bit data, a palette for a lossy codec, Big Endian, video). Routine:
  the object stays as received (INFO) or goes in another syntax.
- `ConversionRefused`: the conversion was tried and failed its check: the
  source stream is corrupt or mislabelled, a decoder rejected it, or the
  result does not give back the source's values. The original stays as
  received, the caller logs ONE WARNING naming the object and the reason,
  and the refusal is counted (`appliance status`, /metrics).
"""

from __future__ import annotations

import logging


class CannotConvert(Exception):
    """This object cannot be converted to that syntax; the message says why."""


class ConversionRefused(CannotConvert):
    """The conversion failed its check; the message says which and why (one line)."""


def one_line(text: object, limit: int = 300) -> str:
    """A reason fit for one log line: whitespace collapsed, control characters escaped.

    Decoder messages span lines and file text may hold anything: a log line
    must stay one line a field engineer can read.
    """
    words = " ".join(str(text).split())
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in words)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


class _CodecTracebacks(logging.Filter):
    """Drop the traceback pydicom logs at ERROR for each codec plugin that fails a frame.

    pydicom then raises one RuntimeError naming every plugin's failure, which
    the conversion turns into the one-line reason of its refusal: a corrupt
    stream is bad input, not a bug, and must not fill the journal with a
    libjpeg traceback per frame and per attempt.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info


for _codecs in ("pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base"):
    logging.getLogger(_codecs).addFilter(_CodecTracebacks())


__all__ = ["CannotConvert", "ConversionRefused", "one_line"]
