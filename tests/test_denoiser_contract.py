"""The denoiser contract: what every model family promises behind ``D(x, t, cond, radius)``, written once and run over
every family (as diffusers' ``PipelineTesterMixin`` does for pipelines).

Families: the bundled dit-digits (pixels, no VAE), a tiny latent class DiT (VAE, learned sigma, 1000 classes), SD3, the
SD3.5 layout (qk RMS-norm, image-only ``attn2``), PixArt-Sigma and PixArt-alpha (micro-conditions), FLUX.1-dev
(guidance-distilled, resolution shift) and FLUX.1-schnell, and the three analytic oracles. The neural ones are tiny
random pipelines written with ``save_pretrained`` (conftest.py) and loaded through ``critsample.load``; each is
compared with the stock diffusers transformer read from the same folder (its original attention processors).

The contract:
- a global radius (None, ``max(h, w) - 1`` and beyond, per row) is the stock model; radius 0 is not;
- at radius 0 every attention layer is pointwise over image tokens (text rows and columns stay dense), the whole model
  is local with receptive field ``depth * r`` where no text stream carries information between image tokens, and the
  conditioning still reaches every token;
- rows with different radii in one batch equal separate calls; a bad radius is one sentence;
- guidance 1 is the conditional prediction;
- the strictly local denoiser at token i reads only the tokens of its window;
- sampling equals the family's diffusers pipeline, images included, and a plan run inside the pipeline through its
  step callback (SD3, FLUX) equals ``critsample.sample``;
- the analytic FLOPs count the (query, key) pairs the network's attention computes, globally and in a window;
- ``critsample tune`` (its dry run too) and ``critsample sample --adaptive --summary`` run from the CLI, judged by the
  family's judge read from a saved folder as the real one is (classifier, ResNet, CLIP, or the user's).

A new family is one entry of :data:`FAMILIES` (and, for a new kind of folder, one builder in conftest.py).
Family-specific behaviour (prompt encoding, VAE factors, micro-conditions, schedulers, registry names) stays in the
family's own test module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import T5_LENGTH, VAE_SCALE, gen

import critsample
import critsample.local_attention
from critsample import NULL, Plan, PromptCond
from critsample.denoisers import Denoiser, cat_rows
from critsample.flops import forward_flops, plan_flops, transformer_shape

K = torch.tensor([300, 900])  # DDPM timesteps of the two rows; t = k / 1000 (flow models: sigma = t)
ORACLES = {
    "oracle-mixture": "gmm-mixture:N=4,mu=0.7,s2=0.6",
    "oracle-field": "gmm-field:N=4,kappa=0.7,s2=1.5",
    "oracle-both": "gmm-mixture-field:N=4,mu=0.6,kappa=0.5,s2=1.3",
}
PROMPTS = ["a red cat", "dog", "zebra"]
# Latent (H, W) each family is tested at; the first is the default. Square only for DiT (diffusers' DiT unpatchifies
# square grids); small latents for PixArt-alpha, whose transformer has sample_size 128 (for its micro-conditions).
TEXT_FAMILIES = ("sd3", "sd35", "pixart-sigma", "pixart-alpha", "flux-dev", "flux-schnell")
SHAPES = {"dit-digits": [(8, 8)], "dit": [(8, 8), (12, 12)], **{k: [(8, 8), (8, 12)] for k in TEXT_FAMILIES},
          **{k: [(4, 4)] for k in ORACLES}}


@dataclass
class Family:
    """One model family as the contract drives it."""

    key: str
    model: Denoiser
    folder: Path | None = None  # the diffusers folder (None: bundled by name or analytic)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # SHAPES[key]
    joint_text: bool = False  # text tokens attend with image tokens (SD3, FLUX): they carry information between them
    conditioned: bool = True  # the class / prompt changes the prediction (the GMRF oracle has no conditioning gap)
    pipeline_cls: str | None = None  # the diffusers pipeline that samples it
    pipeline_shape: tuple[int, int] | None = None  # latent (H, W) of the pipeline comparison (default: shapes[0])
    sampler: str = "auto"  # critsample's name of the pipeline's integrator
    cfg: float = 4.0  # a classifier-free guidance scale of the pipeline comparison
    _cache: dict = field(default_factory=dict)

    @property
    def neural(self) -> bool:
        return hasattr(self.model, "transformer")

    @property
    def depth(self) -> int:
        """Attention layers an image token's information crosses in one forward (an oracle's score reads its window
        once)."""
        if not self.neural:
            return 1
        cfg = self.model.transformer.config
        return int(cfg.num_layers) + int(getattr(cfg, "num_single_layers", 0) or 0)

    def cond(self, batch: int, null_row: bool = True) -> torch.Tensor | PromptCond:
        """``batch`` conditioning rows; with ``null_row`` the second row is the unconditional one."""
        if not self.model.is_text:
            labels = torch.tensor([3, NULL, 1] if null_row else [3, 1, 0])[:batch]
            return torch.where(labels == NULL, labels, labels % self.model.num_classes)
        rows = self._cache.get("prompts")
        if rows is None:
            rows = self._cache["prompts"] = self.model.encode_prompt(PROMPTS)
        if null_row:
            rows = cat_rows([rows[0], self.model.null(rows[0]), rows[2]])
        return rows[torch.arange(batch)]

    def other_cond(self, batch: int) -> torch.Tensor | PromptCond:
        """Conditioning rows that differ from :meth:`cond` (without null rows) in every row."""
        if not self.model.is_text:
            return (self.cond(batch, null_row=False) + 1) % self.model.num_classes
        other = self.model.encode_prompt(["zebra", "a red cat", "dog"])
        return other[torch.arange(batch)]

    # -- the stock diffusers transformer, called as the family's pipeline calls it ------------------------------------
    def stock(self) -> torch.nn.Module:
        if "stock" not in self._cache:
            import diffusers

            folder = self.folder / "transformer"
            cls = json.loads((folder / "config.json").read_text())["_class_name"]
            cls = {"Transformer2DModel": "DiTTransformer2DModel"}.get(cls, cls)
            self._cache["stock"] = getattr(diffusers, cls).from_pretrained(folder).eval()
        return self._cache["stock"]

    def reference(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The global prediction: the stock network's (native prediction, as the pipelines read it), or the oracle's
        exact score."""
        if not self.neural:
            return self.model(x, t, cond)
        net, family = self.stock(), self.model.family
        with torch.no_grad():
            if family == "dit":
                labels = torch.where(cond == NULL, torch.full_like(cond, net.config.num_embeds_ada_norm), cond)
                return net(x, timestep=1000 * t, class_labels=labels).sample[:, : x.shape[1]]
            if family == "sd3":
                return net(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                           timestep=1000 * t).sample
            if family == "pixart":
                added = {"resolution": None, "aspect_ratio": None}
                # PixArtAlphaPipeline: image pixels (height, width) and height / width
                if net.use_additional_conditions:
                    h, w = (s * VAE_SCALE for s in x.shape[-2:])
                    added = {"resolution": torch.tensor([[h, w]] * len(x), dtype=torch.float32),
                             "aspect_ratio": torch.tensor([[h / w]] * len(x), dtype=torch.float32)}
                out = net(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=1000 * t,
                          added_cond_kwargs=added).sample
                return out[:, : x.shape[1]]  # eps; the learned variance is not used
            if family == "flux":
                from diffusers import FluxPipeline

                (b, c, hh, ww), (h, w) = x.shape, self.model.grid(x)
                guidance = torch.full((b,), 3.5) if net.config.guidance_embeds else None  # dev's distilled guidance
                out = net(hidden_states=FluxPipeline._pack_latents(x, b, c, hh, ww), encoder_hidden_states=cond.embeds,
                          pooled_projections=cond.pooled, timestep=t, guidance=guidance,
                          txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                          img_ids=FluxPipeline._prepare_latent_image_ids(b, h, w, "cpu", torch.float32)).sample
                return FluxPipeline._unpack_latents(out, 2 * hh, 2 * ww, 2)  # the tiny VAE's scale factor 2
        raise AssertionError(f"no stock reference for family {family}")

    # -- the diffusers pipeline ----------------------------------------------------------------------------------------
    def pipeline(self, shared: bool = False):
        """The stock pipeline from the folder, or (``shared``) one running the model's own windowed transformer."""
        key = "shared" if shared else "pipe"
        if key not in self._cache:
            import diffusers

            kw = {"transformer": self.model.transformer} if shared else {}
            self._cache[key] = getattr(diffusers, self.pipeline_cls).from_pretrained(self.folder, **kw)
        return self._cache[key]

    def run_pipeline(self, pipe, guidance: float, steps: int, seed: int, shape, **kwargs):
        """The pipeline's own call for two conditional rows at ``guidance``, its noise drawn from ``gen(seed)``."""
        common = dict(num_inference_steps=steps, generator=gen(seed), **kwargs)
        if self.pipeline_cls == "DiTPipeline":  # no size, latents or latent output: images at the model's size
            images = pipe(self.cond(2, null_row=False).tolist(), guidance_scale=guidance, **common).images
            images = torch.as_tensor(images)
            return images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)  # channels-last before diffusers 0.41
        if "prompt_embeds" not in kwargs:
            common["prompt"] = PROMPTS[:2]
        if self.model.family == "flux":
            common["max_sequence_length"] = T5_LENGTH
            # a guided(w) step is true CFG against the empty prompt
            if guidance != 1.0 and "true_cfg_scale" not in kwargs:
                common.update(true_cfg_scale=guidance, negative_prompt="")
        elif "guidance_scale" not in kwargs:
            common["guidance_scale"] = guidance
        if self.model.family == "sd3":
            common["max_sequence_length"] = T5_LENGTH
        if self.model.family == "pixart":
            common["use_resolution_binning"] = False
        h, w = (s * pipe.vae_scale_factor for s in shape)
        return pipe(height=h, width=w, **common).images


FAMILIES = ["dit-digits", "dit", "sd3", "sd35", "pixart-sigma", "pixart-alpha", "flux-dev", "flux-schnell", *ORACLES]
NEURAL = FAMILIES[:8]
PIPELINES = FAMILIES[1:8]  # dit-digits has no VAE, so no DiTPipeline; the oracles have no network
CALLBACKS = ["sd3", "sd35", "flux-dev", "flux-schnell"]  # pipelines with callback_on_step_end (critsample.pipelines)

_FOLDERS: dict[str, Callable] = {
    "dit": lambda r: r.getfixturevalue("dit_folder"),
    "sd3": lambda r: r.getfixturevalue("sd3_folder"),
    "sd35": lambda r: r.getfixturevalue("sd35_folder"),
    "pixart-sigma": lambda r: r.getfixturevalue("pixart_sigma_folder"),
    "pixart-alpha": lambda r: r.getfixturevalue("pixart_alpha_folder"),
    "flux-dev": lambda r: r.getfixturevalue("flux_folders")["dev"],
    "flux-schnell": lambda r: r.getfixturevalue("flux_folders")["schnell"],
}
_LOADED: dict[str, Family] = {}


def _family(key: str, request) -> Family:
    if key in ORACLES:
        conditioned = key != "oracle-field"  # the GMRF has one law for both classes
        return Family(key, critsample.load(ORACLES[key]), shapes=SHAPES[key], conditioned=conditioned)
    if key == "dit-digits":
        from critsample.models import bundled_path

        return Family(key, critsample.load("dit-digits"), bundled_path("dit-digits"), shapes=SHAPES[key])
    folder = _FOLDERS[key](request)
    text = {"max_sequence_length": T5_LENGTH} if key.startswith(("sd3", "flux")) else {}
    model = critsample.load(str(folder), **text)
    shapes = SHAPES[key]
    if key == "dit":
        return Family(key, model, folder, shapes, pipeline_cls="DiTPipeline")
    if key.startswith("sd3"):
        return Family(key, model, folder, shapes, joint_text=True, pipeline_cls="StableDiffusion3Pipeline",
                      pipeline_shape=(8, 12) if key == "sd3" else None, cfg=3.5)
    if key.startswith("pixart"):
        cls = "PixArtSigmaPipeline" if key == "pixart-sigma" else "PixArtAlphaPipeline"
        return Family(key, model, folder, shapes, pipeline_cls=cls, sampler="dpm", cfg=4.5,
                      pipeline_shape=(8, 12) if key == "pixart-alpha" else None)
    # FLUX: dev's step times follow the resolution shift, so it is compared at a non-default size too
    return Family(key, model, folder, shapes, joint_text=True, pipeline_cls="FluxPipeline", cfg=2.0,
                  pipeline_shape=(8, 12) if key == "flux-dev" else None)


@pytest.fixture
def family(request) -> Family:
    """The family named by the test's parameter, loaded once per session."""
    key = request.param
    if key not in _LOADED:
        _LOADED[key] = _family(key, request)
    return _LOADED[key]


def over(keys: list[str]):
    return pytest.mark.parametrize("family", keys, indirect=True)


def _x(family: Family, batch: int, shape=None, seed: int = 0) -> torch.Tensor:
    c = family.model.sample_shape[0]
    return torch.randn(batch, c, *(shape or family.shapes[0]), generator=gen(seed))


def _bump_token(x: torch.Tensor, p: int, i: int, j: int) -> torch.Tensor:
    """``x`` with the patch of token (i, j) moved."""
    x2 = x.clone()
    x2[..., i * p : (i + 1) * p, j * p : (j + 1) * p] += 1.0
    return x2


def _near(grid, i: int, j: int, dist: int, p: int) -> torch.Tensor:
    """(h p, w p) bool mask of the pixels whose token lies within Chebyshev distance ``dist`` of token (i, j)."""
    h, w = grid
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    near = ((ii - i).abs() <= dist) & ((jj - j).abs() <= dist)
    return near.repeat_interleave(p, 0).repeat_interleave(p, 1)


# -- a global radius is the stock model ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,shape", [pytest.param(k, s, id=f"{k}-{s[0]}x{s[1]}") for k in FAMILIES for s in SHAPES[k]],
    indirect=["family"]
)
def test_a_global_radius_is_the_stock_model(family, shape):
    model = family.model
    x, t, cond = _x(family, 2, shape, seed=sum(shape)), K / 1000, family.cond(2)
    h, w = model.grid(x)
    top = max(h, w) - 1  # a window this wide covers the grid
    ref = family.reference(x, t, cond)
    with torch.no_grad():
        for radius in (None, top, top + 5, [top, 99], torch.tensor([top, top])):
            out = model(x, t, cond, radius=radius)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert (out - ref).abs().max() <= 1e-5, radius
        assert (model(x, t, cond, radius=0) - ref).abs().max() > 1e-4  # the window is not a no-op


# -- radius 0: pointwise layers, a bounded receptive field -------------------------------------------------------------
def _attention_layers(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of a diffusers transformer (``Attention``, ``FluxAttention``: they carry a processor)."""
    return {name: m for name, m in net.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


@over(NEURAL)
def test_at_radius_zero_every_attention_layer_is_pointwise_over_image_tokens(family):
    """Each attention layer, called with the inputs the network gives it at r = 0: moving image token j moves no other
    image token's output, and every text row's (text rows see every image token); at a global radius the
    self-attention layers do mix tokens, so the check bites. Cross-attention (PixArt ``attn2``) is pointwise anyway."""
    model = family.model
    x, t, cond = _x(family, 2, family.shapes[-1]), K / 1000, family.cond(2)
    h, w = model.grid(x)
    n, j = h * w, (h // 2) * w + 1
    layers, calls = _attention_layers(model.transformer), {}
    hooks = [m.register_forward_pre_hook(lambda m, a, kw, name=name: calls.setdefault(name, (a, dict(kw))),
                                         with_kwargs=True)
             for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(x, t, cond, radius=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(calls) == set(layers) and layers  # every attention layer ran, so every one is checked

    for name, (args, kwargs) in calls.items():
        module = layers[name]
        hidden = args[0] if args else kwargs["hidden_states"]
        extra = hidden.shape[1] - n  # FLUX's single-stream blocks run on [text; image]: image tokens come last
        assert kwargs.get("radius") == 0, (name, "the radius does not reach this layer")

        def run(hs, radius, module=module, args=args, kwargs=kwargs, extra=extra):
            kw = {**kwargs, "radius": radius}
            if args:
                out = module(hs, *args[1:], **kw)
            else:
                out = module(**{**kw, "hidden_states": hs})
            return (out[0], out[1]) if isinstance(out, tuple) else (out[:, extra:], out[:, :extra])  # (image, text)

        bumped = hidden.clone()
        bumped[:, extra + j] += 1.0
        with torch.no_grad():
            (img0, txt0), (img1, txt1) = run(hidden, 0), run(bumped, 0)
            (glob0, _), (glob1, _) = run(hidden, None), run(bumped, None)
        others = torch.arange(n) != j
        moved = (img1 - img0).abs().amax(dim=(0, 2))  # (n,)
        assert moved[others].max() == 0.0 and moved[j] > 1e-5, name
        if txt0.shape[1]:
            assert (txt1 - txt0).abs().amax(dim=(0, 2)).min() > 0.0, name
        cross = kwargs.get("encoder_hidden_states") is not None and getattr(module, "add_q_proj", None) is None
        if not cross:  # self- or joint attention
            assert (glob1 - glob0).abs().amax(dim=(0, 2))[others].min() > 0.0, name


@over(FAMILIES)
@pytest.mark.parametrize("radius", [0, 1])
def test_a_radius_bounds_the_receptive_field_and_the_conditioning_reaches_every_token(family, radius):
    """Without a text stream between image tokens, ``depth`` layers of radius r see ``depth * r`` tokens away; with one
    (SD3, FLUX) the text carries every token to every other (by design: text sees and is seen by everything). At any
    radius the class or prompt reaches every token."""
    model = family.model
    p, (i, j) = model.patch_size, (0, 1)
    x = _x(family, 2, family.shapes[-1])
    grid = model.grid(x)
    t, cond = torch.tensor([0.4, 0.4]), family.cond(2)  # a conditional and an unconditional row
    with torch.no_grad():
        base = model(x, t, cond, radius=radius)
        diff = (model(_bump_token(x, p, i, j), t, cond, radius=radius) - base).abs().amax(dim=(0, 1))  # (H, W)
        glob = (model(_bump_token(x, p, i, j), t, cond) - model(x, t, cond)).abs().amax(dim=(0, 1))
        by_cond = (model(x[:1], t[:1], family.other_cond(1), radius=radius) - base[:1]).abs().amax(dim=1)[0]
    own, inside = _near(grid, i, j, 0, p), _near(grid, i, j, family.depth * radius, p)
    assert diff[own].min() > 1e-5  # the moved token's own prediction moves
    assert glob[~inside].max() > 0.0  # the global model reads beyond the window, so the check below bites
    if family.joint_text:
        assert diff[~own].max() > 0.0
    else:
        assert diff[~inside].max() == 0.0
    if family.conditioned:
        assert by_cond.min() > 0.0
    else:
        assert by_cond.max() == 0.0


# -- radii per row, bad radii, guidance ------------------------------------------------------------------------------
@over(FAMILIES)
def test_rows_with_different_radii_equal_separate_calls(family):
    model = family.model
    x, t, cond = _x(family, 3, seed=1), torch.tensor([0.2, 0.5, 0.8]), family.cond(3)
    top = max(model.grid(x)) - 1
    radii = [0, 1, top]
    with torch.no_grad():
        for batched in (model(x, t, cond, radius=torch.tensor(radii)), model(x, t, cond, radius=radii)):
            for b, r in enumerate(radii):
                single = model(x[b : b + 1], t[b : b + 1], cond[torch.tensor([b])], radius=r)
                assert (batched[b : b + 1] - single).abs().max() <= 1e-5, r
        # the windows matter (in the unconditional row: the isotropic oracle's conditional score is pointwise anyway)
        x1, t1, null = x[1:2], t[1:2], cond[torch.tensor([1])]
        assert (model(x1, t1, null, radius=0) - model(x1, t1, null)).abs().max() > 1e-5


@over(FAMILIES)
@pytest.mark.parametrize("radius", [-1, 1.5, [1, -2], [1, 2, 3]],
                         ids=["negative", "fraction", "negative-row", "3-rows-of-2"])
def test_a_bad_radius_is_one_sentence(family, radius):
    x = _x(family, 2)
    with pytest.raises(ValueError) as err:  # UserError is a ValueError
        family.model(x, K / 1000, family.cond(2), radius=radius)
    message = str(err.value)
    assert "radi" in message.lower() and "\n" not in message


@over(FAMILIES)
def test_guidance_one_is_the_conditional_prediction(family):
    model = family.model
    x, cond = _x(family, 2, seed=2), family.cond(2, null_row=False)
    plain = model.predict(x, 0.5, cond)
    assert torch.equal(model.predict(x, 0.5, cond, guidance=1.0), plain)
    guided = (model.predict(x, 0.5, cond, guidance=3.0) - plain).abs().max()
    assert guided > 1e-4 if family.conditioned else guided <= 1e-6


# -- strict locality -------------------------------------------------------------------------------------------------
def _perturb_outside(x: torch.Tensor, grid, p: int, i: int, j: int, r: int, seed: int = 1) -> torch.Tensor:
    g = gen(seed)
    x2 = x.clone()
    for a in range(grid[0]):
        for b in range(grid[1]):
            if abs(a - i) > r or abs(b - j) > r:
                x2[..., a * p : (a + 1) * p, b * p : (b + 1) * p] += 3 * torch.randn(x.shape[1], p, p, generator=g)
    return x2


@over(FAMILIES)
def test_the_strict_prediction_reads_only_its_window(family):
    """``locality="strict"``: the prediction at token i is bit-identical when tokens outside its radius-r window move
    (masked keys get weight exactly 0); truncated attention (``locality="window"``) reads further, through a second
    layer or the text. The oracles' local score is already strictly local."""
    model = family.model
    x, cond = _x(family, 1), family.cond(1)
    p, grid = model.patch_size, model.grid(x)

    def token(y, i, j):
        return y[..., i * p : (i + 1) * p, j * p : (j + 1) * p]

    for (i, j), r in (((0, 1), 1), ((2, 2), 1), ((1, 1), 0)):
        x2 = _perturb_outside(x, grid, p, i, j, r)
        strict = [token(model.predict(z, 0.5, cond, radius=r, locality="strict"), i, j) for z in (x, x2)]
        window = [token(model.predict(z, 0.5, cond, radius=r), i, j) for z in (x, x2)]
        assert torch.equal(strict[0], strict[1]), (i, j, r)
        if model.strict_layout == "exact":
            assert torch.equal(strict[0], window[0])
        elif r >= 1 or family.joint_text:  # DiT's and PixArt's r = 0 attention is already strictly local
            assert (window[0] - window[1]).abs().max() > 1e-5, (i, j, r)
    covering = max(grid) - 1  # one copy with every key allowed: the global model
    strict = model.predict(x, 0.5, cond, radius=covering, locality="strict")
    assert (strict - model.predict(x, 0.5, cond)).abs().max() <= 1e-5


# -- sampling equals the diffusers pipeline --------------------------------------------------------------------------
@over(PIPELINES)
@pytest.mark.parametrize("cfg", [False, True], ids=["w=1", "cfg"])
def test_sampling_equals_the_diffusers_pipeline(family, cfg):
    """Full guidance through ``critsample.sample`` = the stock pipeline (its own prompt encoding, noise, scheduler and
    VAE decode), for the plain conditional model (w = 1) and with classifier-free guidance."""
    from diffusers.utils.torch_utils import randn_tensor

    model, w, steps, seed = family.model, (family.cfg if cfg else 1.0), 4, 3
    shape = family.pipeline_shape or family.shapes[0]
    pipe = family.pipeline()
    ref = family.run_pipeline(pipe, w, steps, seed, shape, output_type="pt")  # images in [0, 1]
    # as the pipeline draws it
    x = randn_tensor((2, model.sample_shape[0], *shape), generator=gen(seed), dtype=torch.float32)
    z = critsample.sample(model, Plan.guided(steps, w, sampler=family.sampler), family.cond(2, null_row=False), x=x)
    images = model.decode(z)
    assert images.shape == ref.shape and (images - ref).abs().max() <= 1e-4
    if tuple(shape) == tuple(model.sample_shape[1:]):  # at the model's own size sample() draws the noise itself, alike
        assert torch.equal(critsample.sample(model, Plan.guided(steps, w, sampler=family.sampler),
                                             family.cond(2, null_row=False),
                                             generator=gen(seed)), z)
    if family.pipeline_cls != "DiTPipeline":  # DiTPipeline returns no latents
        latents = family.run_pipeline(pipe, w, steps, seed, shape, output_type="latent")
        if family.model.family == "flux":
            from diffusers import FluxPipeline

            latents = FluxPipeline._unpack_latents(latents, *(2 * s for s in shape), 2)
        assert (z - latents).abs().max() <= 1e-4


@over(CALLBACKS)
@pytest.mark.parametrize("radius", [None, 1])
def test_a_plan_inside_the_pipeline_equals_critsample_sample(family, radius):
    """The plan's radius reaches the pipeline's transformer through the step callback (critsample.pipelines)."""
    from critsample.pipelines import plan_callback

    model, steps, seed = family.model, 4, 5
    plan = Plan.guided(steps, family.cfg, radius=radius)
    cond = family.cond(2, null_row=False)
    pipe = family.pipeline(shared=True)
    cb = plan_callback(pipe, plan, cond, model.null(cond), grid=model.token_grid,
                       **({"distilled_guidance": model.distilled_guidance} if model.family == "flux" else {}))
    shape = family.shapes[0]
    ref = family.run_pipeline(pipe, family.cfg, steps, seed, shape, output_type="latent", **cb.pipeline_kwargs())
    if model.family == "flux":
        from diffusers import FluxPipeline

        ref = FluxPipeline._unpack_latents(ref, *(2 * s for s in shape), 2)
    z = critsample.sample(model, plan, cond, generator=gen(seed))
    assert (z - ref).abs().max() <= 1e-4
    if radius is not None:  # and the radius mattered
        assert (z - critsample.sample(model, Plan.guided(steps, family.cfg), cond,
                                      generator=gen(seed))).abs().max() > 1e-4


# -- FLOPs: the analytic count against the attention the network computes ---------------------------------------------
@over(FAMILIES)
@pytest.mark.parametrize("radius", [None, 1])
def test_flops_count_the_attention_pairs_the_network_computes(family, radius, monkeypatch):
    """The analytic (query, key) pairs of one forward equal those of every scaled-dot-product attention the network
    runs: joint text tokens, SD3.5's attn2, FLUX's single blocks and PixArt's cross-attention included; in a window,
    the pairs its boolean mask allows (counted on the masked implementation). The cost of a plan is its forwards
    times one forward's; an analytic oracle has no network and says so instead of inventing a number."""
    model = family.model
    shape = transformer_shape(model)
    if not family.neural:
        record = plan_flops(model, Plan.guided(2, 2.0), model.token_grid)
        assert shape == {} and record["total"] != record["total"] and "no transformer FLOPs" in record["note"]  # NaN
        return
    pairs, masked = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, *args, attn_mask=None, **kwargs):
        # a window: the pairs it allows, per sample and head
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            masked.append(1)
            pairs.append(int(attn_mask.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])[0, 0].sum()))
        else:  # dense (a float mask only hides padded text keys: their pairs are computed all the same)
            pairs.append(q.shape[-2] * k.shape[-2])
        return sdpa(q, k, *args, attn_mask=attn_mask, **kwargs)

    x, cond = _x(family, 1), family.cond(1)  # the text encoder's own attention runs here, outside the count
    # the window's pairs are those of its mask: count them on the masked path (band and tile paths compute extra
    # pairs that the mask then drops, an implementation cost the analytic count does not model)
    monkeypatch.setattr(critsample.local_attention, "_choose", lambda *args, **kwargs: "masked")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(x, torch.tensor([0.5]), cond, radius=radius)
    monkeypatch.undo()
    assert (len(masked) > 0) == (radius is not None)
    one = forward_flops(shape, model.grid(x), radius)
    assert one.attention_pairs == sum(pairs)
    plan = Plan.guided(3, 2.0, radius=radius)
    cost = plan_flops(model, plan, model.grid(x))
    assert cost["forwards"] == 6 and cost["total"] == pytest.approx(6 * one.total)


# -- tune: a certified plan from the CLI, judged by the family's judge, then sampled ---------------------------------
# dit-digits: its bundled classifier; the latent DiT (1000 classes): ResNet (a tiny random ResNetForImageClassification
# folder through --judge_weights) and Inception FD (TinyInception stands in: its weights cannot be fetched here); text
# families: CLIP (a tiny random CLIPModel folder); an oracle: the user's judge (--judge conftest:tiny_judge).
TUNE = ["dit-digits", "dit", "sd3", "sd35", "pixart-sigma", "flux-dev", "flux-schnell", "oracle-mixture"]


@over(TUNE)
def test_tune_certifies_on_paired_noise_and_sample_uses_the_plan(family, tmp_path, judge_folders, monkeypatch, capsys):
    """``critsample tune`` then ``critsample sample --adaptive --summary`` on every family: the judge of the family
    (loaded from a saved folder as the real one is), the paired design (every plan's sample i from the noise of
    (seed, i): a plan's fidelity to full guidance is exact on the baseline), one-sided bounds and the fresh-seed
    confirmation recorded in the summary's plan, and the dry run's forwards equal to what the run samples."""
    from conftest import TinyInception

    from critsample import metrics
    from critsample.cli import main
    from critsample.summary import read, write

    model = family.model
    spec = ORACLES.get(family.key) or (str(family.folder) if family.key != "dit-digits" else "dit-digits")
    window = {"t_start": 0.4, "t_end": 0.8}
    summary = write({"model": model.name, "critical_window": window, "suggested_radius": 1,
                     "windows": {"window_cond": window}}, tmp_path / "summary.json")
    judge = {"dit": ["--judge_weights", str(judge_folders["imagenet"])],
             "oracle-mixture": ["--judge", "conftest:tiny_judge"]}.get(
        family.key, ["--judge_weights", str(judge_folders["clip"])] if model.is_text else [])
    if family.key == "dit":
        monkeypatch.setattr(metrics, "inception_features", lambda device="cpu": TinyInception())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\ntwo dogs\n")
    args = ["tune", "--model", spec, "--summary", str(summary), "--num", "4", "--steps", "3", "--shifts", "0",
            "--scales", "1", "--outside", "local-cond", "--radii", "1", "--no-interval", "--n_boot", "8",
            "--batch_size", "4", "--out", str(tmp_path / "tune"), *judge,
            *(["--prompts", str(prompts)] if model.is_text else [])]
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert main(args) == 0, capsys.readouterr()
    record = json.loads((tmp_path / "tune" / "frontier.json").read_text())
    plan = read(summary, require_window=False)["plan"]
    expected = {"dit-digits": "digits", "dit": "imagenet", "oracle-mixture": "tiny-sign"}.get(family.key, "clip")
    assert plan["judge"]["name"].startswith(expected) and plan["judge"] == record["judge"]
    assert plan["criteria"]["score"] == ("clip_score" if model.is_text else "accuracy")
    base = record["baseline"]
    assert base["fidelity"]["ssim"] == pytest.approx(1.0) and base["fidelity"]["mse"] == 0  # itself, same noise
    cand = record["candidates"][0]
    assert cand["fidelity"]["mse"] > 0 and cand["quality"]["accuracy_drop_upper"] >= cand["quality"]["accuracy_drop"]
    assert record["setup"]["prompts"] == (["a red cat", "two dogs"] if model.is_text else None)
    assert record["confirmation"]["seed"] == 1 and plan["certified"] == record["certified"]
    # the dry run counted what was sampled: search (baseline + candidate), the FD reference, the confirmation
    reference = family.key != "dit-digits"
    assert f"would spend {4 * ((2 + reference) * base['cost']['forwards'] + 2 * cand['cost']['forwards'])} " in dry
    assert record["setup"]["fd_reference"].startswith("full guidance" if reference else "the judge's own")
    sample = ["sample", "--model", spec, "--num", "2", "--steps", "3", "--adaptive", "--summary", str(summary),
              "--out", str(tmp_path / "sample"), "--no-wandb", *(["--prompt", "a red cat"] if model.is_text else [])]
    assert main(sample) == 0
    run = json.loads((tmp_path / "sample" / "run.json").read_text())
    if record["certified"]:
        assert run["plan"] == plan["plan"]
