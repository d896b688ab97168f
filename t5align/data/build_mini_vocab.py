"""Builds the miniature world's SentencePiece model (t5align/data/assets/mini.model).

Run ``python -m t5align.data.build_mini_vocab [--output PATH]``. The corpus is
the language's word list (plus the prompt prefix, a few marker words and the
digits), not sampled mini-world text, so retuning the world's generator never
moves token ids; only a change to the lexicon needs a rebuild, and
tests/data/test_vocab.py fails until it is done.

Choices, and why:
* BPE on one copy of each word: every word is frequent enough to be merged whole,
  so each word of the language is a single piece.
* ``required_chars`` = printable ASCII: any ASCII text (marker strings, stray
  policy text) encodes without UNK, falling back to characters.
* ``split_by_number=False`` so that "▁1" and "▁2" are pieces: a preference
  model head can read its answer as one token.
* One thread and no input sampling or shuffling: training is deterministic, and
  the same sentencepiece version rebuilds the file byte for byte.
"""

import argparse
import io
import os
import string
import tempfile
from typing import Sequence

import sentencepiece as spm

from t5align.data import mini_world
from t5align.data import vocab

# Words that stages may use to serialise inputs (e.g. preference-model markers).
MARKER_WORDS = ("prompt", "response", "summary", "first", "second", "better")


def corpus_words() -> tuple[str, ...]:
  """Every word the mini vocabulary must hold as one piece (the prompt prefix aside)."""
  return (mini_world.PROMPT_PREFIX,) + mini_world.LEXICON + MARKER_WORDS + tuple(string.digits)


def train_model_bytes() -> bytes:
  """The serialized SentencePiece model; equal bytes on every run of one sentencepiece version."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_words()),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab.MINI_VOCAB_SIZE,
      pad_id=vocab.PAD_ID,
      eos_id=vocab.EOS_ID,
      unk_id=vocab.UNK_ID,
      bos_id=-1,
      character_coverage=1.0,
      required_chars="".join(chr(c) for c in range(33, 127)),
      split_by_number=False,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2)
  return model.getvalue()


def write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mini_vocab.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    # mkstemp creates 0600; the model ships as package data that everyone reads.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=vocab.MINI_VOCAB_PATH, help="where to write the .model file")
  args = parser.parse_args(argv)
  data = train_model_bytes()
  write_atomically(args.output, data)
  print(f"wrote {args.output} ({len(data)} bytes, {vocab.MINI_VOCAB_SIZE} pieces)")


if __name__ == "__main__":
  main()
