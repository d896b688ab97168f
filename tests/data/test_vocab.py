"""Tests of the shipped mini SentencePiece model and get_vocabulary."""

import pytest
import sentencepiece as spm

from t5align.data import build_mini_vocab
from t5align.data import mini_world
from t5align.data import vocab


@pytest.fixture(scope="module")
def processor():
  return spm.SentencePieceProcessor(model_file=vocab.MINI_VOCAB_PATH)


@pytest.fixture(scope="module")
def rebuilt():
  return build_mini_vocab.train_model_bytes()


def test_rebuild_reproduces_the_pieces(processor, rebuilt):
  fresh = spm.SentencePieceProcessor(model_proto=rebuilt)
  shipped = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
  again = [(fresh.id_to_piece(i), fresh.get_score(i)) for i in range(fresh.get_piece_size())]
  assert again == shipped, "rerun `python -m t5align.data.build_mini_vocab` and ship the result"


def test_rebuild_is_byte_identical(rebuilt):
  # Training is single-threaded and unsampled, so one sentencepiece version
  # rebuilds the same bytes (checked on sentencepiece 0.2.x). If only this test
  # fails, a new sentencepiece serialises differently: rebuild and ship.
  with open(vocab.MINI_VOCAB_PATH, "rb") as f:
    assert f.read() == rebuilt


def test_special_ids(processor):
  assert processor.get_piece_size() == vocab.MINI_VOCAB_SIZE
  assert (processor.pad_id(), processor.eos_id(), processor.unk_id(), processor.bos_id()) == (0, 1, 2, -1)
  assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def test_every_word_is_one_piece(processor):
  for word in build_mini_vocab.corpus_words():
    pieces = processor.encode(word, out_type=str)
    if word == mini_world.PROMPT_PREFIX:
      assert pieces == ["▁summarize", ":"]
    else:
      assert pieces == ["▁" + word], word


def test_preference_answers_are_single_tokens(processor):
  one, two = processor.encode("1"), processor.encode("2")
  assert len(one) == len(two) == 1 and one != two


def test_preference_markers_are_whole_words(processor):
  # The markers that t5align.data.tasks puts around a serialised pair.
  for marker, pieces in (("response 1 :", ["▁response", "▁1", "▁", ":"]),
                         ("response 2 :", ["▁response", "▁2", "▁", ":"]),
                         ("better response:", ["▁better", "▁response", ":"])):
    assert processor.encode(marker, out_type=str) == pieces


def test_printable_ascii_never_needs_unk(processor):
  text = "".join(chr(c) for c in range(33, 127)) + " Response 1: [x] {y}\tTL;DR"
  ids = processor.encode(text)
  assert vocab.UNK_ID not in ids
  assert processor.decode(ids) == text.replace("\t", " ")


def test_seqio_vocabulary_round_trips_mini_world_text():
  seqio_vocab = vocab.get_vocabulary()
  assert (seqio_vocab.pad_id, seqio_vocab.eos_id, seqio_vocab.unk_id) == (0, 1, 2)
  assert seqio_vocab.vocab_size == vocab.MINI_VOCAB_SIZE
  world = mini_world.MiniWorld(mini_world.MiniWorldConfig(num_train=200, num_validation=50))
  for split in mini_world.SPLITS:
    for e in world.d_initial(split):
      for text in (e.prompt, e.response_a, e.response_b):
        ids = seqio_vocab.encode(text)
        assert vocab.UNK_ID not in ids and vocab.EOS_ID not in ids and 0 not in ids
        # One token per word, plus one for the prompt prefix's colon.
        assert len(ids) == len(text.split()) + (text is e.prompt)
        assert seqio_vocab.decode(ids) == text


def test_get_vocabulary_paths(tmp_path):
  assert vocab.get_vocabulary(vocab.MINI_VOCAB_PATH, extra_ids=3).vocab_size == vocab.MINI_VOCAB_SIZE + 3
  with pytest.raises(FileNotFoundError, match="missing.model"):
    vocab.get_vocabulary(str(tmp_path / "missing.model"))


def test_build_script_writes_atomically(tmp_path):
  out = tmp_path / "sub" / "mini.model"
  build_mini_vocab.main(["--output", str(out)])
  with open(vocab.MINI_VOCAB_PATH, "rb") as f:
    assert out.read_bytes() == f.read()
  assert [p.name for p in out.parent.iterdir()] == ["mini.model"]
