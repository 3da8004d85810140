"""Building blocks for the config files in `configs/`: the per-task schema (every field the code
reads, its type and default, stated once), `validate`, the reference solvers, and the one
first-match helper for the regex policy tables.

Regex tables are matched with `re.search` against flat parameter paths such as
`visual/transformer/resblocks/0/ln_1/scale` (`ovseg_jax.training.checkpoint.key_path_str`). Sequences are
tuples so that `--config.x='(...)'` can override them (ml_collections cannot parse lists).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import ml_collections
from ml_collections import config_dict

from ovseg_jax.models.clip import ClipConfig
from ovseg_jax.models.layers import REMAT

log = logging.getLogger("ovseg_jax.train")

# open_clip (reference 4.2): no weight decay for 0/1-d parameters and names with bn/ln/bias/logit_scale.
CLIP_NO_DECAY = r"(^|/)(ln_\w+/(scale|bias)|bias|logit_scale|class_embedding)$"
# The frozen text tower of the CLIP adaptation stages.
CLIP_TEXT_TOWER = r"^(token_embedding|positional_embedding|transformer|ln_final|text_projection)(/|$)"
# Where the recipes expect OpenAI's BPE merges file (see `OPENAI_BPE_HINT`).
OPENAI_BPE = "weights/bpe_simple_vocab_16e6.txt.gz"
OPENAI_BPE_HINT = ("OpenAI's BPE merges file ships inside the open_clip_torch and openai-clip wheels: "
                   "`pip download --no-deps open_clip_torch` and "
                   "`unzip -j open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d weights/`; "
                   "a tokenizer directory (vocab.json + merges.txt) works too")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("warmup_poly", "warmup_cosine", "constant")


# ----------------------------------------------------------------------------------- the schema

class ConfigError(ValueError):
    """A config that cannot run: unknown / missing / mistyped fields, bad values, unused rules."""


REQUIRED = "<required>"  # no default: the config must set it
OPTIONAL = "<optional>"  # may be absent (the reading code has the default); checked when present
SEQ, NUM, CFG = (list, tuple), (int, float), (ml_collections.ConfigDict, dict)


class Field(NamedTuple):
    """One config field: the accepted types and its default (or REQUIRED / OPTIONAL)."""

    types: tuple[type, ...]
    default: Any = REQUIRED


class Section(NamedTuple):
    """A nested group of fields; `free` accepts any keys (checked elsewhere, e.g. by a dataclass)."""

    fields: Mapping[str, Any]
    optional: bool = False
    free: bool = False


OPTIM = Section({
    "lr": Field(NUM), "b1": Field(NUM, 0.9), "b2": Field(NUM, 0.999), "eps": Field(NUM, 1e-8),
    "weight_decay": Field(NUM, 0.0),
    # The schedule runs over config.total_steps (the one source of the run's length).
    "schedule": Section({"kind": Field((str,), "constant"), "warmup_steps": Field((int,), 0),
                         "power": Field(NUM, 0.9), "warmup_factor": Field(NUM, 1e-6)}),
    "grad_clip_norm": Field(NUM + (type(None),), 0.0),
    "lr_mults": Field(SEQ, ()),  # [(regex, multiplier)], first match wins, default 1
    "wd_mults": Field(SEQ, ()),  # [(regex, multiplier)], first match wins, default 1
    "freeze": Field(SEQ, ()),  # [regex]
    "trainable": Field(SEQ + (type(None),), None),  # [regex] or None (all)
})

TRAINER = {
    "task": Field((str,)), "seed": Field((int,), 0), "dtype": Field((str,), "float32"),
    # How the model's stacks of identical blocks run (`ovseg_jax.models.layers.set_stack_options`),
    # like dtype an execution choice: parameters and checkpoints are the same for every setting.
    "scan_layers": Field((bool,), False),  # one jax.lax.scan per stack: the block compiles once
    "remat": Field((str,), "none"),  # rematerialisation per block: "none", "block" or "dots"
    "total_steps": Field((int,)), "batch_size": Field((int,)),  # global batch
    "log_every": Field((int,), 50), "eval_every": Field((int,), 0), "init_from": Field((str,), ""),
    "profile_steps": Field((int,), 0),  # > 0: a jax.profiler trace of that many steps under workdir/profile
    "allow_config_change": Field((bool,), False),  # resume a workdir whose saved config differs
    "mesh": Field(SEQ, (("data", -1), ("model", 1))),
    "sharding": Section({"rules": Field(SEQ, ()), "fsdp_min_size": Field((int, type(None)), 2**22)}),
    "checkpoint": Section({"interval": Field((int,), 1000), "max_to_keep": Field((int, type(None)), 3),
                           "async_save": Field((bool,), True)}),
    "optim": OPTIM,
}

# Data of each kind; kind "python" calls `factory` ("module:function") with the config.
DATA = {
    "python": Section({"kind": Field((str,)), "factory": Field((str,))}, free=True),
    "clip_pairs": Section({
        "kind": Field((str,)), "path": Field((str,)),
        "tokenizer": Field((str,), ""),  # "" = the tokenizer files of a transformers CLIP init_from
        "num_workers": Field((int,), 0), "seed": Field((int,), OPTIONAL),  # default config.seed
        "skip_bad_examples": Field((bool,), False),
        "root": Field((str,), OPTIONAL), "generate": Section({}, optional=True, free=True)}),
    "segmentation": Section({
        "kind": Field((str,), OPTIONAL), "dataset": Field((str,)), "root": Field((str,)), "split": Field((str,), "train"),
        "crop_size": Field((int,)), "scales": Field(SEQ, OPTIONAL), "max_size": Field((int,), 2560),
        "max_masks": Field((int,)), "photometric": Field((bool,), True), "flip": Field((bool,), True),
        "num_workers": Field((int,), 0), "seed": Field((int,), OPTIONAL), "skip_bad_examples": Field((bool,), False),
        "generate": Section({}, optional=True, free=True)}),
}
DATA["captions"] = DATA["clip_pairs"]

TASKS = {
    "clip": {
        "model": Section({"clip": Section({}, free=True)}),  # ClipConfig fields
        "eval": Section({"dataset": Field((str,)), "root": Field((str,)), "split": Field((str,), OPTIONAL),
                         "max_examples": Field((int, type(None)), OPTIONAL),
                         "templates": Field((str,) + SEQ, OPTIONAL), "unseen": Field(SEQ, OPTIONAL)}, optional=True),
    },
    "segmenter": {
        "model": Section({"segmenter": Section({}, free=True),  # SegmenterConfig.to_dict()
                          "clip_init": Field((str,)), "tokenizer": Field((str,), ""),
                          "templates": Field((str,) + SEQ, "vild"), "class_names": Field(SEQ)}),
        "loss": Section({"ce": Field(NUM, 1.0), "mask": Field(NUM, 20.0), "dice": Field(NUM, 1.0),
                         "no_object": Field(NUM, 0.1)}),
        "eval": Section({"dataset": Field((str,)), "root": Field((str,)), "split": Field((str,), OPTIONAL),
                         "short": Field((int,), OPTIONAL), "max_size": Field((int,), OPTIONAL),
                         "bucket": Field((int,), OPTIONAL), "mask_threshold": Field(NUM, OPTIONAL),
                         "max_examples": Field((int, type(None)), OPTIONAL)}, optional=True),
    },
}
DATA_KINDS = {"clip": ("clip_pairs", "captions", "python"), "segmenter": ("segmentation", "python")}

# Fields that may differ when a run resumes: they change how it is logged, saved, laid out,
# computed or evaluated, not what it trains. Any other difference needs `allow_config_change`.
RESUMABLE = ("log_every", "eval_every", "profile_steps", "scan_layers", "remat", "eval", "checkpoint", "mesh",
             "sharding", "data.num_workers", "allow_config_change")
_HINTS = {"optim.schedule.total_steps": " (the schedule runs over config.total_steps; set that instead)"}


def _hint(path: str) -> str:
    """The `_HINTS` entry for a dotted field path, also inside a stage ("ft.optim.schedule.total_steps")."""
    return next((hint for key, hint in _HINTS.items() if path == key or path.endswith("." + key)), "")


def field_names(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every field of `config` as a dotted path, sections included ("optim", "optim.schedule.kind")."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, CFG):
            names += field_names(value, f"{prefix}{key}.")
    return names


def closest_fields(config: Mapping[str, Any], path: str, n: int = 3) -> list[str]:
    """The existing fields of `config` nearest to the dotted `path`: the same name elsewhere (a field
    that moved) first, then similar paths, then similar names."""
    names = field_names(config)
    key = path.rsplit(".", 1)[-1]
    leaves = {name: name.rsplit(".", 1)[-1] for name in names}
    similar_keys = set(difflib.get_close_matches(key, set(leaves.values()), n=n, cutoff=0.75))
    found = ([name for name, leaf in leaves.items() if leaf == key] + difflib.get_close_matches(path, names, n=n)
             + [name for name, leaf in leaves.items() if leaf in similar_keys])
    return [name for name in dict.fromkeys(found) if not (path + ".").startswith(name + ".")][:n]


def unknown_field(config: Mapping[str, Any], path: str) -> str | None:
    """None if `config` has the dotted field `path` (as in an override `--config.optim.lr=...`), else
    one line about the first missing part: where it is missing and the closest existing fields."""
    node, parts = config, path.split(".")
    for i, key in enumerate(parts):
        where = "config" + "".join("." + p for p in parts[:i])
        if not isinstance(node, CFG):
            return f"{where} is a value ({type(node).__name__}), not a section with a field {key!r}"
        if key not in node:
            missing = ".".join(parts[:i + 1])
            close = closest_fields(config, missing)
            return (f"{where} has no field {key!r}{_hint(missing)}"
                    + (f"; closest: {', '.join('config.' + c for c in close)}" if close else ""))
        node = node[key]
    return None


def _default(field: Field):
    if field.default is None and set(SEQ) & set(field.types):
        return config_dict.placeholder(tuple)  # None, but `--config.x='(...)'` can set it
    return field.default


def defaults(section: Section) -> ml_collections.ConfigDict:
    """The declared defaults of a section (REQUIRED / OPTIONAL fields left out)."""
    out = ml_collections.ConfigDict()
    for key, spec in section.fields.items():
        if isinstance(spec, Section):
            if not spec.optional:
                out[key] = defaults(spec)
        elif spec.default not in (REQUIRED, OPTIONAL):
            out[key] = _default(spec)
    return out


def _type_ok(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _check_section(values, section: Section, where: str, errors: list[str]) -> None:
    """Check `values` (a ConfigDict) against `section`, adding missing defaults; collect errors."""
    if not isinstance(values, CFG):
        errors.append(f"config.{where.rstrip('.')} must be a dict of fields; got {values!r}")
        return
    if not section.free:
        for key in values.keys():
            if key not in section.fields:
                errors.append(f"config.{where}{key}: unknown field{_hint(where + key)}; "
                              f"{where.rstrip('.') or 'the config'} has {sorted(section.fields)}")
    for key, spec in section.fields.items():
        name = f"{where}{key}"
        if isinstance(spec, Section):
            if key not in values or values[key] is None:
                if spec.optional:
                    continue
                values[key] = ml_collections.ConfigDict()
            _check_section(values[key], spec, name + ".", errors)
        elif key not in values:
            if spec.default is REQUIRED:
                errors.append(f"config.{name} is required ({'/'.join(t.__name__ for t in spec.types)})")
            elif spec.default is not OPTIONAL:
                values[key] = _default(spec)
        elif not _type_ok(values[key], spec.types):
            errors.append(f"config.{name}={values[key]!r}: expected {'/'.join(t.__name__ for t in spec.types)}")


def _check_values(c, errors: list[str]) -> None:
    """Range checks of the trainer fields (after the types are known to be right)."""
    for name, value, ok, what in [
            ("total_steps", c.get("total_steps"), lambda v: v > 0, "> 0"),
            ("batch_size", c.get("batch_size"), lambda v: v > 0, "> 0"),
            ("log_every", c.get("log_every"), lambda v: v > 0, "> 0"),
            ("eval_every", c.get("eval_every"), lambda v: v >= 0, ">= 0 (0: no periodic evaluation)"),
            ("profile_steps", c.get("profile_steps"), lambda v: v >= 0, ">= 0 (0: no profile)"),
            ("checkpoint.interval", c.checkpoint.get("interval"), lambda v: v >= 0, ">= 0 (0: only at the end)"),
            ("dtype", c.get("dtype"), lambda v: v in DTYPES, f"one of {DTYPES}"),
            ("remat", c.get("remat"), lambda v: v in REMAT,
             f"one of {REMAT} (none: keep all activations; block: recompute each block for the gradient; "
             "dots: keep only the weight matmuls' outputs)"),
            ("optim.schedule.kind", c.optim.schedule.get("kind"), lambda v: v in SCHEDULES, f"one of {SCHEDULES}"),
            ("optim.schedule.warmup_steps", c.optim.schedule.get("warmup_steps"), lambda v: v >= 0, ">= 0")]:
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float, str)) and not ok(value):
            errors.append(f"config.{name}={value!r}: must be {what}")


def _check_model(c, errors: list[str]) -> None:
    try:
        if c.task == "clip":
            ClipConfig(**c.model.clip.to_dict())
        else:
            from ovseg_jax.models.maskformer import SegmenterConfig  # noqa: PLC0415

            SegmenterConfig.from_dict(c.model.segmenter.to_dict())
    except (TypeError, ValueError, KeyError) as e:
        errors.append(f"config.model.{'clip' if c.task == 'clip' else 'segmenter'}: {e}")


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
    """Check a stage config (or each stage of a `stages` config) against its task's schema before
    anything is built: unknown fields, missing required ones, wrong types and bad values are one
    ValueError listing them all. Missing optional fields get their declared defaults (in place).
    `data=False` skips `config.data` (a Trainer fed batches directly)."""
    if "stages" in config:
        missing = [s for s in config.stages if s not in config]
        if missing:
            raise ConfigError(f"config.stages names {missing}, which the config does not have")
        for name in config.stages:
            validate(config[name], data=data)
        return
    task = config.get("task")
    if task not in TASKS:
        raise ConfigError(f"config.task must be one of {sorted(TASKS)}; got {task!r}")
    fields = {**TRAINER, **TASKS[task]}
    kind = None
    if data:
        d = config.get("data") or {}
        kind = d.get("kind", "segmentation" if task == "segmenter" else None)
        if kind not in DATA_KINDS[task]:
            raise ConfigError(f"config.data.kind={kind!r}: the {task} task reads {DATA_KINDS[task]} "
                             "(kind 'python' with factory='module:function' for any other source)")
        fields["data"] = DATA[kind]
    errors: list[str] = []
    with config.unlocked():
        if not data:
            fields["data"] = Section({}, free=True)
        _check_section(config, Section(fields), "", errors)
    if not errors:
        _check_values(config, errors)
        _check_model(config, errors)
    if errors:
        raise ConfigError(f"config ({task} task) is not valid:\n- " + "\n- ".join(errors))


def check_variant(arg: str | None, variants: Sequence[str] = (), *, config: str = "this config") -> str:
    """A config file's `get_config(arg)` variant -> `arg` ("" when none); an unknown one raises."""
    arg = arg or ""
    if arg and arg not in variants:
        valid = f"one of {list(variants)}" if variants else "none (it takes no variant)"
        raise ConfigError(f"{config}: unknown variant {arg!r}; valid variants: {valid}")
    return arg


# --------------------------------------------------------------------------------- regex tables

def match_rules(table: str, rules: Iterable[Sequence] | None, paths: Iterable[str], default: Any = None,
                *, log_matches: bool = False) -> dict[str, Any]:
    """First-match policy table `rules` = `[(regex, value)]` (the config field `table`) over
    parameter `paths` -> `{path: value}` (`default` where no rule matches).

    A rule whose regex matches no path at all is an error naming the rule and the table (a typo or
    a renamed parameter). `log_matches` logs the path -> rule assignment (once, at start).
    """
    paths = list(paths)
    compiled = []
    for i, rule in enumerate(rules or ()):
        if isinstance(rule, str) or len(rule) != 2:
            raise ConfigError(f"config.{table}[{i}]={rule!r}: expected a (regex, value) pair")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ConfigError(f"config.{table}[{i}]: bad regex {rule[0]!r}: {e}") from None
    unused = [f"{rx.pattern!r}" for rx, _ in compiled if not any(rx.search(p) for p in paths)]
    if unused:
        raise ConfigError(f"config.{table}: rule {', '.join(unused)} matches no parameter (of {len(paths)}, "
                         f"e.g. {paths[:3]})")
    out = {}
    for path in paths:
        out[path] = default
        for rx, value in compiled:
            if rx.search(path):
                out[path] = value
                if log_matches:
                    log.debug("%s: %s <- %r (%s)", table, path, rx.pattern, value)
                break
    return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: Sequence[str] = RESUMABLE) -> list[str]:
    """Differences between two configs as JSON dicts -> `["optim.lr: 0.001 -> 1000.0", ...]`,
    leaving out the fields under the dotted prefixes `ignore`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(json.loads(json.dumps(saved))), flat(json.loads(json.dumps(current)))
    skip = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)  # noqa: E731
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(a.keys() | b.keys()) if not skip(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


# ------------------------------------------------------------------------------------- builders

def base(task: str) -> ml_collections.ConfigDict:
    """Trainer defaults shared by every stage (the schema's defaults; `total_steps`, `batch_size`,
    `optim.lr` and the task's model/data fields are the recipe's to set)."""
    c = defaults(Section({**TRAINER, **TASKS[task]}))
    c.task = task
    c.data = ml_collections.ConfigDict()
    return c


def clip_optim(lr: float, warmup_steps: int = 100, weight_decay: float = 0.2,
               freeze: tuple[str, ...] = (), trainable: tuple[str, ...] | None = None) -> ml_collections.ConfigDict:
    """open_clip's AdamW (b=(0.9, 0.98), eps 1e-6) with warmup + cosine over `config.total_steps`,
    no clipping (reference 4.2/4.3)."""
    c = defaults(OPTIM)
    c.update({"lr": lr, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": weight_decay, "grad_clip_norm": 0.0,
              "wd_mults": ((CLIP_NO_DECAY, 0.0),), "freeze": tuple(freeze)})
    c.schedule.update({"kind": "warmup_cosine", "warmup_steps": warmup_steps})
    if trainable is not None:
        c.trainable = tuple(trainable)
    return c


def clip_model(clip: ClipConfig) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"clip": dataclasses.asdict(clip)})


def clip_finetune(clip: ClipConfig, *, lr: float = 5e-6, total_steps: int, warmup_steps: int = 100,
                  batch_size: int) -> ml_collections.ConfigDict:
    """Stage A (reference 4.2): all visual parameters + logit_scale train; text tower frozen."""
    c = base("clip")
    c.model = clip_model(clip.replace(mask_prompt_depth=0))
    c.optim = clip_optim(lr, warmup_steps, freeze=(CLIP_TEXT_TOWER,))
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def mask_prompt_tuning(clip: ClipConfig, *, depth: int = 3, lr: float = 0.05, total_steps: int,
                       warmup_steps: int = 100, batch_size: int) -> ml_collections.ConfigDict:
    """Stage B (reference 4.3): only `visual/mask_embedding` trains, weight decay 0.

    The reference also leaves `logit_scale` trainable (clamped at ln 100, irrelevant to OVSeg,
    which uses a fixed 100); here it is frozen so that the stage changes nothing but the prompts.
    """
    c = base("clip")
    c.model = clip_model(clip.replace(mask_prompt_depth=depth))
    c.optim = clip_optim(lr, warmup_steps, weight_decay=0.0, trainable=(r"^visual/mask_embedding$",))
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def clip_pairs_data(path: str, tokenizer: str = OPENAI_BPE, *, num_workers: int = 8) -> ml_collections.ConfigDict:
    """Masked-crop / text pairs for the CLIP stages: a tab-separated `filepath<TAB>title` CSV
    (the released format) or our JSON-lines pairs, tokenised with `tokenizer` (OpenAI's BPE file, a
    tokenizer directory, or "" for the tokenizer of a transformers CLIP `init_from`); train crops
    RandomResizedCrop(scale 0.9-1) at the model's image size."""
    c = defaults(DATA["clip_pairs"])
    c.update({"kind": "clip_pairs", "path": path, "tokenizer": tokenizer, "num_workers": num_workers, "seed": 0})
    return c


# detectron2/MaskFormer (reference 3.4): no weight decay for normalisation layers, the query
# embedding (nn.Embedding) and Swin's relative-position / absolute-position tables.
SEGMENTER_NO_DECAY = (r"(^|/)norm\d*/(scale|bias)$|(^|/)query_embed/embedding$"
                      r"|(^|/)relative_position_bias_table$|(^|/)absolute_pos_embed$")
SEGMENTER_BACKBONE = r"(^|/)backbone/"


def segmenter_optim(lr: float, weight_decay: float, backbone_lr_mult: float,
                    warmup_steps: int = 1500) -> ml_collections.ConfigDict:
    """MaskFormer's AdamW (b=(0.9, 0.999), eps 1e-8), WarmupPolyLR (power 0.9, warmup factor 1e-6)
    over `config.total_steps` and full-model gradient clipping at global norm 0.01 (reference 3.4)."""
    c = defaults(OPTIM)
    c.update({"lr": lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": weight_decay, "grad_clip_norm": 0.01,
              "lr_mults": ((SEGMENTER_BACKBONE, backbone_lr_mult),), "wd_mults": ((SEGMENTER_NO_DECAY, 0.0),)})
    c.schedule.update({"kind": "warmup_poly", "warmup_steps": warmup_steps, "power": 0.9, "warmup_factor": 1e-6})
    return c


def segmenter_training(segmenter: dict, *, clip_init: str, class_names: list[str],
                       lr: float, weight_decay: float, backbone_lr_mult: float, total_steps: int,
                       batch_size: int, warmup_steps: int = 1500, tokenizer: str = "",
                       templates: str | list[str] = "vild") -> ml_collections.ConfigDict:
    """Segmenter stage (reference 3): `segmenter` is `SegmenterConfig.to_dict()`; the frozen CLIP
    `clip_init` (tokenizer files `tokenizer` when it has none) embeds
    `class_names` with `templates` (the 14 ViLD templates by default)."""
    c = base("segmenter")
    c.model = ml_collections.ConfigDict({
        "segmenter": segmenter, "clip_init": clip_init, "tokenizer": tokenizer,
        "templates": templates, "class_names": tuple(class_names)})
    c.optim = segmenter_optim(lr, weight_decay, backbone_lr_mult, warmup_steps)
    c.total_steps = total_steps
    c.batch_size = batch_size
    return c


def segmentation_data(dataset: str, root: str, *, crop_size: int, short_sides, max_size: int,
                      max_masks: int = 64, num_workers: int = 8) -> ml_collections.ConfigDict:
    """Segmenter training data: `dataset` (an `ovseg_jax.data.registry` name under `root`, or a dataset
    folder, `ovseg_jax.data.custom`), random short-side scale from `short_sides`, `crop_size` crops,
    up to `max_masks` class masks per crop."""
    c = defaults(DATA["segmentation"])
    c.update({"dataset": dataset, "root": root, "crop_size": crop_size, "scales": tuple(short_sides),
              "max_size": max_size, "max_masks": max_masks, "num_workers": num_workers, "seed": 0})
    return c
