"""Dataset tools: `python -m ovseg_jax.data check PATH` and `python -m ovseg_jax.data export`.

    python -m ovseg_jax.data check path/to/my_data [--split val] [--max-images N] [--grid out.png]
    python -m ovseg_jax.data export synthetic out/world_coco --root outputs/synthetic_world --layout coco
    python -m ovseg_jax.data export path/to/coco_panoptic out/as_folder --layout folder --split val2017

`check` (`ovseg_jax.data.check`) prints what a dataset folder holds and every problem, naming the
file, and exits with status 1 when it found errors. `export` (`ovseg_jax.data.export_layouts`)
writes a dataset (a registry name with --root, or a folder) into one of the layouts
`ovseg_jax.data.custom` reads; the synthetic world is written with all its classes labelled.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ovseg_jax.utils.cli import exit_on_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovseg_jax.data", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="inspect a dataset folder (docs/own-data.md)")
    c.add_argument("path", help="dataset folder")
    c.add_argument("--split", action="append", help="only this split (repeatable; default all)")
    c.add_argument("--max-images", type=int, help="check only the first N pairs of each split")
    c.add_argument("--grid", help="where to draw the overlay grid (default outputs/check/<folder>.png)")
    c.add_argument("--threads", type=int, default=4, help="files decoded at once")
    c.add_argument("--reindex", action="store_true", help="list the folders again instead of the cached index")
    e = sub.add_parser("export", help="write a dataset into a layout of your own data")
    e.add_argument("dataset", help="registry name (e.g. synthetic, with --root) or a dataset folder")
    e.add_argument("out", help="output folder")
    e.add_argument("--layout", required=True, choices=("folder", "palette", "coco"))
    e.add_argument("--root", help="datasets root of a registry name (synthetic: the world's folder)")
    e.add_argument("--split", action="append", help="split to write (repeatable; default all)")
    e.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename a class")
    e.add_argument("--max-images", type=int, help="the first N examples of each split only")
    return p


def _export(args) -> None:
    from ovseg_jax.data import export_layouts, registry  # noqa: PLC0415

    rename = export_layouts.parse_rename(args.rename)
    if args.dataset == "synthetic":
        splits = args.split or ["train", "val"]
        out = export_layouts.export_world(args.root or "outputs/synthetic_world", args.out, args.layout,
                                          splits=splits, rename=rename, max_images=args.max_images)
    else:
        spec = registry.get(args.dataset)
        splits = args.split or list(spec.splits)
        for split in splits:
            source = spec.make_source(args.root, split)
            names = [rename.get(n, n) for n in source.class_names]
            out = export_layouts.export(source, args.out, args.layout, split=split, class_names=names,
                                        max_images=args.max_images)
    print(f"wrote {', '.join(splits)} of {args.dataset} in the {args.layout} layout to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with exit_on_error():
        if args.command == "export":
            _export(args)
            return 0
        from ovseg_jax.data.check import check, format_report  # noqa: PLC0415

        report = check(args.path, splits=args.split, max_images=args.max_images, grid=args.grid,
                       threads=args.threads, refresh=args.reindex)
        print(format_report(report))
        return 1 if report.num_errors else 0


if __name__ == "__main__":
    sys.exit(main())
