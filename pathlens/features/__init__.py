"""Features: what a model's activations are made of, beyond heads and neurons.

- corpus (corpus.py): text to collect activations from — `default_corpus()` (offline: the public-domain World
  English Bible from Debian's `sword-text-web`), `text_files`, `hf_dataset` (streamed), `texts`; `windows` cuts it
  into seeded, fixed-length context windows with BOS handling per tokenizer.
- activation store (store.py): `collect` streams any set of sites over a corpus into checksummed safetensors
  shards with a manifest, resumable after a kill; `ActivationStore` reads them back (`.dataset`/`.loader`: seeded,
  shuffled across shards); `stream` yields the same batches without touching disk; both size their batches and
  shards from `max_memory=` (store_budget.py: `store_plan`), and `collect(executor=...)` computes shards on Ray.
- semi-NMF (snmf.py): `snmf` factorizes MLP activations into mixed-sign features with non-negative codes
  (METHODS §20), batched over a store; `SNMFResult.features` gives each feature's top contexts and promoted tokens,
  `.steering_vector(i)` a `SteeringVector`.
- sparse dictionaries (sae.py, train.py, evaluate.py, contexts.py): `Dictionary` (ReLU, TopK, BatchTopK, JumpReLU;
  transcoders with `d_out`), `Trainer`/`train` (several from one batch stream: `store_batches`, `on_the_fly`),
  `evaluate` (the evaluation card), `top_contexts`; features as sites (splice.py, circuit.py): `splice` a
  dictionary into a model so its latents are sites (`L6.sae.F12`), `node_circuit` over heads, MLPs and latents.
"""

from pathlens.features.circuit import NodeCircuit, node_circuit
from pathlens.features.contexts import LatentContext, top_contexts
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
from pathlens.features.evaluate import EvaluationCard, evaluate
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.snmf import SNMFResult, snmf
from pathlens.features.splice import feature_direction, latent_sites, splice
from pathlens.features.store import ActivationStore, StoreDataset, collect, stream
from pathlens.features.store_budget import StorePlan, store_plan
from pathlens.features.train import TrainConfig, Trainer, on_the_fly, store_batches, train

__all__ = [
    "ActivationStore",
    "Corpus",
    "Dictionary",
    "DictionaryConfig",
    "EvaluationCard",
    "LatentContext",
    "NodeCircuit",
    "SNMFResult",
    "StoreDataset",
    "StorePlan",
    "TrainConfig",
    "Trainer",
    "Windows",
    "collect",
    "corpus",
    "default_corpus",
    "evaluate",
    "feature_direction",
    "hf_dataset",
    "latent_sites",
    "node_circuit",
    "on_the_fly",
    "parse_token_count",
    "snmf",
    "splice",
    "store_batches",
    "store_plan",
    "stream",
    "text_files",
    "texts",
    "top_contexts",
    "train",
    "windows",
]
