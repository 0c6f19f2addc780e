"""Features: what a model's activations are made of, beyond heads and neurons.

- corpus (corpus.py): text to collect activations from — `default_corpus()` (offline: the public-domain World
  English Bible from Debian's `sword-text-web`), `text_files`, `hf_dataset` (streamed), `texts`; `windows` cuts it
  into seeded, fixed-length context windows with BOS handling per tokenizer.
- activation store (store.py): `collect` streams any set of sites over a corpus into checksummed safetensors
  shards with a manifest, resumable after a kill; `ActivationStore` reads them back (`.dataset`/`.loader`: seeded,
  shuffled across shards); `stream` yields the same batches without touching disk.
- semi-NMF (snmf.py): `snmf` factorizes MLP activations into mixed-sign features with non-negative codes
  (METHODS §20), batched over a store; `SNMFResult.features` gives each feature's top contexts and promoted tokens,
  `.steering_vector(i)` a `SteeringVector`.
"""

from pathlens.features.corpus import (
    Corpus,
    Windows,
    corpus,
    default_corpus,
    hf_dataset,
    parse_token_count,
    text_files,
    texts,
    windows,
)
from pathlens.features.snmf import SNMFResult, snmf
from pathlens.features.store import ActivationStore, StoreDataset, collect, stream

__all__ = [
    "ActivationStore",
    "Corpus",
    "SNMFResult",
    "StoreDataset",
    "Windows",
    "collect",
    "corpus",
    "default_corpus",
    "hf_dataset",
    "parse_token_count",
    "snmf",
    "stream",
    "text_files",
    "texts",
    "windows",
]
