"""Writes LRA-format data: ListOps and Pathfinder from their generators, or synthetic sets.

    python tools/make_lra_data.py listops --out DIR --num_train 96000 --num_val 2000 --num_test 2000
    python tools/make_lra_data.py pathfinder --out DIR --resolution 32 --num 1000 --difficulty hard
    python tools/make_lra_data.py synthetic --task text --out DIR    # random, for smoke runs

DIR is then a `data_dir` for `lrulm.data.lra.load_split`. A folder it would write that
holds files already (DIR/listops-1000, ...) is refused, or with --force replaced whole
(kept as it was if the writing fails). The generators live in `lrulm.data.lra.generate`;
this file only parses flags.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import tool_args

from lrulm.data.lra import generate, synthetic


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (default sys.argv[1:]) and writes the data set it names."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="kind", required=True)

    lo = tasks.add_parser("listops", help="listops-1000/basic_{train,val,test}.tsv")
    lo.add_argument("--out", required=True, help="data_dir to write listops-1000/ into")
    lo.add_argument("--num_train", type=int, default=96_000)
    lo.add_argument("--num_val", type=int, default=2_000)
    lo.add_argument("--num_test", type=int, default=2_000)
    lo.add_argument("--min_length", type=int, default=generate.MIN_LENGTH)
    lo.add_argument("--max_length", type=int, default=generate.MAX_LENGTH)
    lo.add_argument("--max_depth", type=int, default=generate.MAX_DEPTH)
    lo.add_argument("--max_args", type=int, default=generate.MAX_ARGS)
    lo.add_argument("--seed", type=int, default=0)

    pf = tasks.add_parser("pathfinder", help="pathfinder{res}/<difficulty>/{imgs,metadata}")
    pf.add_argument("--out", required=True, help="data_dir to write pathfinder{res}/ into")
    pf.add_argument(
        "--resolution", type=int, default=32, choices=(32, 128), help="32 Pathfinder, 128 Path-X"
    )
    pf.add_argument("--num", type=int, default=1000)
    pf.add_argument("--difficulty", default="hard", help="easy, intermediate or hard")
    pf.add_argument("--per_folder", type=int, default=1000, help="images per imgs/<k>")
    pf.add_argument("--seed", type=int, default=0)

    sy = tasks.add_parser("synthetic", help="small random data in a task's released layout")
    sy.add_argument("--task", required=True, choices=("listops", "text", "retrieval", "image"))
    sy.add_argument("--out", required=True)
    sy.add_argument("--num", type=int, default=20, help="examples per class / batch / split")
    sy.add_argument("--seed", type=int, default=0)

    for sub in (lo, pf, sy):
        sub.add_argument(
            "--force",
            action="store_true",
            help="replace the folder this writes if it holds files (it is removed first)",
        )
    args = tool_args.show_defaults(parser).parse_args(argv)
    counts = {
        "listops": ("num_train", "num_val", "num_test", "max_length", "max_depth", "max_args"),
        "pathfinder": ("num", "per_folder", "resolution"),
        "synthetic": ("num",),
    }[args.kind]  # fmt: skip
    for name in counts:  # every split needs examples, every image a pixel
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    target = _target(args)
    old = None
    if os.path.isdir(target) and os.listdir(target):
        if not args.force:  # e.g. a data_dir holding the real release
            parser.error(
                f"{target} holds files already; give another --out, or --force to "
                "replace that folder (nothing of it would be kept)"
            )
        old = f"{target}.replaced-{os.getpid()}"  # stale files would be read with new ones
        os.rename(target, old)
    try:
        _write(args)
    except BaseException as e:
        if old is not None:  # a failed write leaves the folder as it was
            shutil.rmtree(target, ignore_errors=True)
            os.rename(old, target)
        if isinstance(e, ValueError):  # the generators' own checks: a flag out of range
            parser.error(str(e))
        raise
    if old is not None:
        shutil.rmtree(old)


def _target(args) -> str:
    """The folder under --out that this command writes (and --force replaces)."""
    if args.kind == "pathfinder":
        spec = generate.DIFFICULTIES.get(args.difficulty)
        folder = spec.folder if spec else args.difficulty  # a bad one: the generator says
        return os.path.join(args.out, f"pathfinder{args.resolution}", folder)
    task = args.task if args.kind == "synthetic" else "listops"
    name = {"listops": "listops-1000", "text": "aclImdb", "retrieval": "tsv_data",
            "image": "cifar-10-batches-py"}[task]  # fmt: skip
    return os.path.join(args.out, name)


def _write(args) -> None:
    if args.kind == "synthetic":
        write = {
            "listops": lambda: synthetic.write_listops(args.out, num=args.num, seed=args.seed),
            "text": lambda: synthetic.write_imdb(args.out, num_per_class=args.num, seed=args.seed),
            "retrieval": lambda: synthetic.write_aan(args.out, num=args.num, seed=args.seed),
            "image": lambda: synthetic.write_cifar(
                args.out, num_per_batch=args.num, num_test=args.num, seed=args.seed
            ),
        }[args.task]
        write()
        print(f"wrote synthetic {args.task} data (random content) under {args.out}")
    elif args.kind == "listops":
        splits = generate.generate_listops(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            min_length=args.min_length,
            max_length=args.max_length,
            max_depth=args.max_depth,
            max_args=args.max_args,
            seed=args.seed,
        )
        counts = ", ".join(f"{len(rows)} {split}" for split, rows in splits.items())
        print(f"wrote {counts} ListOps examples to {args.out}/listops-1000")
    else:
        written = generate.generate_pathfinder(
            args.out,
            args.resolution,
            num=args.num,
            difficulty=args.difficulty,
            seed=args.seed,
            per_folder=args.per_folder,
        )
        print(f"wrote {len(written)} images to {args.out}/pathfinder{args.resolution}")


if __name__ == "__main__":
    main(sys.argv[1:])
