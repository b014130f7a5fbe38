"""Typed configuration of an indexing job, and the ``--index-spec`` parser for engine options."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentsearch.engine.config import EngineConfig
from latentsearch.errors import InvalidArgumentError

__all__ = ["IndexJobConfig", "parse_index_spec"]


@dataclass(frozen=True, kw_only=True)
class IndexJobConfig:
    """Every knob of :func:`indexer.run_index_job`, with its default.

    Give either ``model`` + ``data`` (encode a dataset) or ``posteriors`` (a precomputed npz).
    """

    # Index root to publish into (created if needed); see :class:`indexer.IndexRoot`.
    out: Path
    # Model directory, TorchScript file or ``package.module:function`` (see model.loader.load_model).
    model: str | None = None
    # Dataset path: IDX file/folder, .npy, .npz or image folder (see latentsearch.data.readers.open_dataset).
    data: str | None = None
    # Parquet data (``--data`` a *.parquet file or a folder of them; latentsearch.data.parquet): the
    # column holding the items, encoded PNG/JPEG bytes or a list of numbers (``--parquet-column``;
    # None: the only such column, else one named image / pixels / x / features ...).
    parquet_column: str | None = None
    # Parquet: the label column, integers or strings (``--label-column``; None: label / labels / y when
    # present) and the id column (``--id-column``; None: id when present, else row numbers).
    label_column: str | None = None
    id_column: str | None = None
    # Parquet: the item shape (H, W, C) or (D,) of a flat list column (``--parquet-shape``; None: a
    # tensor column's shape, the file's latentsearch.item_shape metadata, else (D,)).
    parquet_shape: tuple[int, ...] | None = None
    # Precomputed posteriors: npz with mu and one of logvar / log_sigma / sigma (see indexer.posteriors).
    posteriors: str | None = None
    # Names of the integer labels, label_names[label] (``--label-names``); None: the data's own
    # (image-folder class names, a dataset's label_names, a posteriors npz's label_names key), if any.
    # Must name every label present (indexer.catalogue.check_label_names).
    label_names: tuple[str, ...] | None = None
    # Store each image item's pixels as its thumbnail (uint8 images; ``--no-thumbnails``: none,
    # N * H * W * C bytes saved, at most 4096 per item; see indexer.catalogue).
    thumbnails: bool = True
    # Input shape of a user model (TorchScript / factory); checkpoints know their own.
    input_shape: tuple[int, ...] | None = None
    # "auto" (cuda when available), "cpu" or "cuda".
    device: str = "auto"
    # Items per encoder forward pass.
    batch_size: int = 1024
    # bf16 autocast for the encoder on CUDA (mu / logvar are still returned as float32); ignored on CPU.
    bf16: bool = False
    # CPU threads for torch (None: all cores).
    num_threads: int | None = None
    # Encode on Ray Data (``--ray``): an actor pool loads the model once per actor and writes posterior
    # shards into the staging area (latentsearch.indexer.ray_encode; needs the ``ray`` extra, and the
    # caller passes its ``ray_encode`` to run_index_job). False: encode in this process.
    ray: bool = False
    # The Ray cluster (``--ray ADDRESS``: ``auto``, ``ray://head:10001``, ``head:6379``); None: the
    # cluster in RAY_ADDRESS (``ray job submit`` sets it), else a new local instance for this job.
    ray_address: str | None = None
    # Encoder actors on Ray (each loads the model once and encodes batch_size items per call).
    ray_actors: int = 1
    # GPUs per encoder actor (0: CPU actors; a fraction such as 0.5 puts two actors on one GPU).
    ray_gpus_per_actor: float = 0.0
    # CPUs per encoder actor (Ray's scheduling unit; a CPU actor runs max(1, int(this)) torch threads).
    ray_cpus_per_actor: float = 1.0
    # Reuse the current version's posteriors for items whose content hash is unchanged when it was
    # encoded with the same model (latentsearch.indexer.incremental); only new or changed items are
    # encoded. False (``index --full``): encode every item.
    reuse: bool = True
    # Search engine options (the ``--index-spec`` string parsed by :func:`parse_index_spec`).
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Versions kept after publishing (the current one is never deleted).
    keep: int = 3
    # Re-hash every file of the new version after publishing (slower; the write path already fsyncs).
    verify: bool = False
    # Progress on stderr: a bar on a terminal, else a log line every few seconds (latentsearch.progress).
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(self.label_names))
        if self.posteriors is not None:
            if self.model is not None or self.data is not None:
                raise InvalidArgumentError(
                    "give either --posteriors or --model with --data, not both", field="posteriors"
                )
        elif self.model is None or self.data is None:
            raise InvalidArgumentError(
                "give --model and --data (encode a dataset) or --posteriors FILE.npz", field="model"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidArgumentError(
                f"batch_size must be >= 1, got {self.batch_size!r}", field="batch_size"
            )
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise InvalidArgumentError(f"keep must be an integer >= 1, got {self.keep!r}", field="keep")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InvalidArgumentError(
                f"device must be auto, cpu or cuda, got {self.device!r}", field="device"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidArgumentError("num_threads must be >= 1", field="num_threads")
        if isinstance(self.ray_actors, bool) or not isinstance(self.ray_actors, int) or self.ray_actors < 1:
            raise InvalidArgumentError(
                f"ray_actors must be an integer >= 1, got {self.ray_actors!r}", field="ray_actors"
            )
        if not 0 <= self.ray_gpus_per_actor <= 64:
            raise InvalidArgumentError(
                f"ray_gpus_per_actor must be in [0, 64], got {self.ray_gpus_per_actor!r}",
                field="ray_gpus_per_actor",
            )
        if not 0 < self.ray_cpus_per_actor <= 1024:
            raise InvalidArgumentError(
                f"ray_cpus_per_actor must be in (0, 1024], got {self.ray_cpus_per_actor!r}",
                field="ray_cpus_per_actor",
            )
        if self.parquet_shape is not None:
            object.__setattr__(self, "parquet_shape", tuple(int(v) for v in self.parquet_shape))
        if self.posteriors is not None:
            for key, value in self.data_options.items():
                if value is not None:
                    raise InvalidArgumentError(
                        f"{key} applies to --data, not --posteriors", field=_OPTION_FIELDS[key]
                    )
        if self.ray_address is not None and not self.ray:
            raise InvalidArgumentError("ray_address is given but ray is off", field="ray_address")
        if self.ray and self.posteriors is not None:
            raise InvalidArgumentError(
                "--ray encodes a dataset: give --model and --data, not --posteriors", field="ray"
            )

    @property
    def source_kind(self) -> str:
        """``"posteriors"`` or ``"model"``."""
        return "posteriors" if self.posteriors is not None else "model"

    @property
    def data_options(self) -> dict[str, Any]:
        """The reader options for :func:`latentsearch.data.builtin.load_data` (``None``: unset)."""
        return {
            "column": self.parquet_column,
            "label_column": self.label_column,
            "id_column": self.id_column,
            "shape": self.parquet_shape,
        }

    def for_items(self, data: str) -> IndexJobConfig:
        """This job's options for encoding the items in ``data``, a ``.npy`` file the job wrote (the
        new or changed items of an incremental reindex, see indexer.incremental): the same model,
        encoder and Ray options, no reader options (``data_options`` all unset)."""
        unset: dict[str, Any] = dict.fromkeys(_OPTION_FIELDS.values())
        return dataclasses.replace(self, data=data, **unset)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = os.fspath(self.out)
        d["engine"] = self.engine.to_dict()
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        d["label_names"] = None if self.label_names is None else list(self.label_names)
        d["parquet_shape"] = None if self.parquet_shape is None else list(self.parquet_shape)
        return d


# data_options keys -> the config field that sets each
_OPTION_FIELDS = {
    "column": "parquet_column",
    "label_column": "label_column",
    "id_column": "id_column",
    "shape": "parquet_shape",
}
_NONE = ("none", "null")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(key: str, raw: str, default: Any) -> Any:
    """Convert ``raw`` for field ``key`` guided by the field's default (int / float / bool / None / str)."""
    text = raw.strip()
    if text.lower() in _NONE:
        return None
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidArgumentError(
            f"--index-spec: bad value for {key}: expected true or false, got {text!r}", field=key
        )
    try:
        if isinstance(default, int) or (default is None and key in ("approx_nlist", "approx_nprobe")):
            return int(text.replace("_", ""))
        if isinstance(default, float) or (default is None and key == "approx_kernel_scale"):
            return float(text)
        if key == "num_threads":
            return int(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"--index-spec: bad value for {key}: {exc}", field=key) from exc
    return text


def parse_index_spec(spec: str | None, *, base: EngineConfig | None = None) -> EngineConfig:
    """Parse ``"approx_nlist=4096,approx_nprobe=120,mode=auto"`` into an :class:`EngineConfig`.

    Keys are :class:`EngineConfig` field names; values are converted to the field's type
    (``none`` for optional fields). Unset keys keep ``base``'s values (default: the defaults).

    Raises:
        InvalidArgumentError: an unknown key (the message lists the known ones), a malformed
            ``key=value`` pair or a value the engine rejects.
    """
    base = base or EngineConfig()
    if spec is None or not spec.strip():
        return base
    defaults = base.to_dict()
    changes: dict[str, Any] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidArgumentError(
                f"--index-spec: expected key=value, got {part.strip()!r}", field="index_spec"
            )
        if key not in defaults:
            raise InvalidArgumentError(
                f"--index-spec: unknown key {key!r}; known keys: {', '.join(sorted(defaults))}",
                field="index_spec",
            )
        if key in changes:
            raise InvalidArgumentError(f"--index-spec: {key!r} given twice", field="index_spec")
        changes[key] = _coerce(key, value, EngineConfig.__dataclass_fields__[key].default)
    return dataclasses.replace(base, **changes)
