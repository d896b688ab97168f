"""Readers of the public preference datasets, from local files.

Each reader turns local copies of one public schema into
``schema.PreferenceExample``s (``source='human'``) plus a ``ReadStats`` that
counts what was kept, skipped and dropped, and why:

- ``read_tldr_comparisons``: openai/summarize_from_feedback, config
  ``comparisons`` (task ``tldr``);
- ``read_hh``: Anthropic/hh-rlhf, subsets ``helpful-base`` / ``harmless-base``
  (tasks ``hh_helpful`` / ``hh_harmless``);
- ``read_chatbot_arena``: lmsys/chatbot_arena_conversations (task
  ``chat_arena``).

Files may be ``.json`` (a JSON array, or JSON lines as in OpenAI's own
``comparisons/batch*.json``), ``.jsonl``, either gzipped (``.gz``), or
``.parquet`` (needs pyarrow). Records are located for error messages as
``line N`` (JSON lines, 1-based like editors and ``grep -n``), ``element N``
(JSON arrays, 0-based) or ``row N`` (parquet, 0-based like pyarrow/pandas).

Rules common to all readers (docs/datasets.md explains them at more length):

1. Every record is validated in full: its schema, and also that it is UTF-8
   text with no lone UTF-16 surrogate anywhere (escaped or raw), no repeated
   key in any object and no nesting deeper than ``MAX_JSON_DEPTH``. A bad one
   raises ``schema.BadRecordError`` naming file, line/element/row and field;
   with ``skip_bad=True`` it is skipped, counted per reason and summarised in
   one warning. ``skip_bad`` skips records, never files: a file that cannot be
   opened, decompressed or parsed as a whole (damaged gzip or parquet, a JSON
   array that does not parse) always raises ``BadRecordError`` with field
   ``'<file>'`` or ``'<json>'`` and where reading stopped, because what was
   read before the damage showed cannot be trusted either.
2. Valid records are then dropped by the documented per-task rules (ties,
   multi-turn conversations, CNN/DM items, other splits), each counted.
3. Responses are stripped of surrounding whitespace; prompts are used as
   built. A pair whose two responses are equal carries no preference and is
   dropped (``identical_responses``).
4. Of several pairs with the same (task, prompt, unordered pair of responses)
   only the first read is kept; the others count as ``duplicates_dropped``,
   and those whose preference disagrees with the kept one also as
   ``duplicate_label_conflicts``. Files are read in the order given, globs
   expanded in sorted order, a file named twice is read once.
5. Responses keep their source order (TL;DR ``summaries[0]`` and arena
   ``model_a`` are ``response_a``); hh-rlhf has no order (chosen / rejected),
   so its pairs are ordered by a hash of the example id to balance labels.
"""

import codecs
import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import logging
import os
import zlib
from typing import Any, Callable, Collection, Hashable, Iterator, Optional, Sequence, Union

from t5align.data import schema

PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Sequence[PathLike]]
ReadResult = tuple[list[schema.PreferenceExample], "ReadStats"]

HUMAN = "human"
HH_ASSISTANT_MARKER = "\n\nAssistant:"
HH_SUBSETS = {"helpful-base": "hh_helpful", "harmless-base": "hh_harmless"}
ARENA_TIES = ("tie", "tie (bothbad)")
ARENA_WINNERS = ("model_a", "model_b") + ARENA_TIES

_SUFFIXES = (".json", ".jsonl", ".parquet")
# The public records nest at most four levels (arena: openai_moderation.results[0].categories).
MAX_JSON_DEPTH = 32
_DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadStats:
  """What one read saw. ``read`` = kept + skipped_bad + every dropped count."""
  task: str
  files: list[str] = dataclasses.field(default_factory=list)
  read: int = 0
  kept: int = 0
  skipped_bad: int = 0
  bad_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_bad: Optional[str] = None  # message of the first skipped record
  ties_dropped: int = 0
  multi_turn_dropped: int = 0
  duplicates_dropped: int = 0
  duplicate_label_conflicts: int = 0  # subset of duplicates_dropped
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def accounted(self) -> int:
    return (self.kept + self.skipped_bad + self.ties_dropped + self.multi_turn_dropped
            + self.duplicates_dropped + sum(self.dropped.values()))

  def summary(self) -> str:
    """One line for logs and reports; zero counts are left out."""
    parts = [f"{self.task}: {len(self.files)} file(s), {self.read} records read, {self.kept} kept"]
    if self.skipped_bad:
      parts.append(f"{self.skipped_bad} bad skipped ({_counts(self.bad_reasons)})")
    if self.ties_dropped:
      parts.append(f"{self.ties_dropped} ties dropped")
    if self.multi_turn_dropped:
      parts.append(f"{self.multi_turn_dropped} multi-turn dropped")
    if self.duplicates_dropped:
      parts.append(f"{self.duplicates_dropped} duplicates dropped"
                   f" ({self.duplicate_label_conflicts} with a conflicting label)")
    if self.dropped:
      parts.append(f"dropped by rule: {_counts(self.dropped)}")
    return "; ".join(parts)


def _counts(counter: collections.Counter) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


class _Invalid(Exception):
  """A record-level problem; the driver adds file and location."""

  def __init__(self, field: str, problem: str, reason: str):
    super().__init__(problem)
    self.field, self.problem, self.reason = field, problem, reason


# --------------------------------------------------------------------------- files


def _expand(paths: Paths) -> list[str]:
  """Paths, lists of paths and globs ('**' included) -> existing files, in order, each once."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files, seen = [], set()
  for p in paths:
    p = os.path.expanduser(os.fspath(p))
    if any(c in p for c in "*?["):
      matches = [m for m in sorted(glob.glob(p, recursive=True)) if os.path.isfile(m)]
      if not matches:
        raise FileNotFoundError(f"no files match {p!r}")
    elif os.path.isfile(p):
      matches = [p]
    else:
      raise FileNotFoundError(f"{p}: no such file")
    for m in matches:
      real = os.path.realpath(m)
      if real not in seen:
        seen.add(real)
        files.append(m)
  if not files:
    raise ValueError("no input files given")
  for f in files:
    _format(f)  # Fail on an unsupported file before reading any.
  return files


def _format(path: str) -> tuple[str, bool]:
  """(suffix, gzipped) of a supported file name."""
  name = os.path.basename(path).lower()
  gzipped = name.endswith(".gz")
  if gzipped:
    name = name[:-3]
  for suffix in _SUFFIXES:
    if name.endswith(suffix) and not (gzipped and suffix == ".parquet"):
      return suffix, gzipped
  raise ValueError(f"{path}: unsupported file type; expected .json or .jsonl "
                   "(optionally .gz) or .parquet")


def _file_key(path: str) -> str:
  """'parent/stem' of a file, e.g. 'helpful-base/train' for .../helpful-base/train.jsonl.gz.

  The parent directory is part of the key because public layouts reuse stems
  (every hh-rlhf subset has a train.jsonl.gz).
  """
  real = os.path.realpath(path)
  stem = os.path.basename(real)
  suffix, gzipped = _format(path)
  stem = stem[:len(stem) - len(suffix) - (3 if gzipped else 0)]
  parent = os.path.basename(os.path.dirname(real))
  return f"{parent}/{stem}" if parent else stem


def _records(path: str) -> Iterator[tuple[str, int, Any]]:
  """Yields (location, number, record); a record that is not valid JSON is an _Invalid.

  A file that cannot be read to its end raises BadRecordError naming the file
  and where reading stopped.
  """
  suffix, gzipped = _format(path)
  if suffix == ".parquet":
    yield from _parquet_rows(path)
    return
  opener = gzip.open if gzipped else open
  if suffix == ".json" and _starts_with_bracket(path, opener):
    yield from _json_array(path, opener)
  else:
    yield from _json_lines(path, opener)


def _damaged(path: str, where: str, e: Exception) -> schema.BadRecordError:
  return schema.BadRecordError(path, where, "<file>", f"cannot decompress: {e}; the file is "
                               "damaged or truncated (download it again)")


def _starts_with_bracket(path: str, opener: Callable) -> bool:
  try:
    with opener(path, "rb") as f:
      while chunk := f.read(4096):
        stripped = chunk.lstrip()
        if stripped:
          return stripped.startswith(b"[")
  except _DECOMPRESSION_ERRORS as e:
    raise _damaged(path, "line 1", e) from None
  return False


def _decode_line(raw: bytes, number: int) -> Any:
  """One JSON line -> its value, or an _Invalid saying why it is not a record."""
  if number == 1 and raw.startswith(codecs.BOM_UTF8):
    raw = raw[len(codecs.BOM_UTF8):]
  try:
    # json.loads(bytes) would let raw surrogate bytes through ('surrogatepass').
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return _Invalid("<json>", f"not valid UTF-8 at byte {e.start}: {e.reason}", "bad_encoding")
  try:
    return json.loads(text, object_pairs_hook=_object)
  except ValueError as e:
    return _Invalid("<json>", f"not valid JSON: {e}", "malformed_json")
  except RecursionError:
    return _Invalid("<json>", f"nested deeper than {MAX_JSON_DEPTH} levels", "too_deep")


def _json_lines(path: str, opener: Callable) -> Iterator[tuple[str, int, Any]]:
  number = 0
  try:
    with opener(path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        if raw.strip():
          yield f"line {number}", number, _decode_line(raw.rstrip(b"\r\n"), number)
  except _DECOMPRESSION_ERRORS as e:
    raise _damaged(path, f"line {number + 1}", e) from None


def _json_array(path: str, opener: Callable) -> Iterator[tuple[str, int, Any]]:
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except _DECOMPRESSION_ERRORS as e:
    raise _damaged(path, "file", e) from None
  # One broken array loses the whole file, so none of these is skippable.
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise schema.BadRecordError(path, f"line {line}", "<json>",
                                f"not valid UTF-8: {e.reason}") from None
  try:
    array = json.loads(text, object_pairs_hook=_object)
  except json.JSONDecodeError as e:
    raise schema.BadRecordError(path, f"line {e.lineno}", "<json>",
                                f"not a valid JSON array: {e.msg}") from None
  except RecursionError:
    raise schema.BadRecordError(path, "file", "<json>", "nested too deep to parse (records may "
                                f"nest at most {MAX_JSON_DEPTH} levels)") from None
  if not isinstance(array, list):
    raise schema.BadRecordError(path, "file", "<json>", "expected a JSON array or JSON lines")
  for index, record in enumerate(array):
    yield f"element {index}", index, record


def _parquet_rows(path: str) -> Iterator[tuple[str, int, Any]]:
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
  index = 0
  try:
    # Page checksums catch flipped bytes in files written with them; without
    # them a flip that still decodes cannot be told from data (docs/data.md).
    batches = pq.ParquetFile(path, page_checksum_verification=True).iter_batches(batch_size=1024)
    for batch in batches:
      for record in batch.to_pylist():
        yield f"row {index}", index, record
        index += 1
  # pyarrow raises OSError for corrupt pages and UnicodeDecodeError for broken strings.
  except (pa.ArrowException, OSError, ValueError) as e:
    raise schema.BadRecordError(path, f"row {index}", "<file>", "not a readable parquet file "
                                f"from this row on: {e}; the file is damaged or truncated "
                                "(download it again)") from None


class _Object(dict):
  """A JSON object that repeated a key; ``_check_values`` makes it a bad record."""
  duplicate: str = ""


def _object(pairs: list) -> dict:
  out = dict(pairs)
  if len(out) == len(pairs):
    return out
  seen = set()
  marked = _Object(pairs)
  marked.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
  return marked


def _check_values(record: Any) -> None:
  """Raises _Invalid for a duplicate key, nesting over MAX_JSON_DEPTH or text that is not UTF-8.

  Python strings from JSON escapes may hold lone UTF-16 surrogates
  ('\\ud800'), which no UTF-8 writer (tfds included) accepts. Iterative, so a
  deep record cannot exhaust the stack; paths are (parent, key) links, turned
  into a field name only for the error.
  """
  stack = [(record, None, 0)]
  while stack:
    value, path, depth = stack.pop()
    if depth > MAX_JSON_DEPTH:
      raise _Invalid(_field(path), f"nested deeper than {MAX_JSON_DEPTH} levels", "too_deep")
    if isinstance(value, str):
      if not value.isascii():
        _check_text(value, path)
    elif isinstance(value, dict):
      if isinstance(value, _Object):
        raise _Invalid(_field((path, value.duplicate)), "duplicate key in a JSON object",
                       "duplicate_key")
      for key, item in value.items():
        if not key.isascii():
          _check_text(key, (path, key))
        stack.append((item, (path, key), depth + 1))
    elif isinstance(value, list):
      stack.extend((item, (path, i), depth + 1) for i, item in enumerate(value))


def _field(path: Optional[tuple]) -> str:
  """'conversation_a[1].content' from a (parent, key) chain."""
  keys = []
  while path is not None:
    path, key = path
    keys.append(key)
  name = ""
  for key in reversed(keys):
    name += f"[{key}]" if isinstance(key, int) else (f".{key}" if name else key)
  return name or "<record>"


def _check_text(text: str, path: Optional[tuple]) -> None:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _Invalid(_field(path), f"text cannot be encoded as UTF-8 ({e.reason} "
                   f"{text[e.start]!r} at character {e.start})", "bad_encoding") from None


# --------------------------------------------------------------------------- driver


def _read(paths: Paths, task: str,
          parse: Callable[[dict, str], Union[schema.PreferenceExample, str]], *,
          skip_bad: bool, id_field: Optional[str] = None,
          id_of: Optional[Callable[[dict], tuple[str, Hashable]]] = None) -> ReadResult:
  """Runs ``parse`` over every record and applies the common rules.

  ``parse(record, default_id)`` returns an example, or the name of the rule
  that drops the record ('tie', 'multi_turn' or a ``dropped`` key), or raises
  _Invalid. ``default_id`` is f"{task}:{parent/stem}:{number}". ``id_field``
  names the record field an example id comes from when it is not
  file-derived, and ``id_of(record)`` (called once ``parse`` accepted it)
  gives that id and what it names: every record with the id, kept or
  dropped, must name the same thing.
  """
  files = _expand(paths)
  if id_field is None:
    keys = {}
    for f in files:
      other = keys.setdefault(_file_key(f), f)
      if other != f:
        raise ValueError(f"{other} and {f} would give the same example ids "
                         f"({task}:{_file_key(f)}:N); rename one of them")
  stats = ReadStats(task=task, files=list(files))
  examples: list[schema.PreferenceExample] = []
  # (prompt, lesser response, greater response) -> P(lesser preferred) of the kept pair.
  pairs: dict[tuple[str, str, str], float] = {}
  ids: dict[str, tuple[Hashable, str]] = {}  # example id -> (what it names, first location)
  for path in files:
    key = _file_key(path)
    for where, number, record in _records(path):
      stats.read += 1
      try:
        if isinstance(record, _Invalid):
          raise record
        if not isinstance(record, dict):
          raise _Invalid("<record>", f"expected a JSON object, got {type(record).__name__}",
                         "not_an_object")
        _check_values(record)
        out = parse(record, f"{task}:{key}:{number}")
        if id_of is not None:
          example_id, named = id_of(record)
          first_named, first_where = ids.setdefault(example_id, (named, f"{path} {where}"))
          if first_named != named:
            raise _Invalid(id_field, f"id {example_id!r} already used by {first_where} for a "
                           "different pair", "duplicate_id")
      except _Invalid as e:
        error = schema.BadRecordError(path, where, e.field, e.problem)
        if not skip_bad:
          raise error from None
        stats.skipped_bad += 1
        stats.bad_reasons[e.reason] += 1
        stats.first_bad = stats.first_bad or str(error)
        continue
      if isinstance(out, str):
        if out == "tie":
          stats.ties_dropped += 1
        elif out == "multi_turn":
          stats.multi_turn_dropped += 1
        else:
          stats.dropped[out] += 1
        continue
      if out.response_a == out.response_b:
        stats.dropped["identical_responses"] += 1
        continue
      pair_key = _pair_key(out)
      p_lesser = out.label if out.response_a < out.response_b else 1.0 - out.label
      if pair_key in pairs:
        stats.duplicates_dropped += 1
        stats.duplicate_label_conflicts += pairs[pair_key] != p_lesser
        continue
      pairs[pair_key] = p_lesser
      examples.append(out)
  stats.kept = len(examples)
  assert stats.accounted() == stats.read, stats
  if stats.skipped_bad:
    logger.warning("%s: skipped %d bad record(s) (%s); first: %s", task, stats.skipped_bad,
                   _counts(stats.bad_reasons), stats.first_bad)
  logger.info("%s", stats.summary())
  return examples, stats


def _pair_key(ex: schema.PreferenceExample) -> tuple[str, str, str]:
  lo, hi = sorted((ex.response_a, ex.response_b))
  return ex.prompt, lo, hi


def _get(record: dict, key: str, kind: type, name: Optional[str] = None) -> Any:
  """record[key] checked against ``kind``; absent and null are both 'missing'."""
  name = name or key
  value = record.get(key)
  if value is None:
    raise _Invalid(name, "missing", "missing_field")
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise _Invalid(name, f"expected {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r:.40}",
                   "wrong_type")
  return value


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _response(text: str, name: str) -> str:
  text = text.strip()
  if not text:
    raise _Invalid(name, "empty response", "empty_response")
  return text


# --------------------------------------------------------------------------- TL;DR


def read_tldr_comparisons(paths: Paths, *, skip_bad: bool = False,
                          splits: Optional[Collection[str]] = None) -> ReadResult:
  """Reads openai/summarize_from_feedback ``comparisons`` records (task 'tldr').

  Prompt: "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:";
  response_a / response_b = summaries[0] / summaries[1] text (stripped);
  label = 1.0 if choice == 0 else 0.0; example_id = "tldr:{parent/stem}:{number}"
  (``info.id`` names the post, which several comparisons share).

  CNN/DailyMail items (``info.article`` set, no ``info.post``; only in the
  validation split) are not Reddit TL;DR prompts: they are dropped and counted
  as ``dropped['no_post']``. ``splits`` keeps only records whose ``split``
  field is in it (OpenAI's raw batch files mix 'train', 'valid1' and 'valid2');
  the others count as ``dropped['other_split']``.
  """
  if isinstance(splits, str):
    raise TypeError(f"splits must be a collection of split names, got the string {splits!r}")
  return _read(paths, "tldr", functools.partial(_parse_tldr, splits=splits), skip_bad=skip_bad)


def _parse_tldr(record: dict, default_id: str, *, splits: Optional[Collection[str]]):
  info = _get(record, "info", dict)
  post = info.get("post")
  if post is None:
    if info.get("article") is None:
      raise _Invalid("info.post", "missing (and no info.article either)", "missing_field")
    # A CNN/DM item: checked like any other, dropped below.
    _get(info, "article", str, "info.article")
  else:
    _get(info, "post", str, "info.post")
    title = _get(info, "title", str, "info.title")
    subreddit = _get(info, "subreddit", str, "info.subreddit")
  summaries = _get(record, "summaries", list)
  if len(summaries) != 2:
    raise _Invalid("summaries", f"expected 2 summaries, got {len(summaries)}", "bad_summaries")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict):
      raise _Invalid(f"summaries[{i}]", f"expected an object, got {type(summary).__name__}",
                     "wrong_type")
    name = f"summaries[{i}].text"
    texts.append(_response(_get(summary, "text", str, name), name))
  choice = _get(record, "choice", int)
  if choice not in (0, 1):
    raise _Invalid("choice", f"expected 0 or 1, got {choice}", "bad_choice")
  if splits is not None and _get(record, "split", str) not in splits:
    return "other_split"
  if post is None:
    return "no_post"
  prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
  return schema.PreferenceExample(
      prompt=prompt, response_a=texts[0], response_b=texts[1], label=1.0 if choice == 0 else 0.0,
      task="tldr", source=HUMAN, example_id=default_id)


# --------------------------------------------------------------------------- hh-rlhf


def read_hh(paths: Paths, *, subset: str, skip_bad: bool = False) -> ReadResult:
  """Reads Anthropic/hh-rlhf ``{chosen, rejected}`` lines (tasks 'hh_helpful', 'hh_harmless').

  ``subset`` is 'helpful-base' or 'harmless-base' and only sets the task name.
  Each dialogue is split at its last "\\n\\nAssistant:": the prompt is the text
  up to and including that marker, the response the rest (stripped). A pair
  whose two prompts differ is a bad record (field 'rejected').

  Order: the hh files say only which response was chosen, so the pair is put
  in the order given by bit 0 of the first byte of sha256(example_id): 0 puts
  chosen first (label 1.0), 1 puts rejected first (label 0.0). This is
  deterministic and balances labels, so nothing downstream can learn "a wins".
  example_id = "{task}:{parent/stem}:{line}", e.g. "hh_helpful:helpful-base/train:17".
  """
  if subset not in HH_SUBSETS:
    raise ValueError(f"unknown hh-rlhf subset {subset!r}; expected one of {sorted(HH_SUBSETS)}")
  task = HH_SUBSETS[subset]
  return _read(paths, task, functools.partial(_parse_hh, task=task), skip_bad=skip_bad)


def _split_dialogue(text: str, name: str) -> tuple[str, str]:
  cut = text.rfind(HH_ASSISTANT_MARKER)
  if cut < 0:
    raise _Invalid(name, "no '\\n\\nAssistant:' turn in the dialogue", "no_assistant_turn")
  cut += len(HH_ASSISTANT_MARKER)
  return text[:cut], _response(text[cut:], name)


def _parse_hh(record: dict, default_id: str, *, task: str):
  prompt, chosen = _split_dialogue(_get(record, "chosen", str), "chosen")
  rejected_prompt, rejected = _split_dialogue(_get(record, "rejected", str), "rejected")
  if rejected_prompt != prompt:
    raise _Invalid("rejected", "dialogue before the last Assistant turn differs from 'chosen'",
                   "prompt_mismatch")
  if hashlib.sha256(default_id.encode("utf-8")).digest()[0] & 1:
    a, b, label = rejected, chosen, 0.0
  else:
    a, b, label = chosen, rejected, 1.0
  return schema.PreferenceExample(prompt=prompt, response_a=a, response_b=b, label=label,
                                  task=task, source=HUMAN, example_id=default_id)


# --------------------------------------------------------------------------- Chatbot Arena


def read_chatbot_arena(paths: Paths, *, skip_bad: bool = False,
                       keep_ties: bool = False) -> ReadResult:
  """Reads lmsys/chatbot_arena_conversations records (task 'chat_arena').

  Only single-turn battles are kept (``turn == 1``); longer ones are validated,
  dropped and counted in ``multi_turn_dropped``. Prompt = the user message,
  response_a / response_b = the assistant messages of conversation_a /
  conversation_b (stripped); label 1.0 for winner 'model_a', 0.0 for
  'model_b'. Ties ('tie', 'tie (bothbad)') are dropped and counted, or with
  ``keep_ties`` kept with label 0.5. example_id = "chat_arena:{question_id}".
  """
  return _read(paths, "chat_arena", functools.partial(_parse_arena, keep_ties=keep_ties),
               skip_bad=skip_bad, id_field="question_id", id_of=_arena_battle)


def _conversation(record: dict, name: str, turn: int) -> list[tuple[str, str]]:
  """[(role, content)] of a conversation that alternates user / assistant for ``turn`` turns."""
  messages = _get(record, name, list)
  if len(messages) != 2 * turn:
    raise _Invalid(name, f"expected {2 * turn} messages for turn={turn}, got {len(messages)}",
                   "bad_conversation")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise _Invalid(f"{name}[{i}]", f"expected an object, got {type(message).__name__}",
                     "wrong_type")
    role = _get(message, "role", str, f"{name}[{i}].role")
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise _Invalid(f"{name}[{i}].role", f"expected {expected!r}, got {role!r}",
                     "bad_conversation")
    out.append((role, _get(message, "content", str, f"{name}[{i}].content")))
  return out


def _parse_arena(record: dict, default_id: str, *, keep_ties: bool):
  del default_id  # Arena records carry their own id.
  question_id = _get(record, "question_id", str)
  if not question_id.strip():
    raise _Invalid("question_id", "empty", "missing_field")
  winner = _get(record, "winner", str)
  if winner not in ARENA_WINNERS:
    raise _Invalid("winner", f"unknown winner {winner!r}; expected one of {list(ARENA_WINNERS)}",
                   "unknown_winner")
  turn = _get(record, "turn", int)
  if turn < 1:
    raise _Invalid("turn", f"expected a positive turn count, got {turn}", "bad_conversation")
  conv_a = _conversation(record, "conversation_a", turn)
  conv_b = _conversation(record, "conversation_b", turn)
  prompt = conv_a[0][1]
  if not prompt.strip():
    raise _Invalid("conversation_a[0].content", "empty user message", "empty_prompt")
  if conv_b[0][1] != prompt:
    raise _Invalid("conversation_b", "first user message differs from conversation_a's",
                   "prompt_mismatch")
  response_a = _response(conv_a[1][1], "conversation_a[1].content")
  response_b = _response(conv_b[1][1], "conversation_b[1].content")
  if turn > 1:
    return "multi_turn"
  if winner in ARENA_TIES:
    if not keep_ties:
      return "tie"
    label = 0.5
  else:
    label = 1.0 if winner == "model_a" else 0.0
  return schema.PreferenceExample(
      prompt=prompt, response_a=response_a, response_b=response_b, label=label, task="chat_arena",
      source=HUMAN, example_id=f"chat_arena:{question_id}")


def _arena_battle(record: dict) -> tuple[str, Hashable]:
  """(example id, the battle it names) of a record ``_parse_arena`` accepted.

  The battle is its two conversations, unordered and with assistant messages
  stripped: the same battle with its sides swapped, or read from two copies
  of a file, is a duplicate pair, not a reused id.
  """
  sides = frozenset(
      tuple(m["content"].strip() if m["role"] == "assistant" else m["content"]
            for m in record[name]) for name in ("conversation_a", "conversation_b"))
  return f"chat_arena:{record['question_id']}", sides


READERS: dict[str, Callable[..., ReadResult]] = {
    "tldr": read_tldr_comparisons,
    "hh_helpful": functools.partial(read_hh, subset="helpful-base"),
    "hh_harmless": functools.partial(read_hh, subset="harmless-base"),
    "chat_arena": read_chatbot_arena,
}
