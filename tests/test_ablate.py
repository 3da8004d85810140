"""The appendix's CLIP adaptation variants (`ovseg_jax.ablate`) and deep visual prompt tuning (VPT)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import ovseg_jax.clip as oclip
from ovseg_jax import ablate, configs
from ovseg_jax.experiments import ablation, demo
from ovseg_jax.models.clip import CLIP
from ovseg_jax.training import optim
from ovseg_jax.training.trainer import Trainer
from tests.torch_clip_reference import OpenAIClip
from tests.train_helpers import TINY_CLIP, PairBatches, tiny_config

TOL = 1e-4
PROMPTS, VPT = "visual/mask_embedding", "visual/vpt_embedding"


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------ VPT-deep model

def torch_vpt_features(ref: OpenAIClip, images: np.ndarray, prompts: np.ndarray, masks=None) -> np.ndarray:
    """Deep VPT written from Jia et al. 2022 on the torch reference CLIP: `prompts [K, T, W]` sit
    after the class token at the input of block i < K (inserted at block 0, replaced after), then
    the class token is pooled. Mask prompts (reference 1.9) act on the patch tokens behind them."""
    vis = ref.visual
    k, t = prompts.shape[:2]
    p = torch.from_numpy(prompts)
    with torch.no_grad():
        x = vis.conv1(torch.from_numpy(images).permute(0, 3, 1, 2))
        x = x.flatten(2).permute(0, 2, 1)  # [N, P, W]
        n = x.shape[0]
        if masks is not None:
            m = torch.ceil(F.avg_pool2d(torch.from_numpy(masks)[:, None], vis.patch).flatten(1)).unsqueeze(-1)
            x = x * m + vis.mask_embedding[0] * (1 - m)
        x = torch.cat([vis.class_embedding.expand(n, 1, -1), x], dim=1) + vis.positional_embedding
        x = vis.ln_pre(x)
        for i, block in enumerate(vis.transformer.resblocks):
            if i < k:
                x = torch.cat([x[:, :1], p[i].expand(n, -1, -1), x[:, 1 + (t if i else 0):]], dim=1)
            x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
            if masks is not None and i + 1 < vis.mask_depth:
                x = torch.cat([x[:, :1 + t], x[:, 1 + t:] * m + vis.mask_embedding[i + 1] * (1 - m)], dim=1)
        return unit((vis.ln_post(x[:, 0]) @ vis.proj).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("depth,tokens,mask_depth", [(0, 0, 0), (1, 4, 0), (3, 5, 0), (2, 3, 2)])
def test_vpt_forward_matches_an_independent_torch_vpt(tmp_path, depth, tokens, mask_depth):
    torch.manual_seed(depth + tokens)
    ref = OpenAIClip(vision_layers=3, mask_depth=mask_depth).eval()
    state = dict(ref.state_dict())
    prompts = np.random.RandomState(1).randn(depth, tokens, 64).astype(np.float32)
    if depth:
        state["visual.vpt_embedding"] = torch.from_numpy(prompts)
    torch.save(state, tmp_path / "vpt.pt")
    clip = oclip.load(tmp_path / "vpt.pt")  # the architecture is read off the keys
    assert (clip.config.vpt_tokens, clip.config.vpt_depth) == (tokens, depth)
    images = np.random.RandomState(2).randn(3, 32, 32, 3).astype(np.float32)
    masks = None
    if mask_depth:
        masks = np.zeros((3, 32, 32), np.float32)
        masks[0], masks[1, :12, 4:20] = 1, 1
    ours = np.asarray(clip.encode_image(images, masks))
    np.testing.assert_allclose(ours, torch_vpt_features(ref, images, prompts, masks), atol=TOL)
    plain = torch_vpt_features(ref, images, prompts[:0, :0], masks)  # today's forward, no VPT
    if depth:
        assert np.abs(ours - plain).max() > 1e-2  # the prompts change every image's features
    else:
        assert "vpt_embedding" not in nnx.state(clip.model.visual, nnx.Param)
        np.testing.assert_allclose(ours, plain, atol=TOL)


@pytest.mark.parametrize("fmt,name", [("openai", "vpt.safetensors"), ("hf", "vpt_hf")])
def test_vpt_checkpoint_export_import_round_trip(tmp_path, fmt, name):
    model = CLIP(TINY_CLIP.replace(vpt_tokens=3, vpt_depth=2), rngs=nnx.Rngs(0))
    path = oclip.export(oclip.Clip(model, None), tmp_path / name, format=fmt)
    back = oclip.load(path)
    assert back.config == model.config
    np.testing.assert_array_equal(np.asarray(back.model.visual.vpt_embedding[...]),
                                  np.asarray(model.visual.vpt_embedding[...]))
    images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(back.encode_image(images)), np.asarray(oclip.Clip(model).encode_image(images)),
                               atol=1e-6)


def test_vpt_init_is_uniform_in_the_vpt_bound_and_config_is_checked():
    cfg = TINY_CLIP.replace(vpt_tokens=50, vpt_depth=2)
    emb = np.asarray(CLIP(cfg, rngs=nnx.Rngs(0)).visual.vpt_embedding[...])
    bound = np.sqrt(6 / (3 * cfg.patch_size**2 + cfg.vision_width))
    assert emb.shape == (2, 50, 32) and np.abs(emb).max() <= bound
    assert abs(emb.std() - bound / np.sqrt(3)) < 0.1 * bound  # uniform(-b, b) has std b / sqrt(3)
    for bad in (dict(vpt_tokens=4, vpt_depth=0), dict(vpt_tokens=0, vpt_depth=1), dict(vpt_tokens=2, vpt_depth=3)):
        with pytest.raises(ValueError, match="vpt_"):
            TINY_CLIP.replace(**bad).validate()


# ------------------------------------------------------------------------ plans and recipes

def test_every_plan_of_the_synthetic_config_validates_and_chains_its_stages():
    for plan in ablation.PLAN_NAMES:
        c = demo.load_config("quick," + plan)
        configs.validate(c)
        assert c.stages[:2] == ["pretrain", "segmenter"]
        for i, name in enumerate(c.stages[2:], start=2):  # each stage starts from an earlier one
            assert c[name].init_from.removeprefix("{workdir}/") in c.stages[:i], (plan, name)
        depths = [c[n].model.clip.mask_prompt_depth for n in c.stages[2:]]
        assert all(d <= c.pretrain.model.clip.vision_layers for d in depths)
    layers = demo.load_config("quick").clip_mpt.model.clip.vision_layers
    assert layers == 3
    # Depths above the tower's layers run as its depth, in one shared stage.
    stages = ablation.plans(demo.load_config("quick"))
    assert stages["mpt_d6"] == stages["mpt_d12"] == stages["mpt_d3"]
    assert stages["ft_mpt_d12"][1].depth == 3
    for table in ablation.TABLES.values():
        assert all(p in ablation.PLAN_NAMES for row in table.rows for p in row.plans)
        assert all(len(row.plans) == len(table.columns) and len(row.paper) in (0, len(table.paper_columns))
                   for row in table.rows)


def _recipe(name: str, variant: str = ""):
    return ablation.sibling_config(__file__, f"../configs/{name}.py", variant)


def test_real_recipe_variants_keep_defaults_and_set_the_appendix_settings():
    for name in ("vitl_ft", "vitl_mpt", "vitb_ft", "vitb_mpt"):
        c = _recipe(name)
        assert c.model.clip.vpt_tokens == 0 and not c.optim.lr_mults
        assert c.model.clip.mask_prompt_depth == (3 if name.endswith("mpt") else 0)
    vpt = _recipe("vitl_mpt", "no_ft,vpt")
    assert (vpt.model.clip.vpt_tokens, vpt.model.clip.vpt_depth, vpt.model.clip.mask_prompt_depth) == (50, 6, 0)
    assert vpt.init_from == "weights/ViT-L-14.pt" and vpt.optim.trainable == (r"^visual/vpt_embedding$",)
    assert _recipe("vitb_mpt", "vpt").model.clip.vpt_tokens == 38  # 50 per 256 patches, ViT-B/16 has 196
    assert _recipe("vitl_mpt", "depth12").model.clip.mask_prompt_depth == 12
    after = _recipe("vitl_ft", "after_mpt")
    assert after.init_from == "runs/vitl_mpt_no_ft" and after.optim.freeze[-1] == r"^visual/mask_embedding$"
    joint = _recipe("vitb_ft", "joint")
    assert joint.optim.lr_mults[0] == (r"^visual/mask_embedding$", pytest.approx(0.05 / 5e-6))
    for name, variant in (("vitl_ft", "after_mpt,joint"), ("vitl_mpt", "depth1,vpt"), ("vitb_mpt", "depth2")):
        with pytest.raises(configs.ConfigError, match=name):
            _recipe(name, variant)


# ----------------------------------------------------------- first steps of each stage (tiny)

FT_LR, MPT_LR, WARMUP = 1e-3, 0.05, 2


@pytest.fixture(scope="module")
def one_step():
    """Every distinct stage of every plan, built from tiny FT / MPT recipes, after one step from a
    random init: {stage name: (stage, trainer, params before, params after)}."""
    base = ml_collections.ConfigDict({"clip_ft": tiny_config("ft", lr=FT_LR), "clip_mpt": tiny_config("mpt", lr=MPT_LR)})
    # (Table 5's stages are FT on other pairs files: the same stage here.)
    stages = {s.name: s for plan in ablation.plans(base).values() for s in plan if not s.pairs}
    out = {}
    for name, stage in stages.items():
        trainer = Trainer(ablation.stage_config(base, stage, ""))
        before = {k: np.asarray(v) for k, v in trainer.state["params"].items()}
        trainer.fit(PairBatches(8), num_steps=1)
        out[name] = (stage, trainer, before, {k: np.asarray(v) for k, v in trainer.state["params"].items()})
    return out


def _changed(before, after):
    return {p for p in before if not np.array_equal(before[p], after[p])}


@pytest.mark.slow  # one training step of every distinct stage (one_step)
def test_each_stage_of_each_plan_runs_and_changes_what_it_trains(one_step):
    kinds = {stage.kind for stage, *_ in one_step.values()}
    assert kinds == {"ft", "mpt", "ft_prompts", "joint", "vpt"}
    for name, (stage, trainer, before, after) in one_step.items():
        visual = {p for p in before if p.startswith("visual/")}
        want = {
            "ft": visual | {"logit_scale"},
            "mpt": {PROMPTS},
            "ft_prompts": (visual - {PROMPTS}) | {"logit_scale"},  # MPT -> FT: prompts kept, frozen
            "joint": visual | {"logit_scale"},  # prompts and the whole image tower at once
            "vpt": {VPT},
        }[stage.kind]
        assert set(trainer.trainable) == want, name
        assert _changed(before, after) == want, name
        assert (PROMPTS in before) == (stage.kind in ("mpt", "ft_prompts", "joint")), name
        assert (VPT in before) == (stage.kind == "vpt"), name


@pytest.mark.slow  # one training step of every distinct stage (one_step)
def test_joint_tuning_gives_the_prompts_mpt_lr_and_no_decay_and_the_tower_ft_lr(one_step):
    (_, trainer, before, after), = [v for v in one_step.values() if v[0].kind == "joint"]
    groups = optim.param_groups(before, trainer.config.optim)
    assert groups[PROMPTS] == (pytest.approx(MPT_LR / FT_LR), 0.0)
    assert groups["visual/conv1/kernel"] == (1.0, 1.0) and groups["visual/ln_pre/bias"] == (1.0, 0.0)
    # Adam's first step moves each entry by lr * g / (|g| + eps) ~ lr (warmup: lr / WARMUP) without decay.
    for path, lr in ((PROMPTS, MPT_LR), ("visual/ln_pre/bias", FT_LR)):
        step = np.abs(after[path] - before[path]).max()
        np.testing.assert_allclose(step, lr / WARMUP, rtol=1e-3, err_msg=path)


def test_table_5_plans_differ_only_in_the_pairs_file():
    c = demo.load_config("quick")
    stages = ablation.plans(c)
    built = {p: ablation.stage_config(c, stages[p][-1], "{workdir}/pretrain").to_dict()
             for row in ablation.TABLES[5].rows for p in row.plans}
    paths = {p: b["data"].pop("path") for p, b in built.items()}
    assert built["ft"] == built["ft_cap"] == built["ft_both"]
    root = c.clip_ft.data.root
    assert paths == {"ft": f"{root}/pairs.jsonl", "ft_cap": f"{root}/mined/pairs.jsonl",
                     "ft_both": f"{root}/mined_both/pairs.jsonl"}
    assert {s.pairs for p in paths for s in stages[p] if s.pairs} == set(ablation.MINED)


def test_cli_refuses_unknown_tables_and_a_folder_that_is_no_demo_output():
    with pytest.raises(SystemExit):
        ablate.main(["--table", "6"])
    with pytest.raises(FileNotFoundError, match="demo output directory"):
        ablation.check_demo_dir(Path("/nonexistent/demo"))
