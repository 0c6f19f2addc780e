"""The steer HTML page (pathlens.report.steer_page): every text is escaped, every section is there."""

from __future__ import annotations

from pathlib import Path

from pathlens.report.steer_page import render_steer_page, write_steer_page

EVIL = "<script>alert(1)</script>"


def _record() -> dict:
    rows = [
        {
            "scale": s,
            "vader_mean": 0.1 * s,
            "vader_shift": s,
            "ppl": 10.0 + s,
            "ppl_increase": abs(s) / 10,
            "kl": 0.01,
            "entropy": 2.0,
            "n": 4,
        }
        for s in (-0.2, 0.0, 0.2)
    ]
    return {
        "model": f"m{EVIL}",
        "concept": "sentiment",
        "method": "mean-diff",
        "site": "L10.resid_post",
        "vector": "out/vector.safetensors",
        "vectors": {"mean-diff": {"meta": {"data": f"pairs {EVIL}", "date": "2026-12-05", "read_at": "last"}}},
        "prompts": 4,
        "max_new_tokens": 12,
        "do_sample": False,
        "seed": 0,
        "ppl_budget": 0.25,
        "unsteered_vader_mean": 0.3,
        "rows": rows,
        "examples": [{"prompt": f"p {EVIL}", "unsteered": f"text {EVIL}", "scale +0.2": f"happy {EVIL}"}],
        "explanation": {
            "metric": "token_set_logit_diff",
            "n_prompts": 4,
            "unsteered_metric": 1.0,
            "steered_metric": 3.0,
            "scale": 0.2,
            "method": "atp/eap:denoise",
            "paths": [{"nodes": ["intervention:L10.resid_post", f"L29.mlp{EVIL}", "logits"], "score": 0.1}],
            "top_heads": [{"node": "L27.H1", "effect": 0.18}],
            "top_mlps": [{"node": "L29.mlp", "effect": 0.45}],
            "vector_edges": [{"sender": "intervention:L10.resid_post", "receiver": "logits", "score": 0.2}],
            "top_edges": [],
        },
    }


def test_generated_text_and_every_record_field_are_escaped() -> None:
    page = render_steer_page(_record(), png=b"\x89PNG fake")
    assert "<script" not in page.lower()
    # model (title, heading, provenance), contrast data, prompt, two generations, a path node
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 8
    for section in ("Provenance", "Dose–response", "Before and after", "Cost", "Why it works"):
        assert f"<h2>{section}</h2>" in page
    assert "data:image/png;base64," in page and "script-src" not in page and "default-src &#x27;none&#x27;" in page
    assert "intervention:L10.resid_post → " in page and "+0.45" in page


def test_write_steer_page_reads_the_folder(tmp_path: Path) -> None:
    import json

    (tmp_path / "steer.json").write_text(json.dumps({**_record(), "explanation": None}))
    page = write_steer_page(tmp_path)
    text = page.read_text()
    assert page.name == "steer.html" and "Not computed" in text and "No PNG" in text
