"""The paper's model: reference split, RFR crops, gradient isolation, frozen stem and BatchNorm."""

import copy

import pytest
import torch
import torchvision

from distlocal.model import FeatureReconstruction, build_backbone, build_stages, split_backbone
from distlocal.model.mil import AuxClassifier

# reference.md: units 1..8 = layer1[0], layer1[1], layer1[2], layer2[0:2], layer2[2:4], layer3[0:3],
# layer3[3:6], layer4 over the 16 blocks (layer1 0-2, layer2 3-6, layer3 7-12, layer4 13-15).
UNITS = [(0,), (1,), (2,), (3, 4), (5, 6), (7, 8, 9), (10, 11, 12), (13, 14, 15)]


def _blocks(stages):
    return [s.spec.blocks for s in stages]


# Exactness claims (folding, recompute, tiling, K=1 vs E2E) compare two orders of the same arithmetic. In fp32 the
# rounding of a deep network differs from one CPU to the next (kernels, thread count), so these tests run in
# float64, where rounding is ~1e-16 and a tolerance of 1e-9 is five orders of magnitude clear of it on any machine,
# yet far below any real difference (a wrong scale, a missing term: relative 1e-3 or more).
EXACT = {"rtol": 1e-9, "atol": 1e-11}


def _float64(stages):
    """Stages moved to float64 (they compute in their parameters' dtype); the optimizer keeps the same tensors."""
    for stage in stages:
        _modules(stage).double()
    return stages


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def test_reference_split_k4_matches_units(make_cfg):
    """K=4: M1 = units 1-2 (64 ch, 1/6), M2 = 3-4 (128, 1/12), M3 = 5-6 (256, 1/24), M4 = 7-8 (512, 1/48)."""
    stages = build_stages(make_cfg("model.k=4"), 2)
    assert _blocks(stages) == [UNITS[0] + UNITS[1], UNITS[2] + UNITS[3], UNITS[4] + UNITS[5], UNITS[6] + UNITS[7]]
    assert [(s.spec.out_channels, s.spec.out_stride) for s in stages] == [(64, 6), (128, 12), (256, 24), (512, 48)]


def test_reference_split_k8_is_one_unit_per_stage(make_cfg):
    """K=8: module k runs unit k."""
    assert _blocks(build_stages(make_cfg("model.k=8"), 2)) == UNITS


def test_reference_rfr_patches_and_kernels(make_cfg):
    """RFR patch/factor and classifier kernels per reference.md for K=4 and K=8."""
    cfg4 = make_cfg("model.k=4", "model.rfr.patch_size=128")
    cfg8 = make_cfg("model.k=8", "model.rfr.patch_size=128")
    s4, s8 = build_stages(cfg4, 2), build_stages(cfg8, 2)
    assert [(s.modules["rfr"].patch, s.modules["rfr"].factor) for s in s4[:-1]] == [(128, 1), (64, 2), (32, 2)]
    assert [(s.modules["rfr"].patch, s.modules["rfr"].factor) for s in s8[:-1]] == [
        (128, 1), (128, 1), (128, 1), (64, 2), (64, 1), (32, 2), (32, 1)]
    assert [s.modules["classifier"].kernel for s in s4] == [9, 9, 7, 5]
    assert [s.modules["classifier"].kernel for s in s8] == [9, 9, 9, 9, 9, 7, 7, 5]
    assert "rfr" not in s4[-1].modules
    assert "rfr" not in s8[-1].modules


@pytest.mark.parametrize("k", range(1, 17))
def test_balanced_split_covers_all_blocks(make_cfg, k):
    """Any K in 1..16 gives K non-empty contiguous stages covering every block once."""
    cfg = make_cfg(f"model.k={k}", "model.split=balanced")
    specs = split_backbone(build_backbone(cfg.model), k, "balanced")
    assert [b for s in specs for b in s.blocks] == list(range(16))
    assert all(s.blocks for s in specs)
    assert max(len(s.blocks) for s in specs) - min(len(s.blocks) for s in specs) <= 1


def test_first_conv_stride_three_and_stem_frozen(make_cfg):
    """conv1 has stride 3 and no stem parameter trains."""
    stem = build_stages(make_cfg(), 2)[0].modules["stem"]
    assert stem[0].stride == (3, 3)
    assert not any(p.requires_grad for p in stem.parameters())


def test_rfr_crop_shapes():
    """Crops are p x p from x_i and (p*u) x (p*u) from x_{i-1}, 10 of them."""
    rfr = FeatureReconstruction(in_channels=64, out_channels=128, factor=2, patch=16)
    x_in, x_out = torch.randn(1, 64, 80, 70), torch.randn(1, 128, 40, 35)
    src, tgt = rfr.sample(x_out, x_in, torch.Generator().manual_seed(0))
    assert src.shape == (10, 128, 16, 16)
    assert tgt.shape == (10, 64, 32, 32)


def test_rfr_crops_are_aligned():
    """The target crop is the input window under the source crop (checked with a coordinate map)."""
    rfr = FeatureReconstruction(in_channels=1, out_channels=1, factor=2, patch=4)
    ys = torch.arange(40.0)[:, None].expand(40, 30)
    x_in, x_out = ys[None, None], ys[::2, ::2][None, None] / 2
    src, tgt = rfr.sample(x_out, x_in, torch.Generator().manual_seed(3))
    assert torch.equal(tgt[:, :, ::2, ::2] / 2, src)


def test_rfr_clamps_patch_on_small_maps():
    """A map smaller than the patch gives a clamped patch instead of a crash."""
    rfr = FeatureReconstruction(in_channels=8, out_channels=8, factor=1, patch=128)
    loss, patch = rfr(torch.randn(1, 8, 9, 30), torch.randn(1, 8, 9, 30), torch.Generator().manual_seed(0))
    assert patch == 9
    assert torch.isfinite(loss)


def test_stage_loss_is_ce_plus_alpha_l1(make_cfg, slide):
    """Stage loss = CE(A_i) + alpha * L1(RFR), recomputed from the parts with the same randomness."""
    stage = build_stages(make_cfg("model.k=4", "model.rfr.alpha=2.5"), 2)[0]
    _, m = stage.train_step(slide, 1)
    assert m["loss"] == pytest.approx(m["loss_cls"] + 2.5 * m["loss_rec"], rel=1e-5)
    assert m["loss_rec"] > 0


def test_rfr_disabled_has_no_reconstruction(make_cfg, slide):
    """model.rfr.enabled=false removes U_i: the loss is the classification loss alone."""
    stage = build_stages(make_cfg("model.k=4", "model.rfr.enabled=false"), 2)[0]
    _, m = stage.train_step(slide, 0)
    assert "rfr" not in stage.modules
    assert m["loss"] == m["loss_cls"]


def test_gradient_isolation(make_cfg, slide):
    """Stage 2's loss leaves every parameter (and gradient) of stage 1 untouched."""
    s1, s2 = build_stages(make_cfg("model.k=4", "train.accumulate=2"), 2)[:2]
    x1, _ = s1.train_step(slide, 1)
    before = {k: v.clone() for k, v in s1.modules.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in s1.modules.parameters()]
    assert not x1.requires_grad
    for _ in range(2):  # second call steps stage 2's optimizer
        s2.train_step(x1, 1)
    assert all(torch.equal(v, s1.modules.state_dict()[k]) for k, v in before.items())
    for g, p in zip(grads, s1.modules.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)


def test_stem_and_batchnorm_statistics_do_not_change(make_cfg, slide):
    """Training steps change weights but never the stem nor any BatchNorm running statistic."""
    stages = build_stages(make_cfg("model.k=4"), 2)
    frozen = {f"{i}.{k}": v.clone() for i, s in enumerate(stages) for k, v in s.modules.state_dict().items()
              if "running" in k or k.startswith("stem.")}
    first = stages[0].modules["backbone"][0].conv1.weight.clone()
    for y in (0, 1, 1):
        x = slide
        for s in stages:
            x, _ = s.train_step(x, y)
    now = {f"{i}.{k}": v for i, s in enumerate(stages) for k, v in s.modules.state_dict().items()}
    assert all(torch.equal(v, now[k]) for k, v in frozen.items() if "rfr" not in k)
    assert not torch.equal(first, stages[0].modules["backbone"][0].conv1.weight)


def test_optimizer_groups_and_learning_rates(make_cfg):
    """AdamW has the backbone group at lr_backbone and the auxiliary group at lr_aux, wd 1e-6."""
    stage = build_stages(make_cfg("model.k=4", "train.lr_backbone=1e-5", "train.lr_aux=2e-5"), 2)[1]
    groups = {g["name"]: g for g in stage.optim.optimizer.param_groups}
    assert (groups["backbone"]["lr"], groups["auxiliary"]["lr"]) == (1e-5, 2e-5)
    assert {g["weight_decay"] for g in groups.values()} == {1e-6}
    backbone_ids = {id(p) for p in stage.modules["backbone"].parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    aux = list(stage.modules["classifier"].parameters()) + list(stage.modules["rfr"].parameters())
    assert {id(p) for p in groups["auxiliary"]["params"]} == {id(p) for p in aux}


def test_step_every_accumulate_slides(make_cfg, slide):
    """With accumulate=3 the weights change on slides 3 and 6 only."""
    stage = build_stages(make_cfg("model.k=4", "train.accumulate=3"), 2)[3]
    x = torch.randn(1, 256, 12, 10)
    w = stage.modules["backbone"][0].conv1.weight
    changed = []
    for n in range(6):
        before = w.clone()
        _, m = stage.train_step(x, n % 2)
        changed.append((not torch.equal(before, w), bool(m["stepped"])))
    assert changed == [(False, False), (False, False), (True, True)] * 2
    assert stage.optim.steps == 2


def test_small_slide_trains_and_counts_clamping(make_cfg):
    """A slide smaller than the RFR patch and the classifier kernel still trains through all stages."""
    stages = build_stages(make_cfg("model.k=4", "model.rfr.patch_size=128"), 3)
    x = torch.randn(1, 3, 50, 40)
    for s in stages:
        x, m = s.train_step(x, 2)
        assert torch.isfinite(torch.tensor(m["loss"]))
    assert [s.rfr_clamped for s in stages] == [1, 1, 1, 0]


def test_bf16_autocast_runs(make_cfg, slide):
    """train.precision=bf16 trains with autocast and keeps the fp32 interface."""
    stage = build_stages(make_cfg("model.k=4", "train.precision=bf16"), 2)[0]
    x, m = stage.train_step(slide, 0)
    assert x.dtype == torch.bfloat16
    assert m["loss"] > 0
    _, probs, _ = stage.eval_step(slide)
    assert probs.dtype == torch.float32
    assert probs.sum().item() == pytest.approx(1, abs=1e-3)


def test_bf16_stages_hold_their_input_in_bf16(make_cfg, slide):
    """Under bf16 the stem output and a later stage's input stay in bf16, what the blocks consume: no fp32 map held."""
    stages = build_stages(make_cfg("model.k=4", "train.precision=bf16"), 2)
    seen = []
    for stage in stages[:2]:
        stage.modules["backbone"][0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x, _ = stages[0].train_step(slide, 0)
    stages[1].train_step(x, 0)
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_bf16_classifier_scores_in_fp32():
    """Under bf16 autocast a classifier's logits are fp32 (AUROC ranks them): the fp32 head on the same reduced map."""
    torch.manual_seed(0)
    classifier = AuxClassifier.auxiliary(8, 2, 2).eval()
    x = torch.randn(1, 8, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attention = classifier(x)
        z = classifier.reduce(x)
    assert logits.dtype == attention.dtype == torch.float32
    pooled, _ = classifier.pool(z.float().flatten(2)[0].T)
    torch.testing.assert_close(logits, classifier.classify(pooled)[None], rtol=1e-6, atol=1e-6)


def test_eval_step_gives_probabilities_and_attention(make_cfg, slide):
    """eval_step returns softmax probabilities and an attention map over positions that sums to 1."""
    stage = build_stages(make_cfg("model.k=4"), 3)[0]
    _, probs, attention = stage.eval_step(slide)
    assert probs.shape == (3,)
    assert probs.sum().item() == pytest.approx(1, abs=1e-5)
    assert attention.sum().item() == pytest.approx(1, abs=1e-5)


def test_local_weights_load(make_cfg, tmp_path):
    """model.weights loads a local torchvision state dict into the backbone."""
    import torchvision

    net = torchvision.models.resnet34()
    torch.nn.init.constant_(net.layer4[2].conv2.weight, 0.125)
    torch.save(net.state_dict(), tmp_path / "r34.pt")
    stages = build_stages(make_cfg("model.k=4", f"model.weights={tmp_path / 'r34.pt'}"), 2)
    assert torch.all(stages[-1].modules["backbone"][-1].conv2.weight == 0.125)


def test_missing_weights_file_names_the_fix(make_cfg, tmp_path):
    """A missing model.weights file fails with the path and the fix."""
    from distlocal.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.weights=.*nope\.pt does not exist"):
        build_stages(make_cfg(f"model.weights={tmp_path / 'nope.pt'}"), 2)


def test_k1_local_equals_end_to_end(make_cfg):
    """Local training with K=1 gives the same parameters as end-to-end training (same seed, slides)."""
    gen = torch.Generator().manual_seed(5)
    slides = [(_randn(1, 3, 96 + 8 * i, 80, generator=gen), i % 2) for i in range(4)]
    common = ["model.k=1", "model.backbone=resnet18", "model.split=balanced", "train.accumulate=2"]
    local = _float64(build_stages(make_cfg(*common), 2))[0]
    e2e = _float64(build_stages(make_cfg(*common, "model.mode=e2e"), 2))[0]
    for x, y in slides:
        local.train_step(x, y)
        e2e.train_step(x, y)
    ours = dict(local.modules["stem"].named_parameters(prefix="stem")) | {
        n: p for n, p in local.modules["backbone"].named_parameters(prefix="blocks")} | {
        n: p for n, p in local.modules["classifier"].named_parameters(prefix="head")}
    theirs = dict(e2e.net.named_parameters())
    assert ours.keys() == theirs.keys()
    assert e2e.optim.steps == 2
    for name, p in theirs.items():
        torch.testing.assert_close(ours[name], p, **EXACT, msg=name)
    assert not torch.equal(theirs["head.classify.2.weight"], _float64(build_stages(make_cfg(
        *common, "model.mode=e2e"), 2))[0].net.head.classify[2].weight)


@pytest.mark.parametrize(("mode", "fold", "ratio"), [("local", False, 0.6), ("e2e", False, 0.6), ("local", True, 0.8)])
def test_recomputed_activations_give_the_same_training(make_cfg, mode, fold, ratio):
    """
    train.recompute_activations reruns each block in backward: the same losses and parameters, fewer saved bytes.
    With folded BatchNorm a block keeps half as much to begin with, so recomputing saves less.
    """
    from distlocal.bench.memory import _saved_bytes

    k = "model.k=1" if mode == "e2e" else "model.k=2"
    gen = torch.Generator().manual_seed(3)
    slides = [(_randn(1, 3, 176, 160, generator=gen), i % 2) for i in range(3)]
    common = [k, "model.backbone=resnet18", "model.split=balanced", f"model.mode={mode}",
              "model.rfr.patch_size=8",  # RFR small beside F_i
              f"train.fold_batchnorm={str(fold).lower()}"]
    plain = _float64(build_stages(make_cfg(*common), 2))
    again = _float64(build_stages(make_cfg(*common, "train.recompute_activations=true"), 2))
    for x, y in slides:
        for a, b in zip(plain, again, strict=True):
            weights = [{p.untyped_storage().data_ptr() for p in _modules(s).parameters()} for s in (a, b)]
            saved_a, (x_a, m_a) = _saved_bytes(lambda s=a, h=x, c=y: s.train_step(h, c), exclude=weights[0])
            saved_b, (x_b, m_b) = _saved_bytes(lambda s=b, h=x, c=y: s.train_step(h, c), exclude=weights[1])
            assert saved_b < ratio * saved_a  # only block inputs stay (and what the classifier and RFR save)
            assert m_b["loss"] == pytest.approx(m_a["loss"], rel=EXACT["rtol"])
            torch.testing.assert_close(x_b, x_a, **EXACT)
            x = x_a
    for a, b in zip(plain, again, strict=True):
        for (name, p), q in zip(_modules(a).named_parameters(), _modules(b).parameters(), strict=True):
            torch.testing.assert_close(q, p, **EXACT, msg=name)


def _modules(stage):
    return stage.net if hasattr(stage, "net") else stage.modules


@pytest.mark.parametrize("mode", ["local", "e2e"])
def test_folded_batchnorm_gives_the_same_training(make_cfg, mode):
    """
    train.fold_batchnorm runs each frozen BatchNorm inside its convolution: the same outputs and gradients (to float
    rounding), BatchNorm's affine weights included, and about half the feature-map bytes kept for backward.
    """
    k = "model.k=1" if mode == "e2e" else "model.k=2"
    gen = torch.Generator().manual_seed(5)
    slides = [(_randn(1, 3, 176, 160, generator=gen), i % 2) for i in range(2)]
    # No optimizer step: AdamW would turn rounding-sized gradient differences into lr-sized parameter ones.
    common = [k, "model.backbone=resnet18", "model.split=balanced", f"model.mode={mode}", "model.rfr.patch_size=8",
              "train.accumulate=8"]
    plain = _float64(build_stages(make_cfg(*common, "train.fold_batchnorm=false"), 2))
    folded = _float64(build_stages(make_cfg(*common, "train.fold_batchnorm=true"), 2))
    for bn in (m for s in plain for m in _modules(s).modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen)  # statistics unlike the identity, or folding is trivial
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    for a, b in zip(plain, folded, strict=True):
        _modules(b).load_state_dict(_modules(a).state_dict())
    for x, y in slides:
        for a, b in zip(plain, folded, strict=True):
            maps_a, (x_a, m_a) = _saved_maps(lambda s=a, h=x, c=y: s.train_step(h, c))
            maps_b, (x_b, m_b) = _saved_maps(lambda s=b, h=x, c=y: s.train_step(h, c))
            assert maps_b < 0.6 * maps_a  # per block: two maps kept instead of four
            assert m_b["loss"] == pytest.approx(m_a["loss"], rel=EXACT["rtol"])
            torch.testing.assert_close(x_b, x_a, **EXACT)
            x = x_a
    for a, b in zip(plain, folded, strict=True):
        for (name, p), q in zip(_modules(a).named_parameters(), _modules(b).parameters(), strict=True):
            if name.startswith(("backbone.", "blocks.")):  # what folding changes
                assert (q.grad - p.grad).norm() <= EXACT["rtol"] * p.grad.norm(), name
    bn_grads = [p.grad for n, p in _modules(folded[-1]).named_parameters() if ".bn" in n and p.requires_grad]
    assert bn_grads
    assert all(g.abs().sum() > 0 for g in bn_grads), "BatchNorm's affine weights must still train"
    x = slides[0][0] if mode == "e2e" else plain[0].train_step(slides[0][0], 0)[0]
    torch.testing.assert_close(folded[-1].eval_step(x)[1], plain[-1].eval_step(x)[1], **EXACT)


def _saved_maps(step):
    """(bytes of the distinct slide feature maps, 1 x C x H x W, that autograd kept for backward, step's result)."""
    seen = {}

    def pack(t):
        if t.dim() == 4 and t.shape[0] == 1:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = step()
    return sum(seen.values()), result


def test_stem_in_tiles_gives_the_same_stage_1(make_cfg):
    """Stage 1 runs the frozen stem in tiles on large slides (run_stem): the same output and loss as in one pass."""
    slide = _randn(1, 3, 300, 262, generator=torch.Generator().manual_seed(7))
    cfg = make_cfg("model.k=2", "model.backbone=resnet18", "model.split=balanced", "model.rfr.patch_size=8")
    whole, tiled = _float64(build_stages(cfg, 2))[0], _float64(build_stages(cfg, 2))[0]
    tiled.stem_tile_pixels = 70 * 70  # about 16 tiles with their halos
    x_whole, m_whole = whole.train_step(slide, 1)
    x_tiled, m_tiled = tiled.train_step(slide, 1)
    torch.testing.assert_close(x_tiled, x_whole, **EXACT)
    assert m_tiled["loss"] == pytest.approx(m_whole["loss"], rel=EXACT["rtol"])
    tiled.stem_tile_pixels = 10  # cannot hold one output: a clear error, not a wrong map
    with pytest.raises(ValueError, match="cannot hold one output"):
        tiled.train_step(slide, 1)


def test_folded_convolution_gradients_are_exact():
    """The folded conv's hand-written backward against numerical gradients (float64): input, weight, scale, shift."""
    from distlocal.model.fold import FoldedBasicBlock, _FoldedConv

    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    gen = torch.Generator().manual_seed(2)
    f64 = {"dtype": torch.float64, "generator": gen}
    inputs = [torch.randn(1, 3, 9, 8, **f64), conv.weight.detach().clone(), torch.rand(4, **f64) + 0.5,
              torch.randn(4, **f64)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda x, w, s, t: _FoldedConv.apply(x, w, s, t, conv), inputs)
    # A block whose BatchNorm is in training mode is not frozen: it runs unfolded, as torchvision would.
    block = torchvision.models.resnet.BasicBlock(8, 8).double().train()
    reference = copy.deepcopy(block)
    block.__class__ = FoldedBasicBlock
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(block(x), reference(x))
