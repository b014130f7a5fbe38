"""``latentsearch index``: build and publish an index version; ``ls``, ``verify``, ``rollback``."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentsearch.indexer.root import IndexRoot

__all__ = ["register_cli"]

log = logging.getLogger(__name__)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` sub-command (and its ``ls`` / ``verify`` / ``rollback`` actions)."""
    p = subparsers.add_parser(
        "index",
        help="encode a dataset (or read posteriors) and publish a new index version; ls/verify/rollback",
        description=(
            "Build a search index and publish it as the new current version of INDEX_ROOT. "
            "Either --model with --data, or --posteriors FILE.npz. "
            "Actions: 'index ls ROOT', 'index verify ROOT [VERSION]', 'index rollback ROOT [VERSION]'."
        ),
    )
    p.add_argument("--model", help="model directory, TorchScript file or package.module:function")
    p.add_argument("--data", help="IDX file/folder, .npy, .npz, Parquet file/folder or folder of images")
    p.add_argument(
        "--parquet-column",
        default=None,
        metavar="COLUMN",
        help="Parquet --data: the column holding the items, PNG/JPEG bytes or a list of numbers (default: "
        "the only such column)",
    )
    p.add_argument(
        "--label-column",
        default=None,
        metavar="COLUMN",
        help="Parquet --data: integer or string labels (default: a column named label, labels or y)",
    )
    p.add_argument(
        "--id-column", default=None, metavar="COLUMN", help="Parquet --data: item ids (default: a column id)"
    )
    p.add_argument(
        "--parquet-shape",
        default=None,
        metavar="SHAPE",
        help="Parquet --data: item shape of a flat list column, e.g. 28,28,1 (default: the file's "
        "latentsearch.item_shape metadata, else one vector per row)",
    )
    p.add_argument("--posteriors", help="npz with mu and logvar|log_sigma|sigma (+ optional ids, labels)")
    p.add_argument("--out", help="index root (created if needed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--batch-size", type=int, default=1024, help="items per encoder batch (default 1024)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoder on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument(
        "--input-shape", default=None, help="item shape for TorchScript/factory models, e.g. 28,28,1"
    )
    p.add_argument(
        "--index-spec",
        default=None,
        help="engine options as key=value pairs, e.g. approx_nlist=4096,approx_nprobe=120,mode=auto",
    )
    p.add_argument(
        "--label-names",
        default=None,
        help="names of the integer labels 0, 1, ...: a comma list (T-shirt,Trouser,...) or a file with one "
        "name per line (default: the data's own, e.g. image-folder class names)",
    )
    p.add_argument(
        "--no-thumbnails",
        action="store_true",
        help="store no thumbnails of image items (default: each item's pixels, at most 4096 bytes each)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="encode on Ray Data (needs the ray extra): the cluster at ADDRESS (auto, ray://head:10001), "
        "else RAY_ADDRESS (set by `ray job submit`), else a new local Ray instance",
    )
    p.add_argument("--ray-actors", type=int, default=1, help="encoder actors on Ray (default 1)")
    p.add_argument(
        "--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (default 0: CPU actors)"
    )
    p.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs per Ray actor (default 1; a CPU actor runs that many torch threads)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="encode every item (default: reuse the current version's posteriors of items whose content is "
        "unchanged when it was encoded with the same model, and encode only new or changed items)",
    )
    p.add_argument("--keep", type=int, default=3, help="versions to keep (default 3; never the current)")
    p.add_argument("--verify", action="store_true", help="re-hash every file of the new version")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_index)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    ls = actions.add_parser("ls", help="list versions (current marked with *)")
    ls.add_argument("root", help="index root")
    ls.set_defaults(func=_cmd_ls)

    verify = actions.add_parser("verify", help="check the checksums of a version (default: current)")
    verify.add_argument("root", help="index root")
    verify.add_argument("version", nargs="?", default=None, help="version id (default: current)")
    verify.add_argument("--all", action="store_true", help="verify every version")
    verify.set_defaults(func=_cmd_verify)

    rollback = actions.add_parser("rollback", help="make an older version current")
    rollback.add_argument("root", help="index root")
    rollback.add_argument("version", nargs="?", default=None, help="version id (default: the previous one)")
    rollback.set_defaults(func=_cmd_rollback)


def _cmd_index(args: argparse.Namespace) -> int:
    from latentsearch.errors import InvalidArgumentError
    from latentsearch.indexer.config import IndexJobConfig, parse_index_spec
    from latentsearch.indexer.job import run_index_job

    if not args.out:
        raise InvalidArgumentError("--out INDEX_ROOT is required", field="out")
    shape = _shape(args.input_shape, "input_shape")
    label_names = None if args.label_names is None else _label_names(args.label_names)
    config = IndexJobConfig(
        out=args.out,
        label_names=label_names,
        thumbnails=not args.no_thumbnails,
        model=args.model,
        data=args.data,
        posteriors=args.posteriors,
        parquet_column=args.parquet_column,
        label_column=args.label_column,
        id_column=args.id_column,
        parquet_shape=_shape(args.parquet_shape, "parquet_shape"),
        input_shape=shape,
        device=args.device,
        batch_size=args.batch_size,
        bf16=args.bf16,
        num_threads=args.threads,
        ray=args.ray is not None,
        ray_address=args.ray or None,
        ray_actors=args.ray_actors,
        ray_gpus_per_actor=args.ray_gpus_per_actor,
        ray_cpus_per_actor=args.ray_cpus_per_actor,
        engine=parse_index_spec(args.index_spec),
        reuse=not args.full,
        keep=args.keep,
        verify=args.verify,
        progress=not args.no_progress,
    )
    try:
        if config.ray:
            # imports ray: only for --ray. One Ray session for the job: encode, then the build's
            # every-item k-means assignment as Ray tasks (indexer.ray_build).
            from latentsearch.indexer.ray_build import ray_assigner
            from latentsearch.indexer.ray_encode import ray_encode, ray_payloads, ray_session

            with ray_session(config.ray_address):
                result = run_index_job(config, encode=ray_encode, assign=ray_assigner, payloads=ray_payloads)
        else:
            result = run_index_job(config)
    except InvalidArgumentError as exc:
        if label_names is None or exc.field != "label_names":
            raise
        raise InvalidArgumentError(
            f"--label-names {args.label_names!r}: {exc.message}", field="label_names"
        ) from exc
    print(result.summary(), flush=True)
    if result.reuse is not None:
        print(result.reuse.summary(), flush=True)
    from latentsearch.indexer.root import IndexRoot

    text = _catalogue_text(IndexRoot(args.out), result.version)
    if text:
        print(f"catalogue: {text.strip()}", flush=True)
    return 0


def _shape(value: str | None, field: str) -> tuple[int, ...] | None:
    """``--input-shape`` / ``--parquet-shape``: ``28,28,1`` (or ``28x28x1``) as a tuple; None when unset."""
    from latentsearch.errors import InvalidArgumentError

    if not value:
        return None
    try:
        return tuple(int(s) for s in value.replace("x", ",").split(","))
    except ValueError as exc:
        raise InvalidArgumentError(f"bad --{field.replace('_', '-')} {value!r}", field=field) from exc


def _label_names(value: str) -> tuple[str, ...]:
    """``--label-names``: a file with one name per line (blank lines ignored) when ``value`` names a
    file, else a comma list. The catalogue checks the names (InvalidArgumentError naming the value)."""
    from pathlib import Path

    from latentsearch.errors import InvalidArgumentError

    path = Path(value)
    if "," not in value and path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(
                f"--label-names {value!r}: unreadable ({exc})", field="label_names"
            ) from exc
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(name.strip() for name in value.split(","))


def _cmd_ls(args: argparse.Namespace) -> int:
    from latentsearch.indexer.root import IndexRoot

    root = IndexRoot(args.root)
    rows = root.version_infos()
    if not rows:
        print(f"{args.root}: no versions")
        return 0
    for r in rows:
        mark = "*" if r.current else " "
        items = "?" if r.items is None else str(r.items)
        reuse = "" if r.reused is None else f"  reused {r.reused} encoded {r.encoded}"
        print(
            f"{mark} {r.version}  created {r.created or '?'}  items {items}  d {r.latent_dim or '?'}  "
            f"{r.bytes / 2**20:.1f} MiB  model {(r.model_hash or '-')[:12]}{reuse}"
            f"{_catalogue_text(root, r.version)}"
        )
    return 0


def _catalogue_text(root: IndexRoot, version: str) -> str:
    """``version``'s catalogue in brief, "  dims 8/10 active; collapsed: 2, 3 (KL < 0.1 nats)  names
    10  thumbnails 28x28x1" ("" for a version published before catalogues existed)."""
    from latentsearch.errors import LatentSearchError
    from latentsearch.indexer.catalogue import read_catalogue_info

    try:
        info = read_catalogue_info(root.version_dir(version))
    except LatentSearchError as exc:
        return f"  catalogue unreadable ({exc})"
    if info is None:
        return ""
    text = f"  dims {info.diagnostics.summary()}"
    if info.label_names is not None:
        text += f"  names {len(info.label_names)}"
    if info.thumbnail_shape is not None:
        text += f"  thumbnails {'x'.join(map(str, info.thumbnail_shape))}"
    return text


def _cmd_verify(args: argparse.Namespace) -> int:
    from latentsearch.indexer.root import IndexRoot

    root = IndexRoot(args.root)
    versions = root.versions() if args.all else [args.version or root._require_current()]
    failed = 0
    for v in versions:
        problems = root.check(v)
        if problems:
            failed += 1
            print(f"FAILED {v}")
            for line in problems:
                print(f"  {line}")
        else:
            print(f"OK {v}")
    return 1 if failed else 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from latentsearch.indexer.root import IndexRoot

    version = IndexRoot(args.root).rollback(args.version)
    print(f"current version of {args.root} is now {version}")
    return 0
