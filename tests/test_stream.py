"""Streamed stages (model.stream=on): a streamed training step is the whole-slide step, computed tile by tile."""

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distlocal.config_load import load_config
from distlocal.data import SlideLoader, read_manifest
from distlocal.engine.local import LocalExecutor
from distlocal.engine.ray_executor import RayExecutor
from distlocal.model import build_stages
from distlocal.model.stream import streamed_backward
from distlocal.model.tiling import stitched_forward
from distlocal.slides import SlideError
from distlocal.slides.cache import entry_paths
from tests.harness import damaged_cache

# float64: the two steps differ only in summation order (~1e-16 relative); any real error (a position counted twice
# or not at all, a missing halo) is of the order of the gradient itself.
EXACT = {"rtol": 1e-9, "atol": 1e-11}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the shipped configs


def _assert_exact(actual: torch.Tensor, expected: torch.Tensor, msg: str, rtol: float = EXACT["rtol"],
                  atol: float = EXACT["atol"]) -> None:
    """assert_close's test in 2 passes instead of its ~10 (a ResNet's 21M float64 weights, twice a case)."""
    if not ((actual - expected).abs_() <= expected.abs().mul_(rtol).add_(atol)).all():
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)  # its message says where


def _modules(stage):
    return stage.net if hasattr(stage, "net") else stage.modules


def _pair(make_cfg, *overrides):
    """(whole-slide stages, streamed stages), float64, identical weights; the driver steps, so gradients stay."""
    common = ["model.rfr.patch_size=8", "train.accumulate=1", *overrides]
    whole = build_stages(make_cfg(*common), 2)
    streamed = build_stages(make_cfg(*common, "model.stream=on"), 2)
    for stage in (*whole, *streamed):
        _modules(stage).double()
        stage.driver_steps = True
    assert all(s.streaming for s in streamed)
    assert not any(s.streaming for s in whole)
    return whole, streamed


def _assert_same_step(whole, streamed, x, y, update: bool = True):
    """Each stage in turn: the same loss (CE and RFR), output, every gradient and (``update``) AdamW's update."""
    for a, b in zip(whole, streamed, strict=True):
        out_a, m_a = a.train_step(x, y, (0, "s"))
        out_b, m_b = b.train_step(x, y, (0, "s"))
        for key in ("loss", "loss_cls", "loss_rec"):
            assert m_b[key] == pytest.approx(m_a[key], rel=EXACT["rtol"], abs=1e-12), key
        torch.testing.assert_close(out_b, out_a, **EXACT)
        named = list(_modules(a).named_parameters())
        trained = [(n, p, q) for (n, p), q in zip(named, _modules(b).parameters(), strict=True) if p.requires_grad]
        assert all(p.grad is not None for _, p, _ in trained)
        for name, p, q in trained:
            _assert_exact(q.grad, p.grad, name)
        # AdamW's first step moves each weight by lr * g / (|g| + eps) (+ decay): a gradient difference d moves it
        # by at most lr * d / eps, so rounding-sized gradient differences give this much and no more.
        if not update:
            x = out_a
            continue
        lr_over_eps = max(g["lr"] for g in a.optim.optimizer.param_groups) / a.optim.optimizer.defaults["eps"]
        allowed = {name: lr_over_eps * (q.grad - p.grad).abs().max().item() + 1e-15 for name, p, q in trained}
        assert a.optim.step()
        assert b.optim.step()
        for name, p, q in trained:
            _assert_exact(q.detach(), p.detach(), name, rtol=0, atol=allowed[name])
        x = out_a


@pytest.mark.parametrize(("overrides", "size"), [
    # tiles of 48 slide px: 8 x 8 positions at stage 1 (16 x 16), 4 at stage 2 ...: they divide every map; with
    # classifier kernels of 2 the global part runs in chunks of 16 of stage 1's 64 instances, 4 of stage 2's 16
    (("model.k=4", "model.stream_tile=48", "model.classifier_kernels=[2,2,2,1]"), (96, 96)),
    # 6 positions at stage 1 (16 x 12): the last tiles are short, and chunks of 9 of its 48 instances too
    (("model.k=8", "model.stream_tile=36", "model.classifier_kernels=[2,2,2,1]"), (96, 72)),
    (("model.k=1", "model.stream_tile=96"), (144, 96)),  # one stage, all of ResNet34: 3 x 2 outputs in 2 x 1 tiles
    (("model.k=1", "model.backbone=resnet50", "model.split=balanced", "model.stream_tile=96"), (120, 96)),
    (("model.k=4", "model.stream_tile=4096"), (72, 60)),  # a slide smaller than one tile
    (("model.mode=e2e", "model.stream_tile=96"), (72, 132)),  # StreamingCNN's end-to-end method
], ids=["k4-dividing", "k8-not-dividing", "resnet34-k1", "resnet50-k1", "smaller-than-a-tile", "e2e"])
def test_streamed_step_equals_whole_slide_step(make_cfg, overrides, size):
    """
    In float64 the streamed step is the whole-slide step: losses, output maps, gradients and the update. (ResNet50's
    25 M float64 weights: its bottleneck blocks' gradients are compared, not AdamW's update of them, the same code
    as every other case's and half of this case's time.)
    """
    whole, streamed = _pair(make_cfg, *overrides)
    slide = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _assert_same_step(whole, streamed, slide, 1, update="model.backbone=resnet50" not in overrides)


def test_bf16_streamed_step_is_the_whole_slide_step_to_bf16_precision(make_cfg):
    """
    Under train.precision=bf16 the streamed step computes what the whole-slide bf16 step computes, to bf16's
    precision: the same bf16 output map (each element within one bf16 ulp, 2^-7 relative), the same loss, and
    gradients that point where the fp32 step's do. bf16's 8-bit significand alone moves each stage's gradient by
    4-27 % (normwise) from fp32's, for the whole-slide and the streamed step alike, and the two bf16 steps' gradients
    differ by 0.3-13 % (measured, ResNet18 K=2: cosine similarity 0.99 or more): the claim is that streaming adds no
    error of another order, cosine > 0.9 to fp32's and > 0.98 to the whole-slide bf16 step's (a quarter of the
    gradient lost would give 0.87).
    """
    common = ["model.backbone=resnet18", "model.k=2", "model.split=balanced", "model.stream_tile=48",
              "model.classifier_kernels=[2,2,2,1]", "model.rfr.patch_size=8"]
    runs = {name: build_stages(make_cfg(*common, *extra), 2) for name, extra in (
        ("fp32", []), ("whole", ["train.precision=bf16"]), ("streamed", ["train.precision=bf16", "model.stream=on"]))}
    for stages in runs.values():
        for stage in stages:
            stage.driver_steps = True
    inputs = dict.fromkeys(runs, torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)))
    for i in range(2):
        results = {}
        for name, stages in runs.items():
            out, metrics = stages[i].train_step(inputs[name], 1, (0, "s"))
            grad = torch.cat([p.grad.flatten().float() for p in stages[i].modules.parameters() if p.requires_grad])
            results[name], inputs[name] = (out, metrics["loss"], grad), out
        (_, fp32_loss, fp32_grad), (whole, loss, grad), (streamed, streamed_loss, streamed_grad) = results.values()
        assert streamed.dtype == whole.dtype == torch.bfloat16  # the map held and sent on is bf16
        torch.testing.assert_close(streamed.float(), whole.float(), rtol=2**-7, atol=1e-6)  # one bf16 ulp
        assert abs(streamed_loss - loss) <= abs(loss - fp32_loss) + 1e-3 * abs(loss)
        cosine = torch.nn.functional.cosine_similarity
        assert cosine(grad, fp32_grad, dim=0) > 0.9
        assert cosine(streamed_grad, fp32_grad, dim=0) > 0.9
        assert cosine(streamed_grad, grad, dim=0) > 0.98


@pytest.mark.parametrize("overrides", [("model.k=4", "model.stream_tile=48"),
                                       ("model.mode=e2e", "model.stream_tile=96")])
def test_streamed_evaluation_equals_whole_slide_evaluation(make_cfg, overrides):
    """A slide that trains streamed is validated tile by tile too: the same outputs, probabilities and attention."""
    whole, streamed = _pair(make_cfg, *overrides)
    x = torch.randn(1, 3, 96, 144, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for a, b in zip(whole, streamed, strict=True):
        out_a, probs_a, attention_a = a.eval_step(x)
        out_b, probs_b, attention_b = b.eval_step(x)
        assert b.streaming.streams(b.slide_pixels(x))  # the streamed path ran
        for actual, expected in ((out_b, out_a), (probs_b, probs_a), (attention_b, attention_a)):
            torch.testing.assert_close(actual, expected, **EXACT)
        x = out_a


def test_rfr_crops_gradients_join_the_streamed_backward(make_cfg):
    """RFR alone (no classification loss): its gradient reaches F_1 only through the crops, and matches."""
    whole, streamed = _pair(make_cfg, "model.k=2", "model.backbone=resnet18", "model.split=balanced",
                            "model.stream_tile=36", "model.rfr.alpha=1.0")
    slide = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for stage in (whole[0], streamed[0]):
        stage.modules["classifier"].requires_grad_(False)
        stage.modules["classifier"].classify[2].weight.data.zero_()  # constant logits: CE sends F_1 no gradient
        stage.train_step(slide, 0, (0, "s"))
    for (name, p), q in zip(whole[0].modules["backbone"].named_parameters(),
                            streamed[0].modules["backbone"].parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **EXACT, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in whole[0].modules["backbone"].parameters())  # RFR's, and only RFR's


def test_streamed_backward_counts_each_position_once():
    """Overlapping tiles' inputs: each output's gradient is applied once, and the weights get autograd's gradient."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 5, stride=2, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 3, 3, padding=1)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 37, 29, generator=gen, dtype=torch.float64)
    grad = torch.randn(1, 3, 19, 15, generator=gen, dtype=torch.float64)
    conv(x).backward(grad)
    expected = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    streamed_backward(conv, x, grad, 4, x.device, contextlib.nullcontext)
    for p, e in zip(conv.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, **EXACT)
    torch.testing.assert_close(stitched_forward(conv, x, 4, x.device), conv(x).detach(), **EXACT)


@pytest.mark.parametrize(("shape", "kernel", "patch"), [((37, 29), 3, 6), ((2, 3), 2, 1)],
                         ids=["k-does-not-divide", "padded-to-two-instances"])
def test_output_gradient_region_by_region_is_autograds(shape, kernel, patch):
    """
    x_i's gradient made region by region from z's and the RFR crops' (output_gradient) is autograd's gradient of the
    whole map: sides the kernel does not divide (their last rows the conv never reads), regions that do not align
    with the kernel's cells, overlapping crops, and a map AuxClassifier.pad extends to two instances.
    """
    from distlocal.model.mil import AuxClassifier
    from distlocal.model.stream import output_gradient

    gen = torch.Generator().manual_seed(5)
    classifier = AuxClassifier.auxiliary(4, 2, kernel).double()
    x = torch.randn(1, 4, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    z = classifier.reduce[0](classifier.pad(x))
    grad_z = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    corners = [(0, 1), (shape[0] - patch, shape[1] - patch - 1), (1, 2)]  # the first and last overlap the third
    crops = torch.randn(len(corners), 4, patch, patch, generator=gen, dtype=torch.float64)
    loss = (z * grad_z).sum() + sum((c * x[0, :, y:y + patch, x0:x0 + patch]).sum()
                                    for c, (y, x0) in zip(crops, corners, strict=True))
    loss.backward()
    region = output_gradient(classifier.reduce[0], grad_z, x.detach(), crops, corners, x.device,
                             contextlib.nullcontext)

    def tile(r0, r1, c0, c1):  # None: no gradient reaches the region (past the last whole cell, no crop there)
        grad = region(r0, r1, c0, c1)
        return torch.zeros(1, 4, r1 - r0, c1 - c0, dtype=torch.float64) if grad is None else grad

    rows = [torch.cat([tile(r, min(r + 4, shape[0]), c, min(c + 5, shape[1])) for c in range(0, shape[1], 5)], -1)
            for r in range(0, shape[0], 4)]
    torch.testing.assert_close(torch.cat(rows, -2), x.grad, **EXACT)
    nothing = output_gradient(classifier.reduce[0], torch.zeros_like(grad_z), x.detach(), None, [], x.device,
                              contextlib.nullcontext)
    assert nothing(0, shape[0], 0, shape[1]) is None  # no gradient reaches the map: its tiles are skipped


def _executor_cfg(manifest, tmp_path, *overrides):
    return load_config(None, [
        f"data.manifest={manifest}", f"run.dir={tmp_path}", "train.device=cpu", "model.backbone=resnet18",
        "model.k=2", "model.split=balanced", "train.accumulate=2", "model.rfr.patch_size=16", "train.lr_backbone=1e-3",
        "train.lr_aux=1e-3", "tracking.enabled=false", "train.placement_timeout_s=20", "train.max_inflight=1",
        "model.stream_tile=48", *overrides])


def _train(executor, cfg, slides: int | None = None, by_region: bool = False):
    records = read_manifest(cfg.data.manifest).split("train")[:slides]
    loader = SlideLoader(cfg.data, True, cfg.train.seed, by_region=by_region)
    return [m for _, m in executor.train(records, loader, 0)]


@pytest.fixture(scope="module")
def damaged_entry(manifest, tmp_path_factory):
    """(the manifest prepared into a cache with the second training slide's entry damaged inside, that slide's id)"""
    damaged = read_manifest(manifest).split("train")[1].slide_id
    return damaged_cache(manifest, tmp_path_factory.mktemp("cache"), damaged), damaged


def _unread_pass(executor, cfg, cache: Path, on_error: str = "skip", epoch: int = 1):
    """Four training slides from the damaged cache, read by region: (slide ids trained, the loader's skips)."""
    data = replace(cfg.data, cache_dir=str(cache), on_error=on_error)
    loader = SlideLoader(data, True, cfg.train.seed, by_region=True)
    records = read_manifest(cfg.data.manifest).split("train")[:4]
    return [slide_id for slide_id, _ in executor.train(records, loader, epoch)], loader.skipped


def test_a_tile_damaged_inside_skips_the_slide_as_if_it_were_absent(manifest, damaged_entry, tmp_path):
    """
    Streamed, stage 1 reads the slide by region: a cache tile damaged inside fails only then. Under
    data.on_error=skip the slide is reported with the tile and the file, and nothing learned from it: the stages
    end bit for bit where training on the other three slides alone ends (the stem reads every region before any
    gradient, optimizer count or random draw; each slide's draws are seeded by its id). Evaluation skips it too;
    under on_error=fail the run stops naming the cache file.
    """
    cache, damaged = damaged_entry
    cfg = _executor_cfg(manifest, tmp_path, "model.stream=on")
    skipping = LocalExecutor(build_stages(cfg, 2, "cpu"))
    trained, skipped = _unread_pass(skipping, cfg, cache)
    others = [r for r in read_manifest(manifest).split("train")[:4] if r.slide_id != damaged]
    assert trained == [r.slide_id for r in others]
    assert [s.slide_id for s in skipped] == [damaged]
    assert "corrupt or truncated tile 0" in skipped[0].reason
    assert entry_paths(cache, damaged)[0].name in skipped[0].reason
    absent = LocalExecutor(build_stages(cfg, 2, "cpu"))
    loader = SlideLoader(replace(cfg.data, cache_dir=str(cache)), True, cfg.train.seed, by_region=True)
    assert [slide_id for slide_id, _ in absent.train(others, loader, 1)] == trained
    for ours, theirs in zip(skipping.state_dicts(), absent.state_dicts(), strict=True):
        assert ours["optim"]["steps"] == theirs["optim"]["steps"] == 1
        for name, tensor in theirs["modules"].items():  # the same arithmetic in one process: no rounding to allow
            assert torch.equal(ours["modules"][name], tensor), name
    evaluating = SlideLoader(replace(cfg.data, cache_dir=str(cache), on_error="skip"), False, by_region=True)
    evaluated = [slide_id for slide_id, _ in skipping.evaluate(read_manifest(manifest).split("train")[:4], evaluating)]
    assert evaluated == trained
    assert [s.slide_id for s in evaluating.skipped] == [damaged]
    with pytest.raises(SlideError, match=rf"{entry_paths(cache, damaged)[0].name}: cache entry is damaged: corrupt "
                                         r"or truncated tile 0.*prepare again with --force"):
        _unread_pass(skipping, cfg, cache, on_error="fail")


def test_short_training_streamed_equals_whole_slide_local_and_ray(local_ray, actor_threads, manifest, damaged_entry,
                                                                  tmp_path):
    """
    Training with streaming on ends where it ends with it off (local executor, float64, two optimizer steps: the
    second starts from AdamW state the first left), and the Ray pipeline runs the streamed step as the local
    executor does (fp32, the same arithmetic). The streamed runs read their slides by region (data/regions.py;
    through the Ray loader actor to stage 1's actor), the others decoded whole: the same augmented inputs.
    Then both run an epoch from the damaged cache under on_error=skip: Ray's stage 1 passes the slide it cannot
    read on as a marker (engine/unread.py), nothing enters recovery, and the pipeline skips it as the local executor
    does.
    """
    # Half of the 8 training slides: two windows of 2 show what a whole epoch (4 windows) did, at half the cost of
    # the four runs (two in float64).
    slides = 4
    off, on = (_executor_cfg(manifest, tmp_path, f"model.stream={v}") for v in ("off", "on"))
    whole, streamed = (LocalExecutor(build_stages(c, 2, "cpu")) for c in (off, on))
    for executor in (whole, streamed):
        for stage in executor.stages:
            stage.modules.double()
    _train(whole, off, slides)
    _train(streamed, on, slides, by_region=True)
    for ours, theirs in zip(streamed.state_dicts(), whole.state_dicts(), strict=True):
        assert ours["optim"]["steps"] == theirs["optim"]["steps"] == slides // 2
        for name, tensor in theirs["modules"].items():  # two AdamW steps: rounding grows, still far below 1e-6
            torch.testing.assert_close(ours["modules"][name], tensor, rtol=1e-6, atol=1e-8, msg=name)
    local = LocalExecutor(build_stages(on, 2, "cpu"))
    local_metrics = _train(local, on, slides)
    remote = RayExecutor(replace(on, train=replace(on.train, executor="ray")), 2)
    try:
        remote_metrics = _train(remote, on, slides, by_region=True)
        remote_unread = _unread_pass(remote, on, damaged_entry[0])
        remote_states = remote.state_dicts()
    finally:
        remote.close()
    assert [m[-1]["loss"] for m in remote_metrics] == pytest.approx([m[-1]["loss"] for m in local_metrics], rel=1e-4)
    local_unread = _unread_pass(local, on, damaged_entry[0])
    assert remote_unread[0] == local_unread[0]
    assert len(local_unread[0]) == 3
    assert remote_unread[1] == local_unread[1]
    assert [s.slide_id for s in local_unread[1]] == [damaged_entry[1]]
    for ours, theirs in zip(remote_states, local.state_dicts(), strict=True):
        for name, tensor in theirs["modules"].items():
            torch.testing.assert_close(ours["modules"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_stream_keys_read_on_and_off_and_name_bad_values(tmp_path):
    """YAML 1.1 reads on / off as booleans: model.stream takes them as the choice; bad values name the key."""
    from distlocal.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  stream: on\n")
    assert load_config(path).model.stream == "on"
    assert load_config(None, ["model.stream=off"]).model.stream == "off"
    with pytest.raises(ConfigError, match=r"model\.stream_tile"):
        load_config(None, ["model.stream_tile=0"])
    with pytest.raises(ConfigError, match=r"model\.stream.*choose one of: off, on"):
        load_config(None, ["model.stream=sometimes"])


def test_10x_training_of_synthetic_slides_from_the_cli(local_ray, tmp_path, capsys):
    """
    `distlocal synth` writes 20X files (levels 20X, 5X, 1.25X): a 10X read is the 20X level area-averaged, twice a
    5X read's side. `distlocal train configs/synthetic.yaml --set data.magnification=10 --set model.stream=on` then
    completes for local K=4, E2E (StreamingCNN's method) and the Ray pipeline (K=2: a stage actor on each side of
    one hop, fed by a loader actor that hands stage 1 the slide's regions).
    """
    from distlocal.cli import main
    from distlocal.engine.checkpoint import load_checkpoint
    from distlocal.slides import read_slide

    assert main(["synth", str(tmp_path / "slides"), "--slides", "4", "--size", "40", "40", "--seed", "1"]) == 0
    manifest = tmp_path / "slides" / "manifest.csv"
    first = next(r for r in read_manifest(manifest).records)
    at5, at10 = (read_slide(first.path, m, crop_tissue=False).image.shape[:2] for m in (5, 10))
    assert (at5, at10) == ((40, 40), (80, 80))
    common = [f"data.manifest={manifest}", f"run.dir={tmp_path}", "data.magnification=10", "model.stream=on",
              "model.stream_tile=48", "train.epochs=1", "train.device=cpu", "tracking.enabled=false",
              "train.heatmaps=0", "model.rfr.patch_size=8", "model.backbone=resnet18"]  # resnet18: half the weights
    for name, extra in (("k4", []), ("e2e", ["model.mode=e2e"]),
                        ("ray", ["train.executor=ray", "model.k=2", "train.placement_timeout_s=60"])):
        capsys.readouterr()
        sets = [a for key in (*common, f"run.name={name}", *extra) for a in ("--set", key)]
        assert main(["train", str(CONFIGS / "synthetic.yaml"), *sets]) == 0, name
        summary = json.loads(capsys.readouterr().out.split("\nrun folder:")[0])
        assert summary["completed"], name
        assert summary["slides_seen"] > 0, name
        cfg = load_checkpoint(tmp_path / name / "checkpoints" / "last").config
        assert (cfg.data.magnification, cfg.model.stream) == (10, "on"), name
        assert cfg.train.executor == ("ray" if name == "ray" else "local"), name


@pytest.mark.parametrize("chunk", [1, 7, 35])
def test_chunked_global_part_equals_pooled(chunk):
    """
    GroupNorm, attention (dropout on) and MLP in chunks of 1, 7 and N instances: AuxClassifier.pooled's values, the
    same dropout draws, and every gradient (parameters and d loss / d z), in float64.
    """
    from distlocal.model.mil import AuxClassifier
    from distlocal.model.stream_global import ChunkedPooled

    gen = torch.Generator().manual_seed(0)
    classifier = AuxClassifier.auxiliary(6, 3, 2).double().train()
    for p in classifier.parameters():  # GroupNorm's affine away from 1 / 0, so its gradients are not trivial
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    z = (3 + 2 * torch.randn(1, 6, 5, 7, generator=gen, dtype=torch.float64))  # means far from 0: two-pass matters
    weights = torch.randn(1, 3, generator=gen, dtype=torch.float64)  # a loss whose gradient no softmax saturates
    whole_z = z.clone().requires_grad_()
    logits, attention = classifier.pooled(whole_z, torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in classifier.named_parameters() if not n.startswith("reduce.0")}
    classifier.zero_grad(set_to_none=True)
    draws = torch.Generator().manual_seed(1)
    part = ChunkedPooled(classifier, z, chunk, z.device, draws)
    (part.logits * weights).sum().backward()
    grad_z = part.backward()
    torch.testing.assert_close(part.logits, logits, **EXACT)
    torch.testing.assert_close(part.attention_map, attention, **EXACT)
    torch.testing.assert_close(grad_z, whole_z.grad, **EXACT)
    assert len(expected) == 12  # GroupNorm's 2, the attention's 6, the MLP's 4 (the strided conv is not global)
    for name, p in classifier.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], **EXACT, msg=name)
    reference = torch.Generator().manual_seed(1)
    torch.rand(35, generator=reference)  # one draw of N: the generators end in the same state
    assert torch.equal(draws.get_state(), reference.get_state())


@pytest.mark.parametrize("tile_z", [1, 3, 16])
def test_predict_classifier_on_a_map_in_host_memory_equals_the_whole(tile_z):
    """Predict's classifier on a stage map larger than a tile: first conv in tiles, global part in chunks (float64)."""
    from distlocal.model.mil import AuxClassifier
    from distlocal.model.stream import streamed_classifier

    gen = torch.Generator().manual_seed(2)
    classifier = AuxClassifier.auxiliary(8, 3, 2).double().eval()
    x = torch.randn(1, 8, 13, 10, generator=gen, dtype=torch.float64)  # 6 x 5 instances: tiles that do not divide
    with torch.no_grad():
        logits, attention = classifier(x)
    tiled_logits, tiled_attention = streamed_classifier(classifier, x, tile_z, x.device, contextlib.nullcontext)
    torch.testing.assert_close(tiled_logits, logits, **EXACT)
    torch.testing.assert_close(tiled_attention, attention, **EXACT)
