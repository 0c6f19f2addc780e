"""Models split over devices by accelerate give every engine the unsplit model's results (within 1e-5).

On this CPU-only machine "split" means a device map that keeps some modules on the CPU and offloads the others
to disk (accelerate's hooks load their weights from files for each forward and leave "meta" tensors in the
module): the hardest case for pathlens, which reads weights (W_O per head, q/k/v projections) outside forwards
and must hand each module inputs on its execution device. The reference is the same weights, unsplit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import dispatch_model

import pathlens
from pathlens import Model
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import faithfulness_curve
from pathlens.tasks import ioi
from tests.helpers import FAMILIES, padded_task, tiny_model

TOL = 1e-5


def offloaded_map(model: Model, embed: str = "cpu") -> dict[str, str]:
    """Block 0 and every other top-level module on the CPU; block 1 and the unembedding on disk."""
    a = model.arch
    placement = {f"{a.blocks}.0": "cpu", f"{a.blocks}.1": "disk"}
    for name, module in model.hf.named_modules():
        outside = name and not name.startswith(a.blocks) and not any(name.startswith(k + ".") for k in placement)
        if outside and not list(module.children()):
            placement[name] = "cpu"
    placement[a.unembed] = "disk"
    placement[a.embed] = embed
    return placement


def split(model: Model, folder: Path, embed: str = "cpu") -> Model:
    hf = dispatch_model(copy.deepcopy(model.hf), device_map=offloaded_map(model, embed), offload_dir=folder)
    assert any(p.device.type == "meta" for p in hf.parameters())
    return Model(hf, name=model.name)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=TOL, rtol=0, equal_nan=True, msg=what)


def no_torch_hooks(model: Model) -> None:
    for name, module in model.hf.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name}"


ENGINES: dict[str, Callable[[Model, Any], torch.Tensor]] = {
    "patch heads (cone, per position)": lambda m, t: (
        pathlens.patch(m, t, sites="heads", positions="each", progress=False).values
    ),
    "patch resid_pre (cone)": lambda m, t: (
        pathlens.patch(m, t, sites="resid_pre", positions="each", progress=False).values
    ),
    "head read": lambda m, t: m.run(t.clean_ids, attention_mask=t.attention_mask, cache=["L1.head"]).cache["L1.head"],
    "atp": lambda m, t: pathlens.atp(m, t, sites="heads").values,
    "eap": lambda m, t: pathlens.edge_attribution(m, t).scores,
    "edge patching curve": lambda m, t: torch.tensor(
        faithfulness_curve(EdgePatcher(m, t), pathlens.edge_attribution(m, t), sizes=[1, 4, 16]).metric
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_engine_on_a_disk_offloaded_model_matches_the_whole_model(family: str, tmp_path: Path) -> None:
    whole, task = tiny_model(family, weight_scale=4.0), padded_task()
    sharded = split(whole, tmp_path)
    for name, engine in ENGINES.items():
        assert_close(engine(sharded, task), engine(whole, task), f"{family}: {name}")
    no_torch_hooks(sharded)


def test_offloaded_embedding_and_a_checkpointed_sweep(tmp_path: Path) -> None:
    whole, task = tiny_model("llama", weight_scale=4.0), padded_task()
    sharded = split(whole, tmp_path / "offload", embed="disk")
    assert sharded.device == torch.device("cpu")
    plain = pathlens.patch(whole, task, progress=False)
    saved = pathlens.patch(sharded, task, progress=False, out=tmp_path / "sweep")
    assert_close(saved.values, plain.values, "checkpointed sweep")


def test_load_with_a_device_map(tmp_path: Path) -> None:
    whole, task = tiny_model("qwen2", weight_scale=4.0), padded_task()
    whole.hf.save_pretrained(tmp_path / "model")
    placement = offloaded_map(whole)
    sharded = pathlens.load(tmp_path / "model", device_map=placement, offload_folder=tmp_path / "offload")
    assert sharded.source is not None and sharded.source["device_map"] == placement
    assert_close(
        pathlens.patch(sharded, task, progress=False).values, pathlens.patch(whole, task, progress=False).values, ""
    )
    induction = pathlens.load("induction-2l")
    auto = pathlens.load(
        "induction-2l", device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "auto"
    )
    assert "disk" in auto.hf.hf_device_map.values()  # type: ignore[union-attr]
    ids = torch.randint(0, induction.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_close(auto.run(ids).logits, induction.run(ids).logits, "induction-2l auto")


def test_bad_sharding_arguments(tmp_path: Path) -> None:
    with pytest.raises(pathlens.PathlensError, match="not both"):
        pathlens.load("induction-2l", device="cpu", device_map="auto")
    with pytest.raises(pathlens.PathlensError, match="offload_folder="):
        pathlens.load("induction-2l", device_map={"model": "disk"})
    with pytest.raises(pathlens.PathlensError, match="add device_map="):
        pathlens.load("induction-2l", max_memory={"cpu": "1GB"})
    with pytest.raises(pathlens.PathlensError, match="device_map='everywhere'"):
        pathlens.load("induction-2l", device_map="everywhere")


def test_smollm2_split_over_cpu_and_disk(smollm2: Model, tmp_path: Path) -> None:
    """SmolLM2 with its last 10 blocks and the unembedding on disk: patching (one layer's heads, on disk) and edge
    patching (three circuits) equal the unsplit model's."""
    a = smollm2.arch
    placement = {f"{a.blocks}.{i}": ("disk" if i >= 20 else "cpu") for i in range(a.n_layers)}
    placement.update({"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"})
    sharded = pathlens.load("smollm2", device_map=placement, offload_folder=tmp_path)
    task = ioi(smollm2.tokenizer, n=4, seed=0)
    options: dict[str, Any] = {"sites": "heads", "layers": [27], "progress": False}
    assert_close(
        pathlens.patch(sharded, task, **options).values, pathlens.patch(smollm2, task, **options).values, "patch"
    )
    whole_patcher, split_patcher = EdgePatcher(smollm2, task), EdgePatcher(sharded, task)
    kept = torch.rand(
        (3, whole_patcher.n_senders, whole_patcher.n_receivers), generator=torch.Generator().manual_seed(0)
    )
    circuits = kept < torch.tensor([0.0, 0.3, 1.0])[:, None, None]
    assert_close(split_patcher.metric_of(circuits), whole_patcher.metric_of(circuits), "edge patching")
