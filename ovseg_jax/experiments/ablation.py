"""The appendix's CLIP adaptation variants (Tables 2-5) on the synthetic world (`python -m ovseg_jax.ablate`).

    python -m ovseg_jax.ablate --table 2 --from outputs/demo --out outputs/ablate   # FT/MPT order
    python -m ovseg_jax.ablate --table 3 --from outputs/demo --out outputs/ablate   # prompt depth
    python -m ovseg_jax.ablate --table 4 --from outputs/demo --out outputs/ablate   # MPT vs deep VPT
    python -m ovseg_jax.ablate --table 5 --from outputs/demo --out outputs/ablate   # pair source

Each variant trains its CLIP stages (`configs/synthetic.py`'s clip_ft / clip_mpt recipes, changed
as below) from the pretrained CLIP, and is evaluated as the demo evaluates (the ensemble of
reference 1.7 with the demo's segmenter, mIoU over seen / unseen classes on the val split).
`--from` reuses a demo output directory's world, pretrained CLIP and segmenter; without it they
are trained into `--out` by the demo's stage code. Stages are trained once per `--out` (a stage's
workdir is named after what it trains, e.g. `train/ft_mpt3`), so the tables share them.

The variants are config functions of the two base stage configs, used here, by
`configs/synthetic.py:<plan>` and by the real recipes' variants (`configs/vit*_ft.py`,
`configs/vit*_mpt.py`):
- `prompt_tuning(mpt, depth)`: mask prompt depth, capped at the image tower's layers (the tiny
  CLIP has 3, so the paper's depths 6 and 12 run as 3).
- `finetune_keeping_prompts(ft, depth)`: MPT -> FT's second stage: FT of a CLIP with mask prompts
  (forward with region masks), the prompts frozen ("FT with fixed mask prompts", appendix E).
- `joint_tuning(ft, mpt)`: FT + MPT at once: FT's run with the prompts training alongside at
  MPT's lr and weight decay (per-parameter multipliers of the optimiser tables).
- `visual_prompt_tuning(mpt, tokens, depth)`: deep VPT in place of MPT, same optimiser and steps.

Table 5 (pair source, FT only) is one more list of rows whose plans differ only in `Stage.pairs`
(the FT stage's pairs file): the world's ground-truth pairs of the seen classes (the paper's
COCO-Stuff pairs), pairs mined from the captions (`ovseg_jax.mine_pairs` with
`configs/mine_synthetic.py`: the segmenter's proposals labelled by the pretrained CLIP with the
caption's nouns), and both. Missing mined pairs are mined first, into `world/mined` and
`world/mined_both` of the world in use.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import ml_collections


log = logging.getLogger("ovseg_jax.ablate")

PROMPTS = r"^visual/mask_embedding$"
VISUAL_PROMPTS = r"^visual/vpt_embedding$"
# The appendix's VPT on ViT-L/14 (16 x 16 patches, 24 layers): 50 tokens at the first 6 layers.
VPT_TOKENS, VPT_DEPTH, VPT_PATCHES = 50, 6, 256


# ----------------------------------------------------------------------------- config variants

def _with_clip(stage: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """A copy of a CLIP stage config with `model.clip` fields changed."""
    c = copy.deepcopy(stage)
    with c.unlocked():
        for key, value in changes.items():
            c.model.clip[key] = value
    return c


def _layers(stage) -> int:
    return stage.model.clip.vision_layers


def prompt_tuning(mpt: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
    """Mask prompt tuning (`mpt`'s recipe) with prompts at `depth` layers, capped at the tower's layers."""
    return _with_clip(mpt, mask_prompt_depth=min(depth, _layers(mpt)))


def finetune_keeping_prompts(ft: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
    """MPT -> FT, second stage: `ft`'s recipe on a CLIP with mask prompts of `depth` (capped), which
    it uses (region masks in the forward) but does not train."""
    c = _with_clip(ft, mask_prompt_depth=min(depth, _layers(ft)))
    c.optim.freeze = tuple(ft.optim.freeze) + (PROMPTS,)
    return c


def joint_tuning(ft: ml_collections.ConfigDict, mpt: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """FT + MPT simultaneously: `ft`'s run (length, schedule, visual lr and weight decay, frozen text
    tower) with `mpt`'s prompts training too, at `mpt.optim.lr` (lr multiplier mpt.lr / ft.lr) and
    `mpt`'s weight decay (decay multiplier mpt.wd / ft.wd)."""
    fo, mo = ft.optim, mpt.optim
    if mo.weight_decay and not fo.weight_decay:
        raise ValueError(f"joint_tuning: the prompts' weight decay {mo.weight_decay} cannot be a multiple of "
                         "FT's weight decay 0")
    c = _with_clip(ft, mask_prompt_depth=mpt.model.clip.mask_prompt_depth,
                   mask_prompt_shared=mpt.model.clip.mask_prompt_shared)
    c.optim.lr_mults = ((PROMPTS, mo.lr / fo.lr),) + tuple(fo.lr_mults)
    c.optim.wd_mults = ((PROMPTS, mo.weight_decay / fo.weight_decay if fo.weight_decay else 0.0),) + tuple(fo.wd_mults)
    return c


def vpt_size(clip: ml_collections.ConfigDict) -> tuple[int, int]:
    """(tokens, depth) of the appendix's VPT for another image tower: tokens in proportion to its
    patch count, depth capped at its layers (ViT-B/16: 38 tokens, depth 6; the tiny synthetic CLIP,
    64 patches and 3 layers: 12 tokens, depth 3)."""
    patches = (clip.image_size // clip.patch_size) ** 2
    return max(1, round(VPT_TOKENS * patches / VPT_PATCHES)), min(VPT_DEPTH, clip.vision_layers)


def visual_prompt_tuning(mpt: ml_collections.ConfigDict, tokens: int | None = None,
                         depth: int | None = None) -> ml_collections.ConfigDict:
    """Deep VPT in place of mask prompt tuning: `mpt`'s optimiser, data and steps; `tokens` learned
    tokens at the first `depth` layers (default `vpt_size`), no mask prompts; only they train."""
    size = vpt_size(mpt.model.clip)
    c = _with_clip(mpt, mask_prompt_depth=0, mask_prompt_shared=False, vpt_tokens=tokens or size[0],
                   vpt_depth=min(depth or size[1], _layers(mpt)))
    c.optim.trainable = (VISUAL_PROMPTS,)
    return c


def parse_variant(arg: str | None, valid: tuple[str, ...], *, config: str) -> set[str]:
    """A recipe's `get_config` argument: comma-separated options from `valid` -> the set of them."""
    from ovseg_jax import configs  # noqa: PLC0415

    options = {configs.check_variant(part, valid, config=config) for part in (arg or "").split(",")} - {""}
    prompts = [o for o in options if o.startswith("depth") or o == "vpt"]
    orders = [o for o in options if o in ("after_mpt", "joint")]
    if len(prompts) > 1 or len(orders) > 1:
        raise configs.ConfigError(f"{config}: variant {arg!r} combines {sorted(prompts if len(prompts) > 1 else orders)}; "
                                  "choose one prompt depth or vpt, and one of after_mpt / joint")
    return options


def sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file `name` (a path relative to `config_file`'s folder): a
    recipe's partner stage."""
    import importlib.util  # noqa: PLC0415

    path = Path(config_file).parent / name
    spec = importlib.util.spec_from_file_location(f"ovseg_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def mpt_recipe_variant(mpt: ml_collections.ConfigDict, options: set[str], *,
                       pretrained: str) -> ml_collections.ConfigDict:
    """The real MPT recipes' variants: `depthN` (Table 3), `no_ft` (start from the `pretrained`
    CLIP instead of the FT run: Table 3's "w/o FT", MPT -> FT's first stage), `vpt` (Table 4)."""
    c = mpt
    for option in options:
        if option.startswith("depth"):
            c = prompt_tuning(c, int(option[len("depth"):]))
    if "vpt" in options:
        c = visual_prompt_tuning(c)
    if "no_ft" in options:
        c.init_from = pretrained
    return c


def ft_recipe_variant(ft: ml_collections.ConfigDict, mpt: ml_collections.ConfigDict, options: set[str], *,
                      mpt_workdir: str) -> ml_collections.ConfigDict:
    """The real FT recipes' variants: `after_mpt` (MPT -> FT's second stage, from `mpt_workdir`, a run
    of the MPT recipe's `no_ft` variant) and `joint` (FT + MPT simultaneously, from the same
    pretrained CLIP as FT)."""
    if "after_mpt" in options:
        ft = finetune_keeping_prompts(ft, mpt.model.clip.mask_prompt_depth)
        ft.init_from = mpt_workdir
    if "joint" in options:
        ft = joint_tuning(ft, mpt)
    return ft


# --------------------------------------------------------------------------------- plans

@dataclasses.dataclass(frozen=True)
class Stage:
    """One CLIP stage of a plan. `name` is its workdir under `train/` (shared by every plan that
    trains it); it starts from `init` ("pretrain" or an earlier stage's name). `kind`: "ft", "mpt",
    "ft_prompts" (FT keeping frozen prompts), "joint" or "vpt"; `depth` the mask prompt depth;
    `pairs` the pairs file under the world root ("" = the config's; Table 5)."""

    name: str
    init: str
    kind: str
    depth: int = 0
    pairs: str = ""


# Mined pairs files (under the world root) -> the mining run's `sources` (ovseg_jax.mine_pairs).
MINED = {"mined/pairs.jsonl": "captions", "mined_both/pairs.jsonl": "both"}
PAPER_DEPTHS = (1, 3, 6, 12)
DEPTHS = (1, 2, 3, 6, 12)  # the paper's, and the synthetic config's default 2
PLAN_NAMES = (("baseline", "ft", "ft_mpt", "mpt_ft", "joint", "vpt", "ft_cap", "ft_both")
              + tuple(f"mpt_d{d}" for d in DEPTHS) + tuple(f"ft_mpt_d{d}" for d in DEPTHS))


def plans(config: ml_collections.ConfigDict) -> dict[str, tuple[Stage, ...]]:
    """The named CLIP-stage plans of a synthetic stages config (its clip_mpt's depth is the default
    depth; depths are capped at the image tower's layers, and stage names use the capped depth, so
    capped depths share one run). "baseline" has no stage: the pretrained CLIP itself."""
    layers = _layers(config.clip_mpt)
    cap = lambda d: min(d, layers)  # noqa: E731
    default = config.clip_mpt.model.clip.mask_prompt_depth
    ft = Stage("ft", "pretrain", "ft")

    def mpt(depth: int, init: str = "pretrain") -> Stage:
        return Stage(f"{'ft_' if init == 'ft' else ''}mpt{cap(depth)}", init, "mpt", cap(depth))

    tokens, vdepth = vpt_size(config.clip_mpt.model.clip)
    out = {"baseline": (), "ft": (ft,), "ft_mpt": (ft, mpt(default, "ft")),
           "mpt_ft": (mpt(default), Stage(f"mpt{cap(default)}_ft", f"mpt{cap(default)}", "ft_prompts", cap(default))),
           "joint": (Stage(f"joint{cap(default)}", "pretrain", "joint", cap(default)),),
           "vpt": (Stage(f"vpt{tokens}x{vdepth}", "pretrain", "vpt"),),
           "ft_cap": (Stage("ft_cap", "pretrain", "ft", pairs="mined/pairs.jsonl"),),
           "ft_both": (Stage("ft_both", "pretrain", "ft", pairs="mined_both/pairs.jsonl"),)}
    for d in DEPTHS:
        out[f"mpt_d{d}"] = (mpt(d),)
        out[f"ft_mpt_d{d}"] = (ft, mpt(d, "ft"))
    return out


def stage_config(config: ml_collections.ConfigDict, stage: Stage, init_from: str) -> ml_collections.ConfigDict:
    """The trainer config of `stage`, built from `config`'s clip_ft / clip_mpt recipes."""
    ft, mpt = config.clip_ft, config.clip_mpt
    if stage.kind == "ft":
        c = copy.deepcopy(ft)
    elif stage.kind == "mpt":
        c = prompt_tuning(mpt, stage.depth)
    elif stage.kind == "ft_prompts":
        c = finetune_keeping_prompts(ft, stage.depth)
    elif stage.kind == "joint":
        c = joint_tuning(ft, prompt_tuning(mpt, stage.depth))
    elif stage.kind == "vpt":
        c = visual_prompt_tuning(mpt)
    else:
        raise ValueError(f"stage {stage.name}: unknown kind {stage.kind!r}")
    c.init_from = init_from
    if stage.pairs:
        if not c.data.get("root"):
            raise ValueError(f"stage {stage.name}: its pairs file {stage.pairs!r} is relative to config.data.root, "
                             "which the FT recipe does not set")
        c.data.path = f"{c.data.root}/{stage.pairs}"
    return c


def with_plan(config: ml_collections.ConfigDict, plan: str) -> ml_collections.ConfigDict:
    """`config` (synthetic, with stages pretrain, segmenter, clip_ft, clip_mpt) with its CLIP stages
    replaced by those of `plan` (init paths "{workdir}/<stage>", as the trainer substitutes)."""
    if plan not in PLAN_NAMES:
        raise ValueError(f"unknown adaptation plan {plan!r}; expected one of {PLAN_NAMES}")
    stages = plans(config)[plan]
    c = ml_collections.ConfigDict({"stages": ["pretrain", "segmenter"], "pretrain": config.pretrain,
                                   "segmenter": config.segmenter, "eval": config.eval})
    for stage in stages:
        c.stages.append(stage.name)
        c[stage.name] = stage_config(config, stage, "{workdir}/" + stage.init)
    return c


# --------------------------------------------------------------------------------- tables

@dataclasses.dataclass(frozen=True)
class Row:
    """A table row: its label, one plan per column, the paper's numbers (A-150 unless stated)."""

    label: str
    plans: tuple[str, ...]
    paper: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    paper_columns: tuple[str, ...]
    rows: tuple[Row, ...]


TABLES = {
    2: Table("Table 2: order of full fine-tuning (FT) and mask prompt tuning (MPT)", ("",), ("A-847", "A-150"), (
        Row("FT -> MPT (default)", ("ft_mpt",), (9.0, 29.6)),
        Row("MPT -> FT (prompts frozen)", ("mpt_ft",), (8.5, 28.1)),
        Row("FT + MPT sim.", ("joint",), (8.8, 29.0)))),
    3: Table("Table 3: mask prompt depth", ("w/o FT", "w/ FT"), ("w/o FT", "w/ FT"), tuple(
        Row(f"{d}{' (paper default)' if d == 3 else ' (synthetic default)' if d == 2 else ''}",
            (f"mpt_d{d}", f"ft_mpt_d{d}"), paper)
        for d, paper in zip(DEPTHS, ((25.7, 29.3), (), (26.5, 29.6), (26.8, 29.4), (26.8, 29.3))))),
    4: Table("Table 4: prompt tuning methods, w/o FT (the paper's VPT: 50 tokens, depth 6)", ("",), ("A-150",), (
        Row("baseline (pretrained CLIP)", ("baseline",), (21.8,)),
        Row("MPT (depth 3)", ("mpt_d3",), (26.5,)),
        Row("VPT-deep", ("vpt",), (25.5,)))),
    5: Table("Table 5: source of the mask-category pairs (FT only)", ("",), ("A-150",), (
        Row("ground truth, seen classes (paper: COCO-Stuff)", ("ft",), (23.0,)),
        Row("mined from captions", ("ft_cap",), (28.8,)),
        Row("both", ("ft_both",), (26.7,)))),
}


def _row_label(row: Row, table: int, config: ml_collections.ConfigDict) -> str:
    """The row's label with what it ran as on `config`'s CLIP (capped depth, scaled VPT)."""
    layers = _layers(config.clip_mpt)
    if table == 3:
        depth = int(row.label.split()[0])
        return row.label + (f" (runs as {layers})" if depth > layers else "")
    if row.plans == ("vpt",):
        tokens, depth = vpt_size(config.clip_mpt.model.clip)
        return f"{row.label} ({tokens} tokens, depth {depth})"
    return row.label


def format_table(table: int, results: dict[str, dict], config: ml_collections.ConfigDict,
                 reference: dict[str, dict]) -> str:
    """The table as the paper lays it out: one row per setting, ensemble mIoU unseen / seen on the
    synthetic val split per column, the paper's real-data numbers (A-150 unless stated) beside."""
    t = TABLES[table]
    cells = [f"{(c + ' ') if c else ''}unseen   seen" for c in t.columns]
    header = f"{'':<48}" + " | ".join(f"{c:>20}" for c in cells) + " || paper " + ", ".join(t.paper_columns)
    lines = [f"{t.title}: ensemble mIoU on the synthetic val split (paper: real data, Swin-B + ViT-L/14)",
             header, "-" * len(header)]
    for row in t.rows:
        ours = " | ".join(f"{results[p]['mIoU_unseen']:>13.1f} {results[p]['mIoU_seen']:6.1f}" for p in row.plans)
        paper = ", ".join(f"{v:.1f}" for v in row.paper) or "-"
        lines.append(f"{_row_label(row, table, config):<48}{ours} || {paper}")
    for label, m in reference.items():
        lines.append(f"  ({label}: unseen {m['mIoU_unseen']:.1f}, seen {m['mIoU_seen']:.1f}, all {m['mIoU']:.1f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- running

def check_demo_dir(from_dir: Path) -> None:
    """`from_dir` must be a demo output directory with its world and trained pretrain + segmenter."""
    from ovseg_jax.training import checkpoint  # noqa: PLC0415

    missing = [str(from_dir / "train" / s) for s in ("pretrain", "segmenter")
               if not checkpoint.is_checkpoint_dir(from_dir / "train" / s)]
    if not (from_dir / "world" / "classes.json").is_file():
        missing.append(str(from_dir / "world"))
    if missing:
        raise FileNotFoundError(f"--from {from_dir}: expected a demo output directory (python -m ovseg_jax.demo "
                                f"--out {from_dir}) with world/ and trained train/pretrain, train/segmenter; "
                                f"missing {missing}")


def mine(demo_dir: Path, base: Path, pairs: str) -> Path:
    """Mine the pairs file `pairs` (a key of `MINED`) into the world of `demo_dir` with the segmenter
    and pretrained CLIP under `base` (`configs/mine_synthetic.py`; resumes, no-op when done)."""
    from ovseg_jax.mining import miner
    from ovseg_jax.experiments import demo  # noqa: PLC0415

    world = demo_dir / "world"
    c = sibling_config(str(demo.CONFIG_FILE), "mine_synthetic.py", str(demo_dir))
    c.model.segmenter, c.model.clip = str(base / "segmenter"), str(base / "pretrain")
    c.sources = MINED[pairs]
    if c.sources != "captions":
        c.gt.dataset, c.gt.root = "synthetic", str(world)
    workdir = world / Path(pairs).parent
    if not (workdir / "report.json").is_file():
        report = miner.run(miner.check_config(c), workdir)
        log.info("mined %s:\n%s", workdir, miner.format_report(report))
    return workdir / "pairs.jsonl"


def _train_base(config, out: Path, from_dir: Path | None) -> Path:
    """The directory holding the pretrained CLIP (`pretrain`) and the segmenter (`segmenter`):
    `from_dir`/train when given, else trained into `out`/train by the demo's stage code."""
    from ovseg_jax.experiments import demo  # noqa: PLC0415

    if from_dir is not None:
        return from_dir / "train"
    base = ml_collections.ConfigDict({"stages": ["pretrain", "segmenter"], "pretrain": config.pretrain,
                                      "segmenter": config.segmenter})
    demo.train_stages(base, out / "train")
    return out / "train"


class _Evaluations:
    """Evaluation results cached in `path` (JSON), keyed by segmenter, CLIP workdir and eval settings."""

    def __init__(self, path: Path):
        self.path = path
        self.cache = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.cache:
            self.cache[key] = compute()
            self.path.write_text(json.dumps(self.cache, indent=1))
        return self.cache[key]


def run(table: int, out: Path, from_dir: Path | None = None, quick: bool = False) -> dict:
    """Train and evaluate the variants of appendix table `table` -> the results (also written to
    `out`/table<N>.json)."""
    import ovseg_jax.clip  # noqa: PLC0415
    import ovseg_jax.segmenter  # noqa: PLC0415
    from ovseg_jax.experiments import demo  # noqa: PLC0415
    from ovseg_jax.utils.compilation import enable_cache  # noqa: PLC0415

    if table not in TABLES:
        raise ValueError(f"--table {table}: tables {sorted(TABLES)} are available")
    out = out.absolute()
    from_dir = from_dir.absolute() if from_dir is not None else None
    if from_dir is not None:
        check_demo_dir(from_dir)
    out.mkdir(parents=True, exist_ok=True)
    enable_cache(out / "jax_cache")
    config = demo.load_config("quick" if quick else None)
    demo._set_world(config, str((from_dir or out) / "world"))
    t0 = time.perf_counter()
    base = _train_base(config, out, from_dir)
    plan_stages = plans(config)
    t = TABLES[table]
    wanted = [p for row in t.rows for p in row.plans]
    stages = {s.name: s for p in wanted for s in plan_stages[p]}  # each stage once, in plan order
    for pairs in dict.fromkeys(s.pairs for s in stages.values() if s.pairs):
        mine(from_dir or out, base, pairs)
    work = out / "train"
    train_cfg = ml_collections.ConfigDict({"stages": list(stages)})
    for name, stage in stages.items():
        init = base / "pretrain" if stage.init == "pretrain" else work / stage.init
        train_cfg[name] = stage_config(config, stage, str(init))
    timings = demo.train_stages(train_cfg, work) if stages else {}
    train_seconds = time.perf_counter() - t0

    evaluations = _Evaluations(out / "evaluations.json")
    segmenter = None

    def evaluate(clip_dir: Path, ensemble: bool = True) -> dict:
        nonlocal segmenter
        key = json.dumps([str(base / "segmenter"), str(clip_dir), ensemble, config.eval.to_dict()], sort_keys=True)

        def compute():
            nonlocal segmenter
            segmenter = segmenter or ovseg_jax.segmenter.load(base / "segmenter")
            t1 = time.perf_counter()
            clip = ovseg_jax.clip.load(clip_dir)  # with the tokenizer the stage trained with
            m, _, _ = demo.evaluate_clip(segmenter, clip, config, ensemble=ensemble)
            log.info("%s: mIoU %.1f (seen %.1f, unseen %.1f)", clip_dir.name if ensemble else "segmenter alone",
                     m["mIoU"], m["mIoU_seen"], m["mIoU_unseen"])
            return {**m, "seconds": round(time.perf_counter() - t1, 1)}

        return evaluations.get(key, compute)

    clip_dir = {p: (work / plan_stages[p][-1].name if plan_stages[p] else base / "pretrain") for p in wanted}
    results = {p: {**evaluate(clip_dir[p]), "stages": [s.name for s in plan_stages[p]], "clip": str(clip_dir[p])}
               for p in wanted}
    reference = {"segmenter alone": evaluate(base / "pretrain", ensemble=False),
                 "+ pretrained CLIP": evaluate(base / "pretrain")}
    text = format_table(table, results, config, reference)
    result = {"table": table, "title": t.title, "quick": quick, "from": str(from_dir) if from_dir else None,
              "rows": [{"label": _row_label(r, table, config), "paper": dict(zip(t.paper_columns, r.paper)),
                        "ours": {c or "synthetic": results[p] for c, p in zip(t.columns, r.plans)}} for r in t.rows],
              "reference": reference, "stages": timings, "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.perf_counter() - t0, 1)}
    path = out / f"table{table}.json"
    path.write_text(json.dumps(result, indent=2))
    print("\n" + text + f"\n\nwrote {path}")
    return result
