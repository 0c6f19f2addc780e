"""Patching a spliced dictionary's latents through the causal cone (pathlens.patching.cone): the variants enter at
the layer after a resid_post / mlp_out / transcoder target and equal the full-forward path (cone=False, the
model's own forward with the latent written, ≤ 1e-6); a family whose stream is not rebuilt that way starts at the
target's layer; resuming a checkpoint with another dictionary is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pathlens
from pathlens.errors import PathlensError
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.splice import latent_sites
from pathlens.model import Model
from pathlens.patching.cone import ConeRunner
from pathlens.patching.spec import PatchSpec
from pathlens.patching.sweep import planned_chunks
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

D, D_MLP, WIDTH = 32, 64, 12
TOL = 1e-6  # cone vs full forward: the same float32 ops, batched and sliced differently


def _dictionary(d_in: int = D, d_out: int | None = None, seed: int = 0) -> Dictionary:
    """A ReLU dictionary with biases and scales away from their defaults, so latents fire and matter."""
    d = Dictionary(DictionaryConfig("relu", d_in, WIDTH, d_out=d_out), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.W_dec.mul_(10.0)
        d.b_enc.normal_(0.0, 0.3, generator=gen)
        d.b_dec.normal_(0.0, 0.1, generator=gen)
        d.s_in.fill_(0.8)
        d.s_out.fill_(0.9)
    return d


SPLICES = {  # name -> (source, target, d_in)
    "resid_post": ("L{l}.resid_post", None, D),
    "mlp_out": ("L{l}.mlp_out", None, D),
    "transcoder": ("L{l}.mlp_in", "L{l}.mlp_out", D),
}


def _both(model: Model, task: pathlens.Task, sites: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    fast = pathlens.patch(model, task, sites=sites, progress=False, **kwargs)  # type: ignore[arg-type]
    slow = pathlens.patch(model, task, sites=sites, progress=False, cone=False, **kwargs)  # type: ignore[arg-type]
    return fast.values, slow.values


@pytest.mark.parametrize("kind", list(SPLICES))
@pytest.mark.parametrize("layer", [0, 1])
def test_latent_cone_equals_full_forward(kind: str, layer: int) -> None:
    """Every latent and the error term, positions all and each, noising and denoising: cone == full ≤ 1e-6; the
    variants start at layer + 1 (layer 2 of this 2-layer model: the final norm and unembedding only)."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    source, target, d_in = SPLICES[kind]
    before = snapshot(model)
    tc = target is not None
    with model.splice(
        _dictionary(d_in, D if tc else None), source.format(l=layer), target=target and target.format(l=layer)
    ) as sp:
        runner = ConeRunner(model, task.clean_ids, task.attention_mask, task.answer_pos)
        assert runner.entries == {sp.latents: layer + 1}
        sites = [*latent_sites(model, str(sp.latents)), str(sp.error)]
        spec = PatchSpec(sites, "each").resolve(model, task)
        assert {c.layer for c in planned_chunks(spec, None, 4096)} <= {layer + 1, -1}
        for positions in ("all", "each"):
            for direction in ("noise", "denoise"):
                fast, slow = _both(model, task, sites, positions=positions, direction=direction)
                assert fast.shape == slow.shape
                assert (fast - slow).abs().max().item() <= TOL, (positions, direction)
                assert (slow - slow.flatten()[0]).abs().max().item() > 1e-3  # the latents do matter
    assert_untouched(model, before)


def test_family_name_sweeps_every_latent_and_ablates() -> None:
    """sites="L0.sae" is every latent of the splice (one cell each); zero ablation through the cone too."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_dictionary(), "L0.resid_post") as sp:
        scores = pathlens.patch(model, task, sites=str(sp.latents), progress=False)
        assert scores.coords["site"] == latent_sites(model, str(sp.latents))
        listed = pathlens.patch(model, task, sites=latent_sites(model, str(sp.latents)), progress=False)
        assert torch.equal(scores.values, listed.values)
        fast, slow = _both(model, task, str(sp.latents), ablation="zero")
        assert (fast - slow).abs().max().item() <= TOL


def test_two_dictionaries_at_one_layer() -> None:
    """A transcoder at L0.mlp_out and an SAE at L0.resid_post enter together: the SAE encodes the stream the
    transcoder's patched latents changed. Their latents, each sweep and one mixed with heads: cone == full."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with (
        model.splice(_dictionary(seed=1), "L0.mlp_in", target="L0.mlp_out") as tc,
        model.splice(_dictionary(seed=2), "L0.resid_post") as sae,
    ):
        sites = [*latent_sites(model, str(tc.latents)), *latent_sites(model, str(sae.latents)), "L1.H0", "L0.H1"]
        for positions in ("all", "each"):
            fast, slow = _both(model, task, sites, positions=positions)
            assert (fast - slow).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "neox_parallel"])
def test_other_families(family: str) -> None:
    """GPT-2 rebuilds resid_post as resid_mid + mlp_out: latents enter at the next layer. A parallel-residual
    model has no resid_mid: an mlp_out dictionary's latents start at their own layer. Both equal the full path."""
    model = tiny_model(family, weight_scale=3.0)
    task = padded_task()
    with model.splice(_dictionary(), "L0.mlp_out") as sp:
        runner = ConeRunner(model, task.clean_ids, task.attention_mask, task.answer_pos)
        assert runner.entries == {sp.latents: 0 if family == "neox_parallel" else 1}
        for positions in ("all", "each"):
            fast, slow = _both(model, task, str(sp.latents), positions=positions)
            assert (fast - slow).abs().max().item() <= TOL


def test_entry_falls_back_when_the_stream_is_not_rebuilt_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the base run shows resid_mid + mlp_out ≠ resid_post (here: a cached resid_mid perturbed), the runner
    does not trust the shortcut and starts at the target's layer; the scores still equal the full path."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    original = ConeRunner._checked_entry

    def perturbed(self: ConeRunner, splice: object) -> int:
        key = next(s for s in self.entry_values if s.kind == "resid_mid")
        self.entry_values[key] = self.entry_values[key] + 1e-3
        return original(self, splice)  # type: ignore[arg-type]

    monkeypatch.setattr(ConeRunner, "_checked_entry", perturbed)
    with model.splice(_dictionary(), "L0.mlp_out") as sp:
        runner = ConeRunner(model, task.clean_ids, task.attention_mask, task.answer_pos)
        assert runner.entries == {sp.latents: 0}
        fast, slow = _both(model, task, str(sp.latents))
        assert (fast - slow).abs().max().item() <= TOL


def test_resume_with_another_dictionary_is_refused(tmp_path: Path) -> None:
    """The checkpoint records each splice (site, width, SHA-256): the same dictionary resumes bit for bit, another
    one (or none) is refused naming the latents and what to do."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_dictionary(seed=0), "L1.resid_post"):
        first = pathlens.patch(model, task, sites="L1.sae", out=tmp_path, progress=False)
        again = pathlens.patch(model, task, sites="L1.sae", out=tmp_path, progress=False)
        assert torch.equal(first.values, again.values)
    saved = (tmp_path / "sweep.json").read_text()
    assert '"latents": "L1.sae"' in saved and '"target": "L1.resid_post"' in saved
    with model.splice(_dictionary(seed=5), "L1.resid_post"):
        with pytest.raises(PathlensError, match=r"spliced dictionaries differ.*L1\.sae at L1\.resid_post.*overwrite"):
            pathlens.patch(model, task, sites="L1.sae", out=tmp_path, progress=False)
        other = pathlens.patch(model, task, sites="L1.sae", out=tmp_path, overwrite=True, progress=False)
        assert not torch.equal(other.values, first.values)
    with pytest.raises(PathlensError, match="spliced dictionaries differ"):
        pathlens.patch(model, task, sites=["L1.resid_post"], out=tmp_path, progress=False)
