"""Vocabularies: the shipped miniature-world SentencePiece model and the T5 one.

The mini vocabulary (``MINI_VOCAB_PATH``) is a small BPE SentencePiece model in
which every word of the miniature world's language is one piece; it is rebuilt
byte for byte by ``python -m t5align.data.build_mini_vocab``. Real tasks use the
public T5 v1.1 vocabulary, whose path gin supplies (``T5_VOCAB_PATH``: 32000
pieces + 100 sentinels in the file itself, so ``extra_ids=0``; the model's
embedding has 32128 rows). Both follow the T5 id conventions: pad = 0 (also the
decoder start token), EOS = 1, UNK = 2, no BOS.
"""

import os

MINI_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mini.model")
# The file T5X's t5_1_1 gin files bind; it already holds the 100 sentinel pieces.
T5_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
# The mini model's size; a mini T5 may pad its embedding beyond it (e.g. to 384).
MINI_VOCAB_SIZE = 320
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def get_vocabulary(path: str | None = None, extra_ids: int = 0):
  """A ``seqio.SentencePieceVocabulary`` for ``path``; None means the mini vocabulary.

  Args:
    path: a SentencePiece model file (local or gs://), e.g. ``T5_VOCAB_PATH``.
    extra_ids: sentinels to append; 0 for both shipped choices (use 100 only with
      the sentinel-less ``cc_all.32000/sentencepiece.model``).
  """
  # seqio imports TensorFlow; importing it here keeps MINI_VOCAB_PATH and the
  # vocabulary build script free of that start-up cost.
  import seqio  # pylint: disable=g-import-not-at-top

  path = MINI_VOCAB_PATH if path is None else path
  if "://" not in path and not os.path.exists(path):
    raise FileNotFoundError(
        f"SentencePiece model {path!r} not found"
        + (" (rebuild it with `python -m t5align.data.build_mini_vocab`)" if path == MINI_VOCAB_PATH else ""))
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
