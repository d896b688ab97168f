"""`t5align data prepare`: build a dataset's tfds directory once, and report what went in.

    t5align data prepare --dataset=tldr --manual_dir=/data/tldr --data_dir=/data/tfds

is `prepare(dataset="tldr", manual_dir="/data/tldr", data_dir="/data/tfds")`.
Preparing twice reuses the prepared directory. The report gives the split
sizes, the readers' counts of what was kept and dropped (stored with the
dataset, so they are shown on reuse too) and, when a vocabulary is at hand,
how many prompts and responses the truncation rule of `t5align.data.tasks`
cuts at the given feature lengths.
"""

import dataclasses
import logging
import os
from typing import Mapping, Optional

import tensorflow_datasets as tfds

from t5align.data import mini_world
from t5align.data import tasks
from t5align.data import tfds_builders
from t5align.data import vocab

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PrepareReport:
  """What `prepare` built (or found) and what the truncation rule would cut."""
  dataset: str
  tfds_name: str
  path: str
  reused: bool
  split_sizes: dict[str, int]
  read_summaries: dict[str, str]  # split (or 'all') -> readers.ReadStats.summary()
  truncation: dict[str, tasks.TruncationStats]  # split -> stats; empty without a vocabulary
  feature_lengths: dict[str, int]

  def summary(self) -> str:
    lines = [f"{self.dataset}: {self.tfds_name} {'reused' if self.reused else 'prepared'} at {self.path}"]
    lines += [f"  {split}: {size} pairs" for split, size in self.split_sizes.items()]
    lines += [f"  read ({split}): {text}" for split, text in self.read_summaries.items()]
    if self.truncation:
      lines += [f"  truncation at {self.feature_lengths} ({split}): {stats.summary()}"
                for split, stats in self.truncation.items()]
    else:
      lines.append("  truncation not counted (give vocabulary_path)")
    return "\n".join(lines)


def prepare(*, dataset: str, data_dir: str, manual_dir: Optional[str] = None,
            mini_config: Optional[mini_world.MiniWorldConfig] = None,
            vocabulary_path: Optional[str] = None,
            feature_lengths: Mapping[str, int] = tasks.PAPER_FEATURE_LENGTHS,
            skip_bad: bool = False) -> PrepareReport:
  """Prepares ``dataset`` into ``data_dir`` (once) and returns a report.

  Args:
    dataset: one of `tfds_builders.DATASETS`.
    data_dir: the tfds data directory (created if needed).
    manual_dir: the downloaded public files (every dataset but 'mini'); see
      each builder's MANUAL_DOWNLOAD_INSTRUCTIONS and docs/data.md.
    mini_config: the `MiniWorldConfig` for 'mini' (None = the default world).
    vocabulary_path: SentencePiece model used to count truncation; None skips
      the count for the public datasets and uses the mini vocabulary for 'mini'.
    feature_lengths: {'inputs': L, 'targets': T} for the truncation count.
    skip_bad: skip (and count) bad records instead of raising.
  """
  builder = tfds_builders.make_builder(dataset, data_dir=data_dir, mini_config=mini_config,
                                       skip_bad=skip_bad)
  path = tfds_builders.prepared_dir(dataset, data_dir, mini_config=mini_config)
  reused = os.path.exists(os.path.join(path, "dataset_info.json"))
  if not reused and dataset != "mini":
    if manual_dir is None:
      raise ValueError(f"dataset {dataset!r} needs --manual_dir with its downloaded files:\n"
                       f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
      raise FileNotFoundError(f"manual_dir {manual_dir} is missing or empty:\n"
                              f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP))

  metadata = builder.info.metadata or {}
  report = PrepareReport(
      dataset=dataset, tfds_name=tfds_builders.tfds_name(dataset, mini_config=mini_config),
      path=path, reused=reused,
      split_sizes={split: builder.info.splits[split].num_examples for split in tfds_builders.SPLITS},
      read_summaries={split: s["summary"] for split, s in metadata.get("read_stats", {}).items()},
      truncation={}, feature_lengths=dict(feature_lengths))
  if vocabulary_path is not None or dataset == "mini":
    vocabulary = vocab.get_vocabulary(vocabulary_path)
    for split in tfds_builders.SPLITS:
      examples = tfds_builders.load_examples(dataset, split, data_dir=data_dir, mini_config=mini_config)
      report.truncation[split] = tasks.truncation_stats(examples, vocabulary, feature_lengths)
  logger.info("%s", report.summary())
  return report


def main(argv) -> int:
  """``t5align data prepare --dataset=NAME --data_dir=DIR [--manual_dir=DIR] ...``."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="t5align data", description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=["prepare"])
  parser.add_argument("--dataset", required=True, choices=sorted(tfds_builders.DATASETS))
  parser.add_argument("--data_dir", required=True, help="tfds data directory to write")
  parser.add_argument("--manual_dir", help="the downloaded public files (not for 'mini')")
  parser.add_argument("--vocabulary_path", help="SentencePiece model, to count truncation")
  parser.add_argument("--inputs_length", type=int, default=tasks.PAPER_FEATURE_LENGTHS[tasks.INPUTS])
  parser.add_argument("--targets_length", type=int,
                      default=tasks.PAPER_FEATURE_LENGTHS[tasks.TARGETS])
  parser.add_argument("--skip_bad", action="store_true",
                      help="skip (and count) bad records instead of stopping at the first")
  args = parser.parse_args(list(argv))
  report = prepare(dataset=args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                   vocabulary_path=args.vocabulary_path, skip_bad=args.skip_bad,
                   feature_lengths={tasks.INPUTS: args.inputs_length,
                                    tasks.TARGETS: args.targets_length})
  print(report.summary(), flush=True)
  return 0
