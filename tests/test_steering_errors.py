"""Bad input to steering gets a PathlensError naming the offending input and the fix, and leaves the model as it
was: a vector whose width does not fit its site, a scale that is not finite, positions out of range or not
positions at all, a per-row list of the wrong length, an empty contrast set, an unknown concept set."""

from __future__ import annotations

import math

import pytest
import torch

from pathlens import PathlensError
from pathlens.steering.generate import generate
from pathlens.steering.vector import SteeringVector
from tests.helpers import assert_untouched, snapshot, tiny_model


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_a_vector_whose_width_does_not_fit_the_site_is_named() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    ids, mask = _ids()
    vec = SteeringVector({"L1.resid_post": torch.ones(7)})
    with pytest.raises(PathlensError, match=r"vector for L1.resid_post has 7 entries.*is 32 wide"):
        generate(model, ids, vec, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(PathlensError, match=r"vector for L1.resid_post has 7 entries"):
        with vec.applied(model):
            pass
    with pytest.raises(PathlensError, match=r"layer of site L5.resid_post is 5, out of range"):
        SteeringVector({"L5.resid_post": torch.ones(32)}).check(model)
    with pytest.raises(PathlensError, match=r"L0.q is not a site a \(d,\) vector is added to"):
        SteeringVector({"L0.q": torch.ones(8)}).check(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "2"])
def test_a_scale_that_is_not_a_finite_number_is_named(scale: object) -> None:
    model = tiny_model("gpt2")
    before = snapshot(model)
    ids, mask = _ids()
    vec = SteeringVector({"L0.resid_post": torch.ones(32)})
    with pytest.raises(PathlensError, match=r"steering scale must be a finite number, got"):
        SteeringVector({"L0.resid_post": torch.ones(32)}, scale=scale)  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match=r"steering scale must be a finite number"):
        with vec.applied(model, scale=scale):  # type: ignore[arg-type]
            pass
    with pytest.raises(PathlensError, match=r"scale of steer\[1\] must be a finite number"):
        generate(model, ids, [None, (vec, scale)], attention_mask=mask, max_new_tokens=2)  # type: ignore[list-item]
    with pytest.raises(PathlensError, match=r"steering factor must be a finite number"):
        vec * scale  # type: ignore[operator]
    assert_untouched(model, before)


def test_positions_out_of_range_or_not_positions_are_named() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    ids, mask = _ids()
    mask[1, :2] = 0
    far = SteeringVector({"L0.resid_post": torch.ones(32)}, positions=[1, 40])
    with pytest.raises(PathlensError, match=r"steering positions \[40\] are out of range.*valid positions are -3..5"):
        generate(model, ids, far, attention_mask=mask, max_new_tokens=3)
    with pytest.raises(PathlensError, match=r"steering positions \[-4\] are out of range"):
        generate(model, ids, [None, SteeringVector(far.vectors, positions=[-4])], attention_mask=mask)
    with pytest.raises(PathlensError, match=r"steering positions 'middle' is not a policy"):
        SteeringVector({"L0.resid_post": torch.ones(32)}, positions="middle")  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match=r"steering positions \[1.5\]"):
        SteeringVector({"L0.resid_post": torch.ones(32)}, positions=[1.5])  # type: ignore[list-item]
    assert_untouched(model, before)


def test_bad_vectors_and_steer_lists_are_named() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    ids, mask = _ids()
    vec = SteeringVector({"L0.resid_post": torch.ones(32)})
    with pytest.raises(PathlensError, match=r"steer has 3 entries but there are 2 prompts"):
        generate(model, ids, [vec, None, vec], attention_mask=mask)
    with pytest.raises(PathlensError, match=r"steer\[0\] is a Tensor"):
        generate(model, ids, [torch.ones(32), None], attention_mask=mask)  # type: ignore[list-item]
    with pytest.raises(PathlensError, match=r"vectors is empty"):
        SteeringVector({})
    with pytest.raises(PathlensError, match=r"the vector for L0.resid_post holds NaN/inf"):
        SteeringVector({"L0.resid_post": torch.full((32,), math.nan)})
    with pytest.raises(PathlensError, match=r"normalize=True needs a positive typical norm.*L0.resid_post"):
        SteeringVector({"L0.resid_post": torch.ones(32)}, normalize=True)
    with pytest.raises(PathlensError, match=r"max_new_tokens must be a positive integer, got 0"):
        generate(model, ids, vec, attention_mask=mask, max_new_tokens=0)
    assert_untouched(model, before)


def test_empty_or_unpaired_contrast_sets_and_unknown_methods_are_named() -> None:
    from pathlens.steering.finders import find, mean_difference, pca_direction, read_activations
    from tests.test_steering_finders import NEGATIVE, POSITIVE, tiny_with_words

    model = tiny_with_words()
    before = snapshot(model)
    with pytest.raises(PathlensError, match=r"the negative contrast set is empty"):
        mean_difference(model, POSITIVE, [], "L1.resid_post")
    with pytest.raises(PathlensError, match=r"the positive contrast set must be a list of texts"):
        mean_difference(model, "the film was good", NEGATIVE, "L1.resid_post")
    with pytest.raises(PathlensError, match=r"5 positive but 2 negative prompts"):
        pca_direction(model, POSITIVE, NEGATIVE[:2], "L1.resid_post")
    with pytest.raises(PathlensError, match=r"unknown steering method 'svd'"):
        find(model, "svd", POSITIVE, NEGATIVE, "L1.resid_post")
    with pytest.raises(PathlensError, match=r"read position 9 is outside prompt 0"):
        read_activations(model, POSITIVE, "L1.resid_post", at=9)
    with pytest.raises(PathlensError, match=r"layer of site L7.resid_post is 7"):
        mean_difference(model, POSITIVE, NEGATIVE, "L7.resid_post")
    assert_untouched(model, before)


def test_an_unknown_concept_set_is_named() -> None:
    from pathlens.steering.data import contrast

    with pytest.raises(PathlensError, match=r"unknown concept set 'happiness'; pathlens ships \['sentiment'"):
        contrast("happiness")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--concept", "happiness"], "unknown concept set 'happiness'"),
        (["--method", "svd"], "unknown method 'svd'"),
        (["--scales", "0.1,big"], "is not a comma list of numbers"),
    ],
)
def test_steer_command_rejects_bad_options_before_loading(args: list[str], named: str, tmp_path: object) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app

    result = CliRunner().invoke(app, ["steer", "--model", "no-such-model", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert named in " ".join(result.output.split())


def test_steer_study_on_a_tiny_model_writes_its_files(tmp_path: object) -> None:
    """Not a bad input: the study behind `pathlens steer`, end to end on a tiny model (kept here with its CLI)."""
    import json
    from pathlib import Path

    from pathlens.steering.sweep import steer_study
    from tests.test_steering_finders import tiny_with_words

    model = tiny_with_words()
    before = snapshot(model)
    out = Path(str(tmp_path))
    record = steer_study(model, "sentiment", "pca", out, layer=1, scales=(-1.0, 1.0), n_prompts=3, max_new_tokens=2)
    assert record["site"] == "L1.resid_post" and len(record["examples"]) == 3
    assert set(record["examples"][0]) == {"prompt", "unsteered", "scale +1", "scale -1"}
    for name in ("steer.json", "vector.safetensors", "vector.json", "generations.json", "dose_response.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "steer.json").read_text())["method"] == "pca"
    # the word-level vocabulary maps most sentiment tokens to <unk> (dropped from both sets); the rest explain it
    assert record["explanation"]["paths"][0]["nodes"][0] == "intervention:L1.resid_post"
    assert SteeringVector.load(out / "vector").normalize
    assert_untouched(model, before)
    with pytest.raises(PathlensError, match=r"layer of site L9.resid_post is 9"):
        steer_study(model, "sentiment", "pca", out, layer=9)
