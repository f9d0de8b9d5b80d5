"""Prompts and infilling templates -> per-row layouts of the decoders (pure; no files).

Template syntax (one string; text outside markers is kept verbatim and never changed):

  [[N]]   a span of exactly N tokens to fill (masked decoders: ancestral, threshold, fixed_k)
  [[*]]   a gap open to insertions (the insertion decoder, DID: how many tokens it receives
          emerges from the model, up to sample.capacity in all)
  \\[[     a literal "[["

  "The [[6]] sat on the [[2]]."      MDLM fills 6 tokens, then 2
  "The [[*]] sat on the [[*]]."      DID inserts only in those two gaps

Each piece of text is tokenized on its own (so a span boundary is also a token boundary), and
a BOS starts every row as in training. The same spans can be given as character ranges of a
text, `spans_to_template(text, [(start, end, n), ...])`, where the characters [start, end) are
replaced by a span of n tokens (n = None: an open gap for DID); ranges that overlap or go past
the text are refused, naming the span.

A prompt (prefix) is the template "prompt[[G]]" with G = sample.gen_len (MDLM) or
"prompt[[*]]" (DID).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np

_MARKER = re.compile(r"\\\[\[|\[\[(.*?)\]\]", re.S)


class TemplateError(ValueError):
  """A template or span list that cannot be filled; the message names the span."""


@dataclasses.dataclass(frozen=True)
class Span:
  """A marked span of a template.

  Attributes:
    index: 1-based position among the template's spans.
    marker: the marker as written, e.g. "[[8]]".
    length: tokens to fill, or None for an open gap (insertion decoder).
  """
  index: int
  marker: str
  length: Optional[int]

  def describe(self) -> str:
    return f"span {self.index} {self.marker!r}"


Part = Union[str, Span]


def parse_template(template: str) -> list[Part]:
  """Splits a template into text pieces and spans (see the module docstring).

  Raises:
    TemplateError: naming the first marker that is neither [[N]] (N >= 1) nor [[*]], or an
      unclosed "[[".
  """
  if not isinstance(template, str):
    raise TemplateError(f"a template must be a string, got {type(template).__name__}")
  parts: list[Part] = []
  text, pos, n_spans = [], 0, 0
  for m in _MARKER.finditer(template):
    text.append(template[pos:m.start()])
    pos = m.end()
    if m.group(0) == "\\[[":
      text.append("[[")
      continue
    n_spans += 1
    body = m.group(1).strip()
    if body == "*":
      length = None
    elif body.isdigit() and int(body) >= 1:
      length = int(body)
    else:
      raise TemplateError(f"span {n_spans} {m.group(0)!r}: write [[N]] (N >= 1 tokens to fill) "
                          "or [[*]] (a gap open to insertions); for a literal '[[' write '\\[['.")
    if text:
      parts.append("".join(text))
      text = []
    parts.append(Span(n_spans, m.group(0), length))
  rest = template[pos:]
  if "[[" in rest:
    raise TemplateError(f"unclosed '[[' at character {pos + rest.index('[[')} of the template; "
                        "close it with ']]' or write '\\[[' for a literal '[['.")
  text.append(rest)
  if "".join(text):
    parts.append("".join(text))
  return [p for p in parts if not (isinstance(p, str) and p == "")]


def spans_to_template(text: str, spans: Sequence[tuple[int, int, Optional[int]]]) -> list[Part]:
  """Parts from a text and character ranges [start, end) replaced by spans of n tokens.

  Raises:
    TemplateError: a range past the text, empty or reversed, or overlapping another (named by
      its index in `spans`, 1-based, and its range).
  """
  order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
  parts: list[Part] = []
  pos, prev = 0, None
  for i in order:
    start, end, n = spans[i]
    name = f"span {i + 1} ({start}, {end})"
    if not 0 <= start <= end <= len(text):
      raise TemplateError(f"{name} exceeds the text: characters must lie in [0, {len(text)}].")
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
      raise TemplateError(f"{name}: the number of tokens to fill must be >= 1 (or None for an "
                          f"open gap), got {n!r}.")
    if prev is not None and start < spans[prev][1]:
      raise TemplateError(f"{name} overlaps span {prev + 1} {tuple(spans[prev][:2])}.")
    if prev is not None and start == spans[prev][1] == spans[prev][0] == end:
      raise TemplateError(f"{name} marks the same gap as span {prev + 1}.")
    if text[pos:start]:
      parts.append(text[pos:start])
    parts.append(Span(len([p for p in parts if isinstance(p, Span)]) + 1,
                      "[[*]]" if n is None else f"[[{int(n)}]]", None if n is None else int(n)))
    pos, prev = end, i
  if text[pos:]:
    parts.append(text[pos:])
  return parts


@dataclasses.dataclass
class MaskedRow:
  """One row for a masked decoder: token ids (BOS first), fill flags, and the fill positions of
  each span (index -> positions)."""
  ids: list[int]
  fill: list[bool]
  spans: dict[int, list[int]]


@dataclasses.dataclass
class GapRow:
  """One row for the insertion decoder: given ids (no BOS) and, per gap (after BOS, then after
  each id), the span id open there (0 = closed)."""
  ids: list[int]
  open: list[int]


def masked_row(parts: Sequence[Part], encode: Callable[[str], Sequence[int]], bos_id: int,
               mask_id: int, max_len: int) -> MaskedRow:
  """The row of a masked decoder for a parsed template.

  Raises:
    TemplateError: an open gap [[*]] (masked decoders need the span's length), a template
      without spans, or a row longer than `max_len` (naming the span that passes it, or the
      text when no span does).
  """
  ids, fill, spans = [bos_id], [False], {}
  for part in parts:
    if isinstance(part, str):
      piece = list(encode(part))
      ids += piece
      fill += [False] * len(piece)
      continue
    if part.length is None:
      raise TemplateError(f"{part.describe()}: the masked decoders fill spans of a given number "
                          "of tokens; write [[N]] (N >= 1) instead of [[*]].")
    start = len(ids)
    if start + part.length > max_len:
      raise TemplateError(f"{part.describe()} would end at token {start + part.length}, past the "
                          f"model's length {max_len} (BOS and the text before it included); "
                          "shorten the span or the text.")
    spans[part.index] = list(range(start, start + part.length))
    ids += [mask_id] * part.length
    fill += [True] * part.length
  if not spans:
    raise TemplateError("the template has no span to fill: mark one with [[N]].")
  if len(ids) > max_len:
    raise TemplateError(f"the template's text makes the row {len(ids)} tokens long, past the "
                        f"model's length {max_len}; shorten the text after the last span.")
  return MaskedRow(ids=ids, fill=fill, spans=spans)


def gap_row(parts: Sequence[Part], encode: Callable[[str], Sequence[int]],
            capacity: int) -> GapRow:
  """The row of the insertion decoder for a parsed template.

  Raises:
    TemplateError: a span with a length ([[N]]: DID inserts as many tokens as it draws), two
      spans in the same gap, no span, or given text that leaves no room within `capacity`.
  """
  ids: list[int] = []
  open_: list[int] = [0]
  for part in parts:
    if isinstance(part, str):
      piece = list(encode(part))
      ids += piece
      open_ += [0] * len(piece)
      continue
    if part.length is not None:
      raise TemplateError(f"{part.describe()}: the insertion decoder (DID) decides how many tokens "
                          "go into a gap; write [[*]] instead of a length.")
    if open_[-1]:
      raise TemplateError(f"{part.describe()} marks the same gap as span {open_[-1]}; one marker "
                          "per gap.")
    open_[-1] = part.index
  if not any(open_):
    raise TemplateError("the template has no gap to fill: mark one with [[*]].")
  if len(ids) >= capacity:
    raise TemplateError(f"the template's text has {len(ids)} tokens, leaving no room within "
                        f"sample.capacity={capacity}; raise sample.capacity or shorten the text.")
  return GapRow(ids=ids, open=open_)


def prefix_parts(prompt: str, gen_len: Optional[int]) -> list[Part]:
  """A prompt as a template: the text, then a span of gen_len tokens (None: an open gap)."""
  marker = "[[*]]" if gen_len is None else f"[[{int(gen_len)}]]"
  return ([prompt] if prompt else []) + [Span(1, marker, gen_len)]
