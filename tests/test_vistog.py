"""VisToG (docs/vistog.md): the grouping math, isolated attention (side-car and mask), the module,
LLaVA through the transformers integration, and a CI-sized run of examples/vistog_digits.py.

Towers and LLaVA models are tiny, random-weight, built from configs (no download). Negative controls:
without isolation the image features drift; the semantic-attention flag changes the semantic states;
a gradient through the group counts (GroupViT's form) differs from the straight-through one tested.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.methods import vistog as vt  # noqa: E402
from visionzip_kernels.methods.vistog import SideCar, VisToG, isolation_mask, masked_forward  # noqa: E402

transformers = pytest.importorskip("transformers")

from tests.tf_models import IMAGE, PROMPT, build_llava_next, image, image_rows  # noqa: E402
from tests.tf_models import gen as _gen  # noqa: E402
from tests.tf_models import images, llava  # noqa: E402,F401  (fixtures)
from visionzip_kernels.integrations.transformers import (  # noqa: E402
    apply_visionzip,
    apply_vistog,
    remove_vistog,
)


def tiny_clip(attn: str = "sdpa", seed: int = 0, layers: int = 3):
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, image_size=28, patch_size=7)
    torch.manual_seed(seed)
    tower = transformers.CLIPVisionModel(vc).eval()
    tower.set_attn_implementation(attn)
    return tower


def tiny_siglip(seed: int = 0):
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=7)
    torch.manual_seed(seed)
    return transformers.SiglipVisionModel(vc).eval()


def pixels(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Grouping layer (its math is the group_pool op, tested in tests/test_group_pool.py)
# --------------------------------------------------------------------------------------------


def test_grouping_block_pools_with_the_group_pool_op_float64():
    """The grouping layer's rows and gradients are those of the group_pool oracle (hard assignment,
    GroupViT's straight-through gradient for the logits) around its projections, in float64."""
    torch.manual_seed(0)
    block = vt.GroupingBlock(16, eps=1.0).double()
    tokens = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    patches = torch.randn(2, 40, 16, dtype=torch.float64)
    res = block(tokens, patches)
    s, x = block.norm_tokens(tokens), block.norm_patches(patches)
    logits = block.q_proj(s) @ block.k_proj(x).transpose(1, 2) / 4.0
    ref = vz.group_pool_reference(logits, block.v_proj(x), eps=1.0)
    out = block.proj(ref.output) + s
    out = out + block.mlp(block.norm_mlp(out))
    torch.testing.assert_close(res.tokens, out, rtol=1e-12, atol=1e-12)
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.counts, ref.counts)
    g = torch.randn_like(out)
    got = torch.autograd.grad(res.tokens, (tokens, block.q_proj.weight), g)
    want = torch.autograd.grad(out, (tokens, block.q_proj.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert want[1].abs().sum() > 0  # the assignment (q / k) is trained through the straight-through term


# --------------------------------------------------------------------------------------------
# Isolated attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_side_car_leaves_the_tower_bit_identical(attn):
    tower, x = tiny_clip(attn), pixels()
    tokens = VisToG(32, 5).semantic_tokens
    with torch.no_grad():
        ref = tower(x, output_hidden_states=True).hidden_states
        hooks = [dict(m._forward_hooks) for m in tower.modules()]
        with SideCar(tower, tokens, depth=3) as car:
            got = tower(x, output_hidden_states=True).hidden_states
    assert len(ref) == 4 and all(torch.equal(a, b) for a, b in zip(ref, got))  # CLS + patches, every layer
    assert torch.equal(car.image, ref[3]) and len(car.states) == 4 and car.output.shape == (2, 5, 32)
    # the side-car's hooks are gone after the context
    assert [dict(m._forward_hooks) for m in tower.modules()] == hooks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("semantic_attention", [True, False])
def test_mask_path_isolates_and_agrees_with_side_car(attn, semantic_attention):
    tower, x = tiny_clip(attn), pixels()
    tokens = VisToG(32, 5).semantic_tokens
    with torch.no_grad():
        ref = tower(x, output_hidden_states=True).hidden_states
        image, semantic = masked_forward(tower, x, tokens, semantic_attention=semantic_attention)
        with SideCar(tower, tokens, depth=3, semantic_attention=semantic_attention) as car:
            tower(x)
    for layer, (a, b) in enumerate(zip(image, ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"image tokens, layer {layer}")
    for layer, (a, b) in enumerate(zip(semantic, car.states)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"semantic tokens, layer {layer}")


def test_isolation_off_drifts_and_the_flag_matters():
    """Negative controls: without isolation the image features move; the semantic-attention flag
    changes the semantic tokens' states (both paths would pass vacuously otherwise)."""
    tower, x = tiny_clip(), pixels()
    tokens = VisToG(32, 5).semantic_tokens
    with torch.no_grad():
        ref = tower(x, output_hidden_states=True).hidden_states
        image, _ = masked_forward(tower, x, tokens, isolate=False)
        _, with_sem = masked_forward(tower, x, tokens, semantic_attention=True)
        _, without = masked_forward(tower, x, tokens, semantic_attention=False)
    assert torch.equal(image[0], ref[0])  # before the first layer nothing has mixed yet
    for layer in (1, 2, 3):
        assert (image[layer] - ref[layer]).abs().max() > 1e-3, layer
    assert (with_sem[-1] - without[-1]).abs().max() > 1e-3


def test_isolation_mask_layout():
    m = isolation_mask(3, 2)
    assert m.dtype == torch.bool and m.shape == (5, 5)
    assert m[:3, :3].all() and not m[:3, 3:].any() and m[3:].all()
    assert not isolation_mask(3, 2, semantic_attention=False)[3:, 3:].any()
    assert isolation_mask(3, 2, isolate=False).all()
    with pytest.raises(ValueError, match="n_semantic must be a positive int"):
        isolation_mask(3, 0)


def test_side_car_gradient_equals_mask_path_gradient():
    """Only the semantic path carries a graph in the side-car (the tower's outputs are constants for
    it); its gradient for the semantic tokens equals that of the full masked graph."""
    tower, x = tiny_clip(), pixels()
    tower.requires_grad_(False)
    module = VisToG(32, 4)
    w = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    with SideCar(tower, module.semantic_tokens, depth=2) as car:
        out = tower(x)
    assert not out.last_hidden_state.requires_grad  # no graph for the patch stream
    g_car = torch.autograd.grad((car.output * w).sum(), module.semantic_tokens)[0]
    _, semantic = masked_forward(tower, x, module.semantic_tokens, depth=2)
    g_mask = torch.autograd.grad((semantic[-1] * w).sum(), module.semantic_tokens)[0]
    assert g_car.abs().max() > 0
    torch.testing.assert_close(g_car, g_mask, rtol=1e-4, atol=1e-6)


def test_siglip_tower_without_cls():
    tower, x = tiny_siglip(), pixels()
    parts = vt.tower_parts(tower)
    assert not parts.has_cls and parts.pre_norm is None
    module = VisToG(32, 3).eval()
    with torch.no_grad():
        res = module(tower, x, feature_layer=-1)
        _, semantic = masked_forward(tower, x, module.semantic_tokens)
        with SideCar(tower, module.semantic_tokens, depth=2) as car:
            tower(x)
    assert res.labels.shape == (2, 16)  # every token is a patch
    torch.testing.assert_close(car.output, semantic[-1], rtol=0, atol=1e-5)


def test_isolation_errors():
    tower = tiny_clip()
    with pytest.raises(ValueError, match=r"tokens must be \(M, C\)"):
        SideCar(tower, torch.zeros(4, 16), depth=1)
    with pytest.raises(ValueError, match="depth must be an int in 1..3"):
        SideCar(tower, torch.zeros(4, 32), depth=4)
    with pytest.raises(TypeError, match="CLIP-like vision model"):
        SideCar(torch.nn.Linear(2, 2), torch.zeros(4, 32), depth=1)
    with pytest.raises(RuntimeError, match="has not run"):
        _ = SideCar(tower, torch.zeros(4, 32), depth=1).output
    with pytest.raises(ValueError, match="feature_layer must select an encoder layer output"):
        VisToG(32, 4)(tower, pixels(), feature_layer=-4)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def test_module_shapes_modes_and_save_load(tmp_path):
    tower, x = tiny_clip(), pixels()
    module = VisToG(32, 6, semantic_attention=False, tau=0.5)
    module.eval()
    with torch.no_grad():
        a = module(tower, x)
        b = module(tower, x)
    assert a.tokens.shape == (2, 6, 32) and a.labels.shape == (2, 16) and a.counts.shape == (2, 6)
    assert torch.equal(a.counts.sum(1), torch.full((2,), 16))
    assert torch.equal(a.tokens, b.tokens)  # eval: no noise
    module.train()
    torch.manual_seed(0)
    noisy = module(tower, x)
    assert not torch.equal(noisy.logits, a.logits)  # training: Gumbel noise on the logits
    path = tmp_path / "vistog.pt"
    module.save(path)
    loaded = VisToG.load(path).eval()
    assert loaded.config() == module.config()
    with torch.no_grad():
        assert torch.equal(loaded(tower, x).tokens, a.tokens)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a VisToG file"):
        VisToG.load(tmp_path / "other.pt")


def test_module_trains_only_its_own_parameters():
    tower, x = tiny_clip(), pixels()
    tower.requires_grad_(False)
    module = VisToG(32, 4).train()
    loss = module(tower, x).tokens.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert all(g is not None and g.abs().max() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(p.grad is None for p in tower.parameters())


def test_module_argument_errors():
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        VisToG(32, 0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        VisToG(32, 4, eps=0)
    with pytest.raises(ValueError, match="tau must be a positive number"):
        VisToG(32, 4, tau=-1.0)
    m = VisToG(32, 4)
    with pytest.raises(ValueError, match=r"tokens must be \(B, 4, 32\)"):
        m.group(torch.zeros(2, 3, 32), torch.zeros(2, 10, 32))
    with pytest.raises(ValueError, match=r"patches must be \(B=2, N, 32\)"):
        m.group(torch.zeros(2, 4, 32), torch.zeros(1, 10, 32))


# --------------------------------------------------------------------------------------------
# LLaVA through the transformers integration
# --------------------------------------------------------------------------------------------


def test_llava_vistog_generate_and_features(llava, images):
    model, proc = llava
    module = VisToG(32, 6).eval()
    handle = apply_vistog(model, module, processor=proc)
    try:
        inputs = proc(images=images, text=[PROMPT, PROMPT], return_tensors="pt")
        assert int((inputs.input_ids == IMAGE).sum()) == 12  # M = 6 placeholders per image
        got = image_rows(model, inputs).view(2, 6, -1)
        with torch.no_grad():  # the LLM receives projector(VisToG tokens of layer -2)
            expected = model.model.multi_modal_projector(module(model.model.vision_tower, inputs.pixel_values).tokens)
            feats = model.model.get_image_features(inputs.pixel_values, return_dict=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert [g.shape for g in feats.group_labels] == [(25,), (25,)]
        assert all(int(c.sum()) == 25 for c in feats.group_counts)
        assert all((k == -1).all() for k in feats.kept_indices)  # a group stands for no single token
        out = _gen(model, inputs)
        assert out.shape == (2, inputs.input_ids.shape[1] + 3)
    finally:
        remove_vistog(model)
    assert handle.processor is None


def test_llava_vistog_remove_restores_exactly(llava, images):
    model, proc = llava
    inputs = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    dicts = dict(model.__dict__), dict(model.model.__dict__), dict(proc.__dict__)
    apply_vistog(model, VisToG(32, 4).eval(), processor=proc)
    with pytest.raises(RuntimeError, match="VisToG is already applied.*remove_vistog"):
        apply_visionzip(model, budget=8)
    remove_vistog(model)
    assert (dict(model.__dict__), dict(model.model.__dict__), dict(proc.__dict__)) == dicts
    with torch.no_grad():
        assert torch.equal(model(**proc(images=images[:1], text=[PROMPT], return_tensors="pt")).logits, before)
    with pytest.raises(ValueError, match="VisToG is not applied"):
        remove_vistog(model)
    h = apply_visionzip(model, budget=8)  # VisionZip afterwards is unaffected, and not removable as VisToG
    with pytest.raises(ValueError, match="VisToG is not applied"):
        remove_vistog(model)
    h.remove()


def test_llava_vistog_errors(llava, images):
    model, proc = llava
    with pytest.raises(ValueError, match="module.hidden_size is 16 but the vision tower's width is 32"):
        apply_vistog(model, VisToG(16, 4))
    with pytest.raises(TypeError, match="module must be a visionzip_kernels.methods.vistog.VisToG"):
        apply_vistog(model, torch.nn.Linear(32, 32))
    with pytest.raises(NotImplementedError, match="llava_next does not run side-car tokens.*llava"):
        apply_vistog(build_llava_next()[0], VisToG(32, 4))
    handle = apply_vistog(model, VisToG(32, 4).eval())  # processor left alone
    try:
        with pytest.raises(ValueError, match=r"25 image placeholder tokens.*4 rows.*apply_vistog"):
            model(**proc(images=images[:1], text=[PROMPT], return_tensors="pt"))
    finally:
        handle.remove()


def test_llava_vistog_trains_through_the_model(llava, images):
    """Gradients of the LLM's loss reach the semantic tokens and the grouping layer; none reach the
    (frozen) model."""
    model, proc = llava
    module = VisToG(32, 4).train()
    handle = apply_vistog(model, module, processor=proc)
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        inputs = proc(images=images[:1], text=[PROMPT], return_tensors="pt")
        model(**inputs, labels=inputs.input_ids).loss.backward()
        assert module.semantic_tokens.grad is not None and module.semantic_tokens.grad.abs().max() > 0
        assert module.grouping.q_proj.weight.grad.abs().max() > 0
        assert all(p.grad is None for p in model.parameters())
    finally:
        handle.remove()
        for p, r in zip(model.parameters(), frozen):
            p.requires_grad_(r)


# --------------------------------------------------------------------------------------------
# CI-sized run of examples/vistog_digits.py
# --------------------------------------------------------------------------------------------

#: The CI run's sizes: the demo's tower and head, 3000 training mosaics (batch 32), tower pre-trained
#: 5 epochs, 4 epochs per method, 500 test mosaics, M = 4; about a minute of CPU time.
SMALL = dict(train_images=3000, test_images=500, pretrain_epochs=5, epochs=4, batch=32, tokens=(4,),
             methods=("all", "vistog", "frozen"), progress=False)


def _demo_module():
    """examples/vistog_digits.py as a module (registered in sys.modules: its dataclass needs that)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "vistog_digits" in sys.modules:
        return sys.modules["vistog_digits"]
    path = Path(__file__).resolve().parents[1] / "examples" / "vistog_digits.py"
    spec = importlib.util.spec_from_file_location("vistog_digits", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vistog_digits"] = module
    spec.loader.exec_module(module)
    return module


def test_digits_demo_small():
    """Trained VisToG at M = 4 against all 64 patches and against its assignment frozen at
    initialisation, and its groups against the quadrants. Measured at these sizes for seeds 0-4
    (docs/vistog.md "CI-sized run"): VisToG / all-patch accuracy 1.000, 0.977, 1.003, 1.002, 1.000;
    points above frozen 19.8, 22.0, 29.0, 17.7, 13.6; purity 1.000, 0.750, 0.997, 1.000, 1.000. The
    test runs seed 0 with thresholds every seed passes (0.92, 10 points, 0.7), so that another CPU's
    rounding, which can change a training trajectory, does not make it flaky."""
    pytest.importorskip("sklearn")
    demo = _demo_module()
    threads = torch.get_num_threads()
    result = demo.run(demo.Config(seed=0, **SMALL))
    assert torch.get_num_threads() == threads  # the run's single thread does not leak into the session
    acc = {r["method"]: r["accuracy"] for r in result["rows"]}
    vistog = next(r for r in result["rows"] if r["method"] == "vistog")
    assert acc["all"] >= 0.9, acc  # the frozen tower's patches answer the questions
    assert acc["vistog"] >= 0.92 * acc["all"], acc
    assert acc["vistog"] - acc["frozen"] >= 0.10, acc
    assert vistog["purity"] >= 0.7, vistog["purity"]
    assert vistog["_labels"].shape == (500, 64)
    saved = demo.public(result)
    assert saved["summary"]["vistog_M4_share_of_all"] == pytest.approx(acc["vistog"] / acc["all"], abs=1e-4)


def test_digits_demo_purity_and_mosaics():
    """The demo's measures on known inputs: quadrant groups are pure, one group holds a quarter."""
    pytest.importorskip("sklearn")
    demo = _demo_module()
    quadrants = demo.QUADRANT_OF_PATCH[None].expand(3, 64)
    assert demo.group_purity(quadrants) == 1.0
    assert demo.group_purity(torch.zeros(3, 64, dtype=torch.int64)) == 0.25
    assert demo.group_purity(quadrants * 2 + (torch.arange(64) % 2)) == 1.0  # 8 groups inside quadrants
    (img, lab), (test_img, _) = demo.digit_split(0)
    assert len(img) + len(test_img) == 1797
    pixels, answers = demo.make_mosaics(img, lab, 5, 0.5, seed=1)
    assert pixels.shape == (5, 1, 16, 16) and answers.shape == (5, 4)
    for i in range(5):
        for q in range(4):
            tile = pixels[i, 0, 8 * (q // 2):8 * (q // 2) + 8, 8 * (q % 2):8 * (q % 2) + 8]
            assert (tile == -1).all() == (answers[i, q] == demo.BLANK)  # blank quadrants, and only they
