"""Every real recipe in `configs/` trains: stand-in inputs in the recipe's own layout and file names
(OpenAI-layout CLIP `.pt`, OpenAI's BPE `.txt.gz`, the released pairs CSV with crops, COCO-Stuff
folders, an ImageNet Swin `.pth`, a detectron2 `.pkl`), the model shrunk by `--config.` overrides
only, 2 steps through `python -m ovseg_jax.train`. A field a recipe forgets fails here."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ovseg_jax.configs import ConfigError
from ovseg_jax.text import Tokenizer, bytes_to_unicode, write_word_vocab
from ovseg_jax.training.checkpoint import Checkpointer, load_config, load_params

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["vitl_ft", "vitl_mpt", "vitb_ft", "vitb_mpt", "swinb_vitl_seg", "r101c_vitb_seg"]

# A CLIP whose OpenAI-layout file infers back to exactly these fields (heads = width / 64, MLP 4x);
# context 77, vocabulary 49,408 and EOT 49,407 stay the recipes' own.
TINY_CLIP = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=1,
                 vision_mlp_dim=256, text_width=64, text_layers=1, text_heads=1, text_mlp_dim=256)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
TINY_RESNET = dict(num_blocks=(1, 1, 1, 3), stem_out_channels=16, res2_out_channels=32, width_per_group=8)
TINY_HEAD = dict(num_queries=4, hidden_dim=32, conv_dim=32, mask_dim=32, dec_layers=1, nheads=2, dim_feedforward=32,
                 class_hidden_dim=32, clip_dim=TINY_CLIP["embed_dim"])
RUN = dict(total_steps=2, batch_size=2, log_every=1)


def _overrides(prefix: str, fields: dict) -> list[str]:
    return [f"--config.{prefix}{k}={tuple(v) if isinstance(v, tuple) else v}" for k, v in fields.items()]


OVERRIDES = {
    "clip": _overrides("model.clip.", TINY_CLIP) + _overrides("", RUN) + ["--config.data.num_workers=0"],
    "swin": _overrides("model.segmenter.backbone_config.", TINY_SWIN),
    "resnet": _overrides("model.segmenter.backbone_config.", TINY_RESNET),
    "segmenter": _overrides("model.segmenter.", TINY_HEAD) + _overrides("", RUN) + _overrides(
        "data.", dict(crop_size=64, scales=(64,), max_size=128, max_masks=4, num_workers=0)),
}


def write_openai_bpe(path: Path) -> Path:
    """A gzip BPE file in OpenAI's format with its real line count (header + 48,894 merges; 49,408
    tokens), made of two-symbol end-of-word merges whose parts are all base tokens."""
    symbols = list(bytes_to_unicode().values())
    merges = [f"{a} {b}</w>" for a in symbols for b in symbols][:49152 - 256 - 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2 - stand-in\n" + "\n".join(merges) + "\n")
    return path


def write_openai_clip(path: Path) -> None:
    """A random tiny CLIP saved as a plain OpenAI-layout state dict (`visual.conv1.weight`, ...)."""
    import torch

    from ovseg_jax.clip import openai_state_dict
    from ovseg_jax.models.clip import CLIP, ClipConfig

    state = openai_state_dict(CLIP(ClipConfig(**TINY_CLIP), rngs=nnx.Rngs(0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


def write_pairs(csv: Path, n: int = 4) -> None:
    """The released layout: `filepath<TAB>title` rows, crops with the grey fill outside the region."""
    rng = np.random.default_rng(0)
    (csv.parent / "crops").mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(n):
        crop = np.full((40, 48, 3), (124, 116, 103), np.uint8)
        crop[5:30, 8:40] = rng.integers(0, 255, 3)
        Image.fromarray(crop).save(csv.parent / "crops" / f"{i}.png")
        rows.append(f"crops/{i}.png\t{['dog', 'sky', 'grass', 'a red car'][i % 4]}")
    csv.write_text("\n".join(rows) + "\n")


def write_coco_stuff(root: Path, n: int = 3) -> None:
    """`coco/train2017/*.jpg` + `coco/stuffthingmaps_detectron2/train2017/*.png` (ids 0-170, 255 ignore)."""
    rng = np.random.default_rng(1)
    images, labels = root / "coco/train2017", root / "coco/stuffthingmaps_detectron2/train2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        label = np.full((72, 96), 255, np.uint8)
        label[:40] = 5 + i
        label[40:, :50] = 120
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(images / f"{i:012d}.jpg")
        Image.fromarray(label).save(labels / f"{i:012d}.png")


def write_imagenet_swin(path: Path) -> None:
    """microsoft/Swin-Transformer's classification layout: `{"model": ...}` with the head, the final
    norm and buffers, without the detection stage norms."""
    import torch

    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.models.swin import SwinConfig, SwinTransformer

    state = {k: v for k, v in nnx_to_torch(SwinTransformer(SwinConfig(**TINY_SWIN), rngs=nnx.Rngs(1))).items()
             if not k.startswith(("norm0.", "norm1.", "norm2.", "norm3."))}
    width = TINY_SWIN["embed_dim"] * 8
    state.update({"head.weight": np.zeros((10, width), np.float32), "head.bias": np.zeros(10, np.float32),
                  "norm.weight": np.ones(width, np.float32), "norm.bias": np.zeros(width, np.float32),
                  "layers.0.blocks.0.attn.relative_position_index": np.zeros((16, 16), np.int64)})
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)


def write_detectron2_resnet(path: Path) -> None:
    """detectron2's R-103.pkl layout: numpy arrays under "model" (frozen BN statistics included)."""
    from ovseg_jax.convert.params import nnx_to_torch
    from ovseg_jax.models.resnet import ResNet, ResNetConfig

    state = nnx_to_torch(ResNet(ResNetConfig.r101c(**TINY_RESNET), rngs=nnx.Rngs(2)))
    with open(path, "wb") as f:
        pickle.dump({"model": {k: np.asarray(v) for k, v in state.items()}, "__author__": "stand-in",
                     "matching_heuristics": True}, f)


def write_inputs(cwd: Path) -> None:
    """Every input the recipes name, under the working directory their relative paths resolve in."""
    write_openai_bpe(cwd / "weights/bpe_simple_vocab_16e6.txt.gz")
    write_openai_clip(cwd / "weights/ViT-L-14.pt")
    (cwd / "weights/ViT-B-16.pt").write_bytes((cwd / "weights/ViT-L-14.pt").read_bytes())
    write_pairs(cwd / "data/coco_proposal_1cap/coco_proposal_1cap.csv")
    write_coco_stuff(cwd / "datasets")
    write_imagenet_swin(cwd / "weights/swin_base_patch4_window12_384_22k.pth")
    write_detectron2_resnet(cwd / "weights/R-103.pkl")


@pytest.fixture(scope="module")
def env(compilation_cache) -> dict:
    """The environment of the module's subprocesses: CPU, this checkout, and the session's JAX
    compilation cache (every program, however quick to compile; tests/conftest.py), so that what
    one process compiled (the tiny models' initialisers, the class-name text bank, a step another
    recipe shares) the others load."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "JAX_COMPILATION_CACHE_DIR": str(compilation_cache)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, env) -> Path:
    """The working directory with every input (`write_inputs`), written by a subprocess that fills
    the compilation cache with the tiny CLIP's, Swin's and ResNet's initialisers the runs use too."""
    cwd = tmp_path_factory.mktemp("recipes")
    proc = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tests.test_recipes "
                           "import write_inputs; write_inputs(Path(sys.argv[1]))", str(cwd)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd


# The recipes' runs, longest first; a mask prompt tuning run starts from its fine-tuning run's workdir.
CHAINS = [("swinb_vitl_seg",), ("r101c_vitb_seg",), ("vitl_ft", "vitl_mpt"), ("vitb_ft", "vitb_mpt")]
TRAINS = "test_recipe_trains_two_steps_on_its_real_input_layout"


def train(name: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`python -m ovseg_jax.train --config configs/NAME.py --workdir runs/NAME` + the tiny overrides,
    compiling into the cache of `env` (the command's default is the user's cache)."""
    kind = "clip" if name.startswith("vit") else "segmenter"
    extra = OVERRIDES[kind] + (OVERRIDES["swin" if "swin" in name else "resnet"] if kind == "segmenter" else [])
    return subprocess.run(
        [sys.executable, "-m", "ovseg_jax.train", f"--config={ROOT / 'configs' / name}.py",
         f"--workdir=runs/{name}", f"--compile_cache={env['JAX_COMPILATION_CACHE_DIR']}", *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(inputs, env, request):
    """{recipe: future of {name: CompletedProcess} of its chain}: the selected recipes' runs (with the
    fine-tuning runs their mask prompt tuning runs start from), as many at once as there are CPU
    cores, since a run compiles on about one core."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == TRAINS}
    chains = [chain for chain in CHAINS if selected & set(chain)]
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(chains), os.cpu_count() or 1)))
    futures = {}
    for chain in chains:
        future = pool.submit(lambda chain: {name: train(name, inputs, env) for name in chain}, chain)
        futures.update(dict.fromkeys(chain, future))
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_on_its_real_input_layout(inputs, runs, name):
    proc = runs[name].result()[name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training done" in proc.stderr
    workdir = inputs / "runs" / name
    assert Checkpointer(workdir / "checkpoints").latest_step() == 2
    params = load_params(workdir)
    assert all(np.isfinite(v).all() for v in params.values())
    saved, recipe = load_config(workdir), _recipe(name).get_config()
    # The recipe's own solver and data reached the run; only the overridden sizes differ.
    assert saved["optim"]["lr"] == recipe.optim.lr and saved["optim"]["schedule"] == recipe.optim.schedule.to_dict()
    assert saved["init_from"] == recipe.init_from and saved["total_steps"] == 2
    if name.endswith("_mpt"):  # started from the fine-tuning run; only the prompts trained
        before = load_params(inputs / "runs" / name.replace("_mpt", "_ft"))
        assert sorted(params) == sorted([*before, "visual/mask_embedding"])
        for path, value in before.items():
            np.testing.assert_array_equal(params[path], value, err_msg=path)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_rejects_an_unknown_variant(name):
    module = _recipe(name)
    module.get_config("")  # no variant is fine
    with pytest.raises(ConfigError, match=rf"configs/{name}.py: unknown variant 'B/32'; valid variants: "):
        module.get_config("B/32")


def test_clip_recipe_names_every_missing_input_at_once(tmp_path, monkeypatch):
    from ovseg_jax.training.trainer import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        run(_recipe("vitl_ft").get_config(), tmp_path / "run")
    message = str(e.value)
    for expected in ["config.init_from='weights/ViT-L-14.pt'", "coco_proposal_1cap.csv",
                     "config.data.tokenizer='weights/bpe_simple_vocab_16e6.txt.gz'",
                     "pip download --no-deps open_clip_torch"]:
        assert expected in message, message
    assert not (tmp_path / "run").exists()


def test_openai_bpe_stand_in_has_the_real_vocabulary_size(tmp_path):
    tok = Tokenizer.load(write_openai_bpe(tmp_path / "bpe.txt.gz"), context_length=77)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)


def test_full_width_text_tokenises_as_ascii_like_openai(tmp_path):
    """OpenAI's basic_clean runs ftfy.fix_text, which folds full-width letters (NFKC)."""
    tok = Tokenizer.load(write_word_vocab(["red circle"], tmp_path), context_length=8)
    np.testing.assert_array_equal(tok("ｒｅｄ　ｃｉｒｃｌｅ"), tok("red circle"))
