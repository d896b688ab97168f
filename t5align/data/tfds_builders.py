"""tensorflow-datasets builders: each preference source prepared once into a data_dir.

One builder per source, each with splits 'train' and 'validation' and exactly
the `schema.FIELDS` as features (texts, float32 ``label``, int64 ``step``):

| dataset       | tfds name            | validation split                                      |
|---------------|----------------------|-------------------------------------------------------|
| tldr          | t5align_tldr         | the public validation file (or 'valid1'/'valid2' rows) |
| hh_helpful    | t5align_hh_helpful   | helpful-base test file                                 |
| hh_harmless   | t5align_hh_harmless  | harmless-base test file                                |
| chat_arena    | t5align_chat_arena   | 5% hold-out by a hash of question_id                   |
| mini          | t5align_mini/CONFIG  | the miniature world's validation split                 |

The public datasets are manual downloads (the arena is gated); the readers in
`t5align.data.readers` parse them, and their `ReadStats` are stored in the
prepared dataset's metadata (``read_stats``), so a report can show what was
dropped long after preparation. The miniature world is generated from a
`MiniWorldConfig`; the default config is named 'default', any other one by a
hash of its fields, so different worlds never share a directory.

Preparation (`download_and_prepare`, run by `t5align.data.prepare.prepare`)
writes ``data_dir/<tfds name>/[<config>/]1.0.0/``; reading needs only that
directory. Defining the classes registers them with tfds (no files touched).
"""

import dataclasses
import glob
import hashlib
import json
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from t5align.data import mini_world
from t5align.data import readers
from t5align.data import schema

VERSION = "1.0.0"
SPLITS = ("train", "validation")
DATASETS = ("tldr", "hh_helpful", "hh_harmless", "chat_arena", "mini")
ARENA_VALIDATION_FRACTION = 0.05

# File names the readers accept, by suffix.
_DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


def _features() -> tfds.features.FeaturesDict:
  features = {name: tfds.features.Text() for name in schema.FIELDS}
  features["label"] = tfds.features.Scalar(np.float32)
  features["step"] = tfds.features.Scalar(np.int64)
  return tfds.features.FeaturesDict({name: features[name] for name in schema.FIELDS})


def _data_files(directory: str, prefix: str = "", recursive: bool = True) -> list[str]:
  """Readable data files under ``directory``, sorted, that belong to ``prefix``.

  A file belongs to ``prefix`` when its name starts with it
  (``train-00000-of-00001.parquet``) or one of its directories below
  ``directory`` is named so (``train/0000.parquet``, the Hub's parquet branch).
  """
  pattern = os.path.join(directory, "**", "*") if recursive else os.path.join(directory, "*")
  found = []
  for p in glob.glob(pattern, recursive=recursive):
    *dirs, name = os.path.relpath(p, directory).split(os.sep)
    if (os.path.isfile(p) and p.lower().endswith(_DATA_SUFFIXES)
        and (name.startswith(prefix) or prefix in dirs)):
      found.append(p)
  return sorted(found)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of a dataset that exists only where it is prepared.

  tfds fills in an unprepared builder's info from its GCS bucket, and first
  makes a `tmp*tfds` directory in the system temp dir that it never deletes;
  our datasets have no bucket entry, so there is nothing to fetch.
  """

  def initialize_from_bucket(self) -> None:
    return None


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose splits come from lists of `PreferenceExample`s."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "The t5align preference schema."}
  _DESCRIPTION = ""
  _HOMEPAGE = ""
  # tfds looks for a checksums file next to the builder's code; ours download
  # nothing, and the lookup needs the importlib_resources backport on modern
  # Pythons (tfds 4.9.10 imports it unconditionally there), so skip it.
  code_path = None

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    # skip_bad only matters when a source has bad records (otherwise reading
    # raises), so it does not change what a successful preparation contains.
    self._skip_bad = skip_bad
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
        builder=self, description=self._DESCRIPTION, features=_features(),
        homepage=self._HOMEPAGE, metadata=tfds.core.MetadataDict())

  def _read_splits(self, dl_manager) -> dict[str, list[schema.PreferenceExample]]:
    """{split: examples}; may record provenance in ``self.info.metadata``."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    splits = self._read_splits(dl_manager)
    for split in SPLITS:
      if not splits[split]:
        raise ValueError(f"{self.name}: split {split!r} has no examples; check the input files")
    return {split: self._generate_examples(splits[split]) for split in SPLITS}

  def _generate_examples(self, examples):
    for example in examples:
      yield example.example_id, example.to_dict()

  def _record_read_stats(self, stats: dict[str, readers.ReadStats]) -> None:
    """Stores each split's ReadStats (plain JSON values) and summary line in the metadata."""
    # Not dataclasses.asdict: it rebuilds Counters from (key, value) pairs,
    # which counts the pairs instead of copying the counts.
    self.info.metadata["read_stats"] = {
        split: {**{f.name: (dict(v) if isinstance(v, dict) else v)
                   for f in dataclasses.fields(s) for v in [getattr(s, f.name)]},
                "summary": s.summary()}
        for split, s in stats.items()}


def _missing(manual_dir: str, what: str, instructions: str) -> FileNotFoundError:
  return FileNotFoundError(f"{manual_dir}: no {what}.\n{instructions}")


class Tldr(_PreferenceBuilder):
  """openai/summarize_from_feedback, config `comparisons` (task tldr)."""

  name = "t5align_tldr"
  _DESCRIPTION = "TL;DR summarisation comparisons (openai/summarize_from_feedback) as preference pairs."
  _HOMEPAGE = "https://huggingface.co/datasets/openai/summarize_from_feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the `comparisons` files of openai/summarize_from_feedback in manual_dir (only
  manual_dir/comparisons/ is searched when it exists), either the Hugging Face layout
  (files named train*.{parquet,json,jsonl} and validation*..., or in directories named
  train/ and validation/, e.g. comparisons/train-00000-of-00001.parquet) or OpenAI's own
  batch files (comparisons/batch*.json, split by their `split` field: 'train' -> train,
  'valid1'/'valid2' -> validation)."""

  def _read_splits(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    # A copy of the whole Hub repository also holds the `axis` config, which
    # is not pairwise: look only inside comparisons/ when there is one.
    root = os.path.join(manual_dir, "comparisons")
    root = root if os.path.isdir(root) else manual_dir
    train, validation = _data_files(root, "train"), _data_files(root, "validation")
    if train and validation:
      sources = {"train": (train, None), "validation": (validation, None)}
    elif not train and not validation and _data_files(root, "batch"):
      batches = _data_files(root, "batch")
      sources = {"train": (batches, ("train",)), "validation": (batches, ("valid1", "valid2"))}
    else:
      raise _missing(root, "train* and validation* comparison files (or batch*.json files)",
                     self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    out, stats = {}, {}
    for split, (paths, splits) in sources.items():
      out[split], stats[split] = readers.read_tldr_comparisons(
          paths, skip_bad=self._skip_bad, splits=splits)
    self._record_read_stats(stats)
    return out


class _HhBuilder(_PreferenceBuilder, skip_registration=True):
  _SUBSET = ""
  _HOMEPAGE = "https://huggingface.co/datasets/Anthropic/hh-rlhf"

  def _read_splits(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    subset_dir = os.path.join(manual_dir, self._SUBSET)
    root = subset_dir if os.path.isdir(subset_dir) else manual_dir
    sources = {"train": _data_files(root, "train", recursive=False),
               "validation": _data_files(root, "test", recursive=False)}
    if not sources["train"] or not sources["validation"]:
      raise _missing(root, "train.jsonl.gz and test.jsonl.gz", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    out, stats = {}, {}
    for split, paths in sources.items():
      out[split], stats[split] = readers.read_hh(paths, subset=self._SUBSET, skip_bad=self._skip_bad)
    self._record_read_stats(stats)
    return out


class HhHelpful(_HhBuilder):
  """Anthropic/hh-rlhf, subset helpful-base (task hh_helpful)."""

  name = "t5align_hh_helpful"
  _SUBSET = "helpful-base"
  _DESCRIPTION = "Anthropic hh-rlhf helpful-base as preference pairs; validation = its test split."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put helpful-base/train.jsonl.gz and helpful-base/test.jsonl.gz of Anthropic/hh-rlhf
  in manual_dir (manual_dir may also be the helpful-base directory itself)."""


class HhHarmless(_HhBuilder):
  """Anthropic/hh-rlhf, subset harmless-base (task hh_harmless)."""

  name = "t5align_hh_harmless"
  _SUBSET = "harmless-base"
  _DESCRIPTION = "Anthropic hh-rlhf harmless-base as preference pairs; validation = its test split."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put harmless-base/train.jsonl.gz and harmless-base/test.jsonl.gz of Anthropic/hh-rlhf
  in manual_dir (manual_dir may also be the harmless-base directory itself)."""


def arena_split(example_id: str) -> str:
  """'validation' for a deterministic ARENA_VALIDATION_FRACTION of arena pairs, else 'train'.

  The arena example id is "chat_arena:{question_id}", so the split depends on
  the question id alone: the first 8 bytes of its SHA-256, read as a fraction
  of 2**64.
  """
  digest = hashlib.sha256(example_id.encode("utf-8")).digest()
  return "validation" if int.from_bytes(digest[:8], "big") < ARENA_VALIDATION_FRACTION * 2**64 else "train"


class ChatArena(_PreferenceBuilder):
  """lmsys/chatbot_arena_conversations (task chat_arena), validation held out by hash."""

  name = "t5align_chat_arena"
  _DESCRIPTION = ("Chatbot Arena battles (lmsys/chatbot_arena_conversations): single-turn, "
                  "no ties; validation = a 5% hash hold-out of question_id.")
  _HOMEPAGE = "https://huggingface.co/datasets/lmsys/chatbot_arena_conversations"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  The dataset is gated: accept its terms on Hugging Face, download the data files of
  lmsys/chatbot_arena_conversations (data/train-*.parquet, or a .json/.jsonl export) and
  put them in manual_dir. Every data file under manual_dir is read."""

  def _read_splits(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    paths = _data_files(manual_dir)
    if not paths:
      raise _missing(manual_dir, "arena data files", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    examples, stats = readers.read_chatbot_arena(paths, skip_bad=self._skip_bad)
    out = {split: [] for split in SPLITS}
    for example in examples:
      out[arena_split(example.example_id)].append(example)
    # One read covers both splits.
    self._record_read_stats({"all": stats})
    return out


@dataclasses.dataclass(eq=False)
class MiniBuilderConfig(tfds.core.BuilderConfig):
  world: mini_world.MiniWorldConfig = dataclasses.field(default_factory=mini_world.MiniWorldConfig)


def mini_builder_config(world: Optional[mini_world.MiniWorldConfig] = None) -> MiniBuilderConfig:
  """The builder config of a miniature world: 'default', or 'w' + a hash of its fields."""
  world = world or mini_world.MiniWorldConfig()
  if world == mini_world.MiniWorldConfig():
    name = "default"
  else:
    fields = json.dumps(dataclasses.asdict(world), sort_keys=True)
    name = "w" + hashlib.sha256(fields.encode("utf-8")).hexdigest()[:12]
  return MiniBuilderConfig(name=name, world=world, description=f"MiniWorld({world})")


class Mini(_PreferenceBuilder):
  """D_initial of a miniature world (task mini)."""

  name = "t5align_mini"
  _DESCRIPTION = "D_initial of a t5align miniature world (synthetic language, oracle labels)."
  BUILDER_CONFIGS = [mini_builder_config()]

  def _read_splits(self, dl_manager):
    del dl_manager  # Generated, nothing to read.
    world = self.builder_config.world
    self.info.metadata["mini_world_config"] = dataclasses.asdict(world)
    generated = mini_world.MiniWorld(world)
    return {split: generated.d_initial(split) for split in SPLITS}


BUILDERS = {"tldr": Tldr, "hh_helpful": HhHelpful, "hh_harmless": HhHarmless,
            "chat_arena": ChatArena, "mini": Mini}


def _check_dataset(dataset: str, mini_config) -> None:
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  if mini_config is not None and dataset != "mini":
    raise ValueError(f"mini_config applies to dataset 'mini' only, not {dataset!r}")


def tfds_name(dataset: str, *, mini_config: Optional[mini_world.MiniWorldConfig] = None) -> str:
  """The versioned tfds name, e.g. 't5align_tldr:1.0.0' or 't5align_mini/default:1.0.0'."""
  _check_dataset(dataset, mini_config)
  name = BUILDERS[dataset].name
  if dataset == "mini":
    name += "/" + mini_builder_config(mini_config).name
  return f"{name}:{VERSION}"


def prepared_dir(dataset: str, data_dir: str, *,
                 mini_config: Optional[mini_world.MiniWorldConfig] = None) -> str:
  """Where the prepared dataset lives: data_dir/<name>/[<config>/]<version>."""
  name, version = tfds_name(dataset, mini_config=mini_config).split(":")
  return os.path.join(data_dir, *name.split("/"), version)


def make_builder(dataset: str, *, data_dir: str,
                 mini_config: Optional[mini_world.MiniWorldConfig] = None,
                 skip_bad: bool = False) -> _PreferenceBuilder:
  """A builder of ``dataset`` over ``data_dir`` (prepared or not)."""
  _check_dataset(dataset, mini_config)
  kwargs = {"data_dir": data_dir, "skip_bad": skip_bad}
  if dataset == "mini":
    config = mini_builder_config(mini_config)
    # The registered default is passed by name: tfds refuses a second config object of that name.
    kwargs["config"] = config.name if config.name == "default" else config
  return BUILDERS[dataset](**kwargs)


def load_examples(dataset: str, split: str, *, data_dir: str,
                  mini_config: Optional[mini_world.MiniWorldConfig] = None) -> list[schema.PreferenceExample]:
  """All examples of a prepared split, in the prepared (deterministic) order."""
  builder = make_builder(dataset, data_dir=data_dir, mini_config=mini_config)
  path = prepared_dir(dataset, data_dir, mini_config=mini_config)
  examples = []
  for i, row in enumerate(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))):
    d = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items()}
    d["label"], d["step"] = float(d["label"]), int(d["step"])
    examples.append(schema.PreferenceExample.from_dict(d, path=f"{path}:{split}", record=i))
  return examples
