"""`Model`: an unmodified PyTorch / Hugging Face model plus its tokenizer and architecture map.

`pathlens.load(name)` takes an embedded model name ("smollm2", "gemma3-270m", "induction-2l"), a local folder
or a Hugging Face hub name; `pathlens.Model(hf_model, tokenizer)` wraps a model you already have. The model
is put in eval mode (dropout off, so runs are deterministic) and otherwise never changed: sites are read and
written only through hooks that exist inside `Model.run`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pathlens.arch.base import ArchMap, get_blocks, get_module
from pathlens.arch.calls import first_output
from pathlens.arch.generic import arch_for
from pathlens.errors import PathlensError
from pathlens.hooks import BackwardRule, Cache, Dictionary, HookSession, Splice
from pathlens.interventions import Intervention, check_finite, resolve_index
from pathlens.sites import GLOBAL_KINDS, LAYER_KINDS, SPLICE_KINDS, Site, parse_site

_DESCRIPTIONS = {
    "embed": "token embedding output",
    "resid_pre": "residual stream entering the block",
    "resid_mid": "residual stream after attention (resid_pre + attn_out)",
    "resid_post": "residual stream leaving the block",
    "attn_out": "attention's write into the residual stream",
    "head": "each head's write into the residual stream (z_h @ W_O[h])",
    "head_z": "each head's output before the output projection",
    "q": "queries as they enter the dot product",
    "k": "keys per key-value group",
    "v": "values per key-value group",
    "attn_pattern": "attention probabilities (query pos, head, key pos)",
    "attn_in": "attention input (after its norm; q/k/v are projected from it)",
    "mlp_in": "MLP input (after its norm)",
    "mlp_post": "MLP neuron activations (input of the down projection)",
    "mlp_out": "MLP's write into the residual stream",
    "logits": "unembedding output (before a final logit soft-cap, if the model has one)",
}


@dataclass(frozen=True)
class SiteInfo:
    """One row of `Model.sites`: a site family, its shape (b = batch, p = positions) and meaning."""

    name: str
    shape: tuple[str | int, ...]
    layers: str
    description: str


@dataclass
class Run:
    """The result of `Model.run`: logits (b, p, vocab) and the requested activations."""

    logits: Tensor
    cache: Cache


Inputs = "str | Sequence[str] | Tensor | Mapping[str, Tensor]"


class Model:
    """A wrapped model: `.hf` (the unmodified module), `.tokenizer`, `.arch` (ArchMap), `.sites`, `.run()`."""

    def __init__(
        self, hf_model: nn.Module, tokenizer: Any = None, arch: ArchMap | None = None, name: str | None = None
    ):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.arch = arch or arch_for(hf_model)
        self.name = name or getattr(getattr(hf_model, "config", None), "_name_or_path", None) or type(hf_model).__name__
        self.source: dict[str, Any] | None = None  # `pathlens.load`'s arguments (set by it): how to load it again
        self.splices: list[Splice] = []  # dictionaries spliced into every run (`splice`)
        get_blocks(hf_model, self.arch.blocks)

    def __repr__(self) -> str:
        a = self.arch
        return (
            f"Model({self.name!r}, family={a.family}, layers={a.n_layers}, heads={a.n_heads}, "
            f"kv_heads={a.n_kv_heads}, d_model={a.d_model}, d_head={a.d_head}, d_mlp={a.d_mlp})"
        )

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def n_heads(self) -> int:
        return self.arch.n_heads

    @property
    def config(self) -> Any:
        """The wrapped model's configuration (`hf.config`; a transformers PretrainedConfig)."""
        return getattr(self.hf, "config", None)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device for a model dispatched by accelerate (whose weights
        may be offloaded, "meta"), else the first parameter's device."""
        hook = getattr(get_module(self.hf, self.arch.embed), "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
        return next((p.device for p in self.hf.parameters() if p.device.type != "meta"), torch.device("cpu"))

    def kv_group(self, head: int) -> int:
        """The key-value group that query head `head` reads (grouped-query attention)."""
        self._check_range("head", head, self.arch.n_heads)
        return head // (self.arch.n_heads // self.arch.n_kv_heads)

    def query_heads(self, group: int) -> list[int]:
        """The query heads that share key-value group `group`."""
        self._check_range("key-value group", group, self.arch.n_kv_heads)
        per = self.arch.n_heads // self.arch.n_kv_heads
        return list(range(group * per, (group + 1) * per))

    # ---- sites --------------------------------------------------------------------------------------

    @property
    def sites(self) -> list[SiteInfo]:
        """Every site family of this model with its shape, for discovery (`pathlens sites MODEL` prints it)."""
        a = self.arch
        layers = f"0..{a.n_layers - 1}"
        rows = [SiteInfo("embed", ("b", "p", a.d_model), "-", _DESCRIPTIONS["embed"])]
        for kind in LAYER_KINDS:
            if self._unavailable(kind) is None:
                shape = self._family_shape(kind)
                rows.append(SiteInfo(f"L{{l}}.{_display_kind(kind)}", shape, layers, _DESCRIPTIONS[kind]))
        vocab = _out_features(get_module(self.hf, a.unembed))
        rows.append(SiteInfo("logits", ("b", "p", vocab), "-", _DESCRIPTIONS["logits"]))
        rows.append(SiteInfo("module:<path>", ("b", "p", "..."), "-", "output of any nn.Module by its path"))
        for sp in self.splices:
            what = f"latents of the dictionary spliced into {sp.target}"
            rows.append(SiteInfo(str(sp.latents), ("b", "p", sp.width), str(sp.target.layer), what))
            rows.append(SiteInfo(str(sp.error), ("b", "p", self._width(sp.target)), str(sp.target.layer), "its error"))
        return rows

    def _family_shape(self, kind: str) -> tuple[str | int, ...]:
        a = self.arch
        shapes: dict[str, tuple[str | int, ...]] = {
            "head": ("b", "p", a.n_heads, a.d_model),
            "head_z": ("b", "p", a.n_heads, a.d_head),
            "q": ("b", "p", a.n_heads, a.d_head),
            "k": ("b", "p", a.n_kv_heads, a.d_head),
            "v": ("b", "p", a.n_kv_heads, a.d_head),
            "attn_pattern": ("b", "p", a.n_heads, "p"),
            "mlp_post": ("b", "p", a.d_mlp or 0),
        }
        return shapes.get(kind, ("b", "p", a.d_model))

    def _unavailable(self, kind: str, write: bool = False) -> str | None:
        """Why a site kind does not exist for this architecture (None if it does)."""
        a = self.arch
        if kind in ("mlp_in", "mlp_post", "mlp_out") and a.mlp is None:
            return f"{a.family} has no MLP"
        if kind == "resid_mid" and a.parallel:
            return (
                f"{a.family} computes attention and MLP in parallel from resid_pre, so there is no resid_mid; "
                "use resid_pre, attn_out and mlp_out"
            )
        if kind in ("q", "k", "v", "attn_pattern") and a.qkv is None:
            return (
                f"{a.family}'s attention does not use the transformers attention interface; "
                "q/k/v/pattern are unavailable"
            )
        if kind == "attn_pattern" and write and a.qkv != "interface":
            return f"{a.family} computes attention itself, so its patterns can be read but not written"
        return None

    def resolve(self, site: "Site | str", write: bool = False) -> Site:
        """Parse and check a site against this model: layer/head/group/neuron in range, kind available."""
        s = parse_site(site)
        a = self.arch
        if s.kind in SPLICE_KINDS:
            return self._resolve_latent(s)
        if s.kind == "module":
            get_module(self.hf, s.path or "")
            return s
        if s.kind in GLOBAL_KINDS:
            return s
        assert s.layer is not None
        self._check_range(f"layer of site {s}", s.layer, a.n_layers)
        why = self._unavailable(s.kind, write)
        if why:
            raise PathlensError(f"site {s}: {why}.")
        if s.index is not None:
            limit, what = {
                "k": (a.n_kv_heads, "key-value group"),
                "v": (a.n_kv_heads, "key-value group"),
                "mlp_post": (a.d_mlp or 0, "neuron"),
            }.get(s.kind, (a.n_heads, "head"))
            self._check_range(f"{what} of site {s}", s.index, limit)
        return s

    def _resolve_latent(self, s: Site) -> Site:
        splice = next((sp for sp in self.splices if sp.latents == s.family or sp.error == s), None)
        if splice is None:
            spliced = ", ".join(str(sp.latents) for sp in self.splices) or "none"
            raise PathlensError(
                f"site {s}: no dictionary is spliced as L{s.layer}.{s.path} (spliced now: {spliced}); splice one "
                f"with `with model.splice(dictionary, site, name={s.path!r}):`, or check the site's spelling."
            )
        if s.index is not None:
            self._check_range(f"latent of site {s}", s.index, splice.width)
        return s

    def _width(self, site: Site) -> int:
        """The size of the last axis of a (b, p, d) site family (0 for other shapes)."""
        shape = self._family_shape(site.kind)
        return int(shape[-1]) if len(shape) == 3 else 0

    @contextmanager
    def splice(
        self,
        dictionary: Dictionary,
        site: "Site | str",
        *,
        target: "Site | str | None" = None,
        name: str | None = None,
        width: int | None = None,
    ) -> Iterator[Splice]:
        """Splice `dictionary` into every run and session inside the block: it encodes `site`'s value, and the
        value of `target` (default: `site` itself, an autoencoder; a transcoder reads `L{l}.mlp_in` and rebuilds
        `L{l}.mlp_out`) becomes decode(latents) + error, so outputs are unchanged while its latents are sites:
        `L{l}.{name}` (name: "sae", or "tc" with a target), `L{l}.{name}.F{i}`, `L{l}.{name}.err`.
        `width` (default `dictionary.width`) and `dictionary.d_in` / `d_out` are checked against the sites.
        The model is never modified; the splice ends with the block, also after an exception."""
        source = self.resolve(site)
        out = source if target is None else self.resolve(target)
        for s in (source, out):
            if s.index is not None or s.kind not in _SPLICEABLE or self._width(s) == 0:
                raise PathlensError(
                    f"cannot splice a dictionary into {s}: splice into a (batch, pos, d) site family: "
                    f"{', '.join(_SPLICEABLE)}."
                )
        for what, s in (("d_in", source), ("d_out", out)):
            expected, got = self._width(s), getattr(dictionary, what, None)
            if got is not None and int(got) != expected:
                raise PathlensError(
                    f"the dictionary's {what} is {got} but site {s} has width {expected} on this model; "
                    f"splice it into a site of width {got}, or train a dictionary on {s}."
                )
        size = int(width if width is not None else getattr(dictionary, "width", 0))
        if size < 1:
            raise PathlensError(f"the dictionary spliced into {out} needs a width >= 1 (pass width=), got {size}.")
        splice = Splice(dictionary, source, out, name or ("sae" if target is None else "tc"), size)
        if any(sp.latents == splice.latents or sp.target == out for sp in self.splices):
            raise PathlensError(
                f"{out} already has a dictionary spliced into it, or {splice.latents} is taken; splice one dictionary "
                "per site, each under its own name=."
            )
        self.splices.append(splice)
        try:
            yield splice
        finally:
            self.splices.remove(splice)

    @staticmethod
    def _check_range(what: str, value: int, limit: int) -> None:
        if not 0 <= value < limit:
            raise PathlensError(f"{what} is {value}, out of range: this model has {limit} (valid: 0..{limit - 1}).")

    # ---- inputs -------------------------------------------------------------------------------------

    def tokenize(self, texts: "str | Sequence[str]") -> tuple[Tensor, Tensor]:
        """Token ids (b, p) and attention mask (b, p), right-padded, with the tokenizer's special tokens."""
        if self.tokenizer is None:
            raise PathlensError(
                "this model has no tokenizer: pass token ids (a LongTensor (batch, pos)) instead of text."
            )
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise PathlensError("empty batch: pass at least one prompt.")
        encoded = [self.tokenizer(t)["input_ids"] for t in batch]
        length = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = 1
        return ids, mask

    def to_str_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Token strings for one row of ids (or 't{id}' without a tokenizer)."""
        flat = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        if self.tokenizer is None:
            return [f"t{i}" for i in flat]
        return [self.tokenizer.decode([i]) for i in flat]

    def _prepare(self, inputs: Any, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Token ids (b, p) and the attention mask of `inputs`, checked: integer ids inside the vocabulary, a
        0/1 mask of the ids' shape."""
        if isinstance(inputs, (str, list, tuple)) and (
            isinstance(inputs, str) or all(isinstance(t, str) for t in inputs)
        ):
            ids, text_mask = self.tokenize(inputs)
            return ids, text_mask if attention_mask is None else self.check_mask(attention_mask, ids)
        mask: Tensor | None
        if isinstance(inputs, Mapping):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask", attention_mask)
        elif isinstance(inputs, Tensor):
            ids, mask = (inputs.unsqueeze(0) if inputs.ndim == 1 else inputs), attention_mask
        else:
            raise PathlensError(
                "inputs must be text, a list of texts, token ids (batch, pos) or a tokenizer output, "
                f"got {type(inputs).__name__}."
            )
        self.check_ids(ids)
        return ids, None if mask is None else self.check_mask(mask, ids)

    @property
    def vocab_size(self) -> int:
        """How many token ids the model embeds (its input embedding's rows)."""
        embed = get_module(self.hf, self.arch.embed)
        return int(getattr(embed, "num_embeddings", None) or _out_features(embed))

    def check_ids(self, ids: Tensor, what: str = "token ids") -> None:
        """Raise PathlensError unless `ids` is a non-empty integer (batch, pos) tensor of ids in the vocabulary,
        naming the first offending row and value."""
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype not in (torch.long, torch.int):
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            dtype = ids.dtype if isinstance(ids, Tensor) else ""
            raise PathlensError(f"{what} must be an integer tensor (batch, pos), got {dtype} of shape {shape}.")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise PathlensError(f"empty batch: {what} have shape {tuple(ids.shape)}; pass at least one token.")
        vocab = self.vocab_size
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            row, pos = (int(i) for i in bad.nonzero()[0])
            raise PathlensError(
                f"{what}: row {row}, position {pos} holds id {int(ids[row, pos])}, outside this model's vocabulary "
                f"(0..{vocab - 1}); tokenize with the model's own tokenizer."
            )

    @staticmethod
    def check_mask(mask: Tensor, ids: Tensor) -> Tensor:
        """`mask` if it is a 0/1 (batch, pos) tensor of the ids' shape; otherwise a PathlensError saying why."""
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise PathlensError(
                f"attention_mask has shape {shape} but the token ids have {tuple(ids.shape)}; give one 0/1 entry "
                "per token (1 = real token, 0 = padding)."
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise PathlensError("attention_mask must hold only 0 (padding) and 1 (real token).")
        return mask

    # ---- runs ---------------------------------------------------------------------------------------

    @contextmanager
    def session(
        self,
        interventions: Sequence[Intervention] = (),
        cache: "Sequence[Site | str] | Site | str" = (),
        *,
        grad: bool = False,
        cache_device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
        rules: Sequence[BackwardRule] = (),
    ) -> Iterator[HookSession]:
        """Interventions and reads held across every forward of the wrapped model inside the block.

        Any number of `model.hf` forwards — including `model.hf.generate(...)` with its key/value cache, runs of
        different lengths, a training loop — see `interventions`; positions resolve per forward from that
        forward's absolute positions and each row's padding (`pathlens.hooks`). The yielded session's `.cache`
        holds the reads of the current sequence (a forward that continues a cached prefix is appended).
        grad: keep cached reads in the autograd graph (gradients are enabled or not by the caller).
        rules: backward rules (objects with `hooks(model)` and `constant_attention`, e.g.
        `pathlens.attribution.lrp.rule_objects(...)`), registered before the site hooks.
        Every hook is removed when the block ends, also after an exception or KeyboardInterrupt.
        """
        reads = [self.resolve(s) for s in _site_list(cache)]
        for iv in interventions:
            iv.site = self.resolve(iv.site, write=True)
            check_finite(iv)
        grad_hooks = [hook for rule in rules for hook in rule.hooks(self)]
        with HookSession(
            self,
            reads,
            list(interventions),
            grad=grad,
            cache_device=cache_device,
            cache_dtype=cache_dtype,
            grad_hooks=grad_hooks,
            constant_attention=any(rule.constant_attention for rule in rules),
        ) as session:
            yield session

    def run(
        self,
        inputs: Any,
        *,
        cache: "Sequence[Site | str] | Site | str" = (),
        interventions: Sequence[Intervention] = (),
        attention_mask: Tensor | None = None,
        grad: bool = False,
        cache_device: torch.device | str | None = None,
        cache_dtype: torch.dtype | None = None,
        rules: Sequence[BackwardRule] = (),
        logits_at: Tensor | None = None,
    ) -> Run:
        """One forward pass with the given interventions, caching the given sites: one `session` around one
        forward.

        inputs: text, list of texts (tokenized and right-padded), token ids (b, p), or a tokenizer output; a
            left-padded mask gets position ids counted from each row's first real token.
        cache: sites to return (only these are computed and kept), on `cache_device` / `cache_dtype` if given.
        interventions: applied in order; each acts on its own positions and rows of the batch.
        grad: run with autograd so gradients flow to parameters and cached activations (for attribution).
        rules: backward rules for the backward pass (`pathlens.attribution.lrp.rule_objects("LN", ...)`); values
            are unchanged, gradients become LRP relevance per unit input.
        logits_at: sorted positions; logits are then (b, len(logits_at), vocab), computed only there (saves a
            (b, p, vocab) tensor). Models without transformers' `logits_to_keep` compute all and are sliced.
        Returns Run(logits (b, p, vocab), cache). Hooks exist only inside this call.
        """
        ids, mask = self._prepare(inputs, attention_mask)
        for iv in interventions:
            if iv.positions is not None and not isinstance(iv.positions, (str, slice)):
                resolve_index(iv.positions, int(ids.shape[1]), f"positions of the intervention on {iv.site}")
        with self.session(
            interventions, cache, grad=grad, cache_device=cache_device, cache_dtype=cache_dtype, rules=rules
        ) as session:
            out = self.forward(ids, mask, session, logits_at=logits_at)
        logits = out.logits if hasattr(out, "logits") else first_output(out)
        if logits_at is not None and logits.shape[1] != logits_at.numel():
            logits = logits[:, logits_at.to(logits.device)]
        return Run(logits=logits if grad else logits.detach(), cache=session.cache)

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None,
        session: HookSession,
        use_cache: bool = False,
        logits_at: Tensor | None = None,
    ) -> Any:
        """The wrapped model's own forward on token ids (b, p), inside `session` (entered here if it is not
        already); returns its output.

        `use_cache=True` also returns the model's key/value cache (for engines that reuse it). `logits_at`
        (sorted positions) asks the model for logits at those positions only (transformers' `logits_to_keep`),
        which saves a (b, p, vocab) tensor; models without that argument return logits at every position.
        A left-padded `mask` gets position ids counted from each row's first real token, so a padded row gives
        the results it gives alone.
        """
        params = inspect.signature(self.hf.forward).parameters
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "use_cache": use_cache}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
            if mask.ndim == 2 and not bool(mask[:, 0].all()) and "position_ids" in params:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0).to(self.device)
        if logits_at is not None and "logits_to_keep" in params:
            kwargs["logits_to_keep"] = logits_at.to(self.device)
        with torch.set_grad_enabled(session.grad), ExitStack() as stack:
            if not session.active:
                stack.enter_context(session)
            return self.hf(**kwargs)

    def unembed(self, hidden: Tensor, softcap: bool = True) -> Tensor:
        """Logits from final-layer hidden states (..., d_model) → (..., vocab): the model's own final norm, its
        unembedding and, with `softcap`, its final logit soft-cap (Gemma 2). The logit lens, the cone runner and
        output-layer steering all read the residual stream through this one function."""
        a = self.arch
        if a.final_norm is not None:
            hidden = get_module(self.hf, a.final_norm)(hidden)
        logits = get_module(self.hf, a.unembed)(hidden)  # (..., vocab)
        cap = getattr(self.config, "final_logit_softcapping", None) if softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def scored_logits(
        self, ids: Tensor, mask: Tensor | None, session: HookSession, answer_pos: Tensor, use_cache: bool = False
    ) -> Tensor:
        """`forward` asking for logits only at the scored positions; returns each row's logits at its own
        position `answer_pos` (b,) → (b, vocab)."""
        kept = torch.unique(answer_pos)
        out = self.forward(ids, mask, session, use_cache=use_cache, logits_at=kept)
        logits = out.logits if hasattr(out, "logits") else first_output(out)
        at = torch.searchsorted(kept, answer_pos) if logits.shape[1] == kept.numel() else answer_pos
        return logits[torch.arange(int(ids.shape[0])), at.to(logits.device)]


_SPLICEABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "attn_in", "mlp_in", "mlp_post", "mlp_out")


def _display_kind(kind: str) -> str:
    return {"head_z": "z", "attn_pattern": "pattern"}.get(kind, kind)


def _site_list(cache: "Sequence[Site | str] | Site | str") -> list[Site | str]:
    """A site list; one site given alone (`cache="L0.resid_pre"`) is a list of one."""
    return [cache] if isinstance(cache, (str, Site)) else list(cache)


def _out_features(unembed: nn.Module) -> int:
    """The vocabulary size an unembedding module writes (rows of its weight)."""
    weight = unembed.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[0])
