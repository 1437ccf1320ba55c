"""Where a dataset comes from: split folders, unsplit class folders, or a label file.

- `root/<split>/<class>/<image>`: the splits as they are (with `data.split.carve_validation`, a
  validation split carved out of train when there is none);
- `root/<class>/<image>` with no split folders: split here (`data.splits.plan_splits`);
- a label file (`.csv`, `.jsonl` or `.parquet`) of path and label, and optionally split, columns; paths are
  relative to the file's folder and must stay inside it. Without a split column, split here. A
  run's `splits.csv` (path, class, split, group) is such a file.

A bad row of a label file (a missing or irregular file, an empty or bad label, an unknown split,
the same path twice with two labels) is reported with its row number and skipped; only a file with
no usable row is an error.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from clothcli.config import DataConfig
from clothcli.data import embedded
from clothcli.data.layout import (
    SPLIT_NAMES,
    DatasetIndex,
    SplitIndex,
    class_dirs,
    find_split_dir,
    index_dataset,
    index_folder,
    is_image_name,
    resolve_eval_folder,
    walk_images,
)
from clothcli.data.splits import SPLITS_FILE, Assignment, SplitPlan, plan_splits, splits_csv
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text
from clothcli.names import check_class_names, name_problem

LABEL_SUFFIXES = (".csv", ".jsonl", ".parquet")
SHOWN_BAD_ROWS = 20
SPLIT_ALIASES = {alias: split for split, aliases in SPLIT_NAMES.items() for alias in aliases}


@dataclass
class Source:
    """A dataset's index, and the split made here when there was one to make."""

    index: DatasetIndex
    plan: SplitPlan | None = None
    bad_rows: list[str] = field(default_factory=list)


def is_label_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in LABEL_SUFFIXES


def is_dataset(path: str | Path) -> bool:
    """True when `path` is a folder, or a label file that exists: something `open_dataset` may read."""
    path = Path(path)
    return path.is_dir() or (is_label_file(path) and path.is_file())


def _index(root: Path, assignments: list[Assignment], source: str) -> DatasetIndex:
    """A DatasetIndex of assignments: classes from train (sorted, as from folders)."""
    classes = sorted({a.label for a in assignments if a.split == "train"})
    if not classes:
        raise UserError(f"{source}: no training images")
    check_class_names(classes, source)
    lookup = {c: i for i, c in enumerate(classes)}
    splits = {name: SplitIndex(name=name, directory=root) for name in ("train", "validation", "test")}
    for a in assignments:
        if a.label not in lookup:
            raise UserError(f"{source}: class '{a.label}' is in {a.split} but not in train")
        splits[a.split].samples.append((a.path, lookup[a.label]))
    index = DatasetIndex(root=root, classes=classes, splits={k: v for k, v in splits.items() if v.samples})
    for name in ("validation", "test"):
        if name not in index.splits:
            index.warnings.append(f"{source}: no {name} images")
    return index


def _unsplit(root: Path, cfg: DataConfig, workers: int) -> Source:
    folders = class_dirs(root)
    if not folders:
        raise UserError(f"{root}: no train/ folder and no class folders (expected {root}/<class>/<image>)")
    check_class_names([d.name for d in folders], str(root))
    items = [(path, d.name) for d in folders for path in walk_images(d)[0]]
    if not items:
        raise UserError(f"{root}: no images in its class folders")
    plan = plan_splits(items, cfg.split, workers=workers)
    index = _index(root, plan.assignments, str(root))
    index.warnings = plan.warnings + index.warnings
    return Source(index, plan)


def _carve_validation(index: DatasetIndex, cfg: DataConfig, workers: int) -> Source:
    """Validation taken out of train (groups kept whole); test, when there is one, stays as it is."""
    train = index.splits["train"]
    items = [(path, index.classes[t]) for path, t in train.samples]
    plan = plan_splits(items, cfg.split, test=0.0, workers=workers)
    lookup = {c: i for i, c in enumerate(index.classes)}
    carved = {"train": SplitIndex("train", train.directory), "validation": SplitIndex("validation", train.directory)}
    for a in plan.assignments:
        carved[a.split].samples.append((a.path, lookup[a.label]))
    carved["train"].skipped = train.skipped
    index.splits = {"train": carved["train"], "validation": carved["validation"], **{
        k: v for k, v in index.splits.items() if k not in ("train", "validation")}}  # fmt: skip
    index.warnings = [w for w in index.warnings if "no validation/" not in w] + plan.warnings
    return Source(index, plan)


def _embedded_rows(path: Path, rows: list[dict], column: str, schema, cfg: DataConfig) -> list[dict]:
    """Rows of a Parquet file whose images are inside it: each one's path is its image id
    (`data.embedded`), a Hugging Face ClassLabel's integers become their names, and a row without image
    bytes or with a class number out of range is `__bad__`."""
    embedded.remember_column(path, column)
    lengths = embedded.byte_lengths(path)
    names = embedded.class_names(schema, cfg.label_column, path)
    for number, (row, length) in enumerate(zip(rows, lengths), 1):
        label = row.get(cfg.label_column)
        row[cfg.path_column] = embedded.embedded_id(path.name, number)
        if not length:
            rows[number - 1] = {"__bad__": f"row {number}: no image bytes"}
        elif names is not None and isinstance(label, int):
            if not 0 <= label < len(names):
                rows[number - 1] = {"__bad__": f"row {number}: class number {label} is not one of {len(names)}"}
            else:
                row[cfg.label_column] = names[label]
    return rows


def _parquet_rows(path: Path, cfg: DataConfig) -> list[dict]:
    """A Parquet file's rows as dicts (pyarrow): its text and number columns; where it has no path column
    but an image column, the images inside it (`_embedded_rows`)."""
    pa, pq = embedded.pyarrow_modules()
    try:
        schema = pq.read_schema(path)
        stored = embedded.image_columns(schema)
        table = pq.read_table(path, columns=[name for name in schema.names if name not in stored])
    except (OSError, pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{path}: not a readable Parquet file ({reason})") from None
    rows = table.to_pylist() if table.num_columns else [{} for _ in range(table.num_rows)]
    if cfg.path_column in schema.names:
        return rows
    column = embedded.choose_image_column(schema, cfg.image_column, path)
    return rows if column is None else _embedded_rows(path, rows, column, schema, cfg)


def read_rows(path: Path, cfg: DataConfig | None = None) -> list[dict]:
    """The rows of a .csv, .jsonl or .parquet file as dicts (a JSONL line that is not an object: `__bad__`)."""
    if not path.is_file():
        raise UserError(f"label file not found: {path}")
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, cfg or DataConfig())
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            row = {"__bad__": f"row {number}: not a JSON object"}
        rows.append(row if isinstance(row, dict) else {"__bad__": f"row {number}: not a JSON object"})
    return rows


def _embedded_problem(image: str, raw_path: str, row_counts: dict[str, int]) -> str | None:
    """Why an image id (`file.parquet#N`) names no stored image, or None when it does."""
    parquet, row = embedded.parse_id(image) or ("", 0)
    if parquet not in row_counts:
        try:
            row_counts[parquet] = embedded.row_count(parquet) if os.path.isfile(parquet) else -1
        except (OSError, ValueError):
            row_counts[parquet] = -1
    if row_counts[parquet] < 0:
        return f"{raw_path}: no such regular file (nor a readable Parquet file to hold it)"
    return None if row <= row_counts[parquet] else f"{raw_path}: the file has {row_counts[parquet]} rows"


def _row_problem(
    row: dict, folder: str, cfg: DataConfig, label_problems: dict[str, str | None], row_counts: dict[str, int]
) -> tuple[Assignment | None, str]:
    """The row's image, label and split, or why it cannot be used. Strings, not Paths, and one stat per
    row: a million rows index in seconds. `label_problems` caches the label rule per distinct label,
    `row_counts` the rows of each Parquet file that embedded image ids name."""
    if "__bad__" in row:
        return None, row["__bad__"].split(": ", 1)[1]
    raw_path, label = str(row.get(cfg.path_column) or "").strip(), str(row.get(cfg.label_column) or "").strip()
    if not raw_path:
        return None, f"no {cfg.path_column}"
    if not label:
        return None, "empty label"
    if label not in label_problems:
        label_problems[label] = name_problem(label)
    if label_problems[label] is not None:
        return None, f"bad label: {label_problems[label]}"
    image = os.path.normpath(os.path.join(folder, raw_path))  # lexical: a '..' that climbs out is refused
    if not image.startswith(folder + os.sep):
        return None, f"{raw_path} is outside the label file's folder"
    try:
        regular = stat.S_ISREG(os.stat(image).st_mode)
    except OSError:
        regular = False
    if not regular and embedded.parse_id(image):
        problem = _embedded_problem(image, raw_path, row_counts)
        if problem:
            return None, problem
    elif not regular:
        return None, f"{raw_path}: no such regular file"
    elif not is_image_name(image):
        return None, f"{raw_path}: not an image extension"
    split_value = str(row.get(cfg.split_column) or "").strip().lower()
    if split_value and split_value not in SPLIT_ALIASES:
        return None, f"unknown split '{split_value}' (train, validation, test)"
    return Assignment(Path(image), label, SPLIT_ALIASES.get(split_value, ""), str(row.get("group") or "")), ""


def _label_file(path: Path, cfg: DataConfig, workers: int, folder: Path | None = None) -> Source:
    """A label file's rows (paths relative to `folder`, by default the file's own)."""
    rows = read_rows(path, cfg)
    folder = Path(os.path.abspath(folder or path.parent))
    if rows and "__bad__" not in rows[0]:
        header = rows[0].keys()
        if cfg.path_column not in header:
            raise UserError(f"{path}: no '{cfg.path_column}' column (data.path_column); columns: {', '.join(header)}")
        if cfg.label_column not in header and "class" in header:  # a splits.csv names it "class"
            cfg = replace(cfg, label_column="class")
    kept: dict[Path, Assignment] = {}
    conflicted: set[Path] = set()
    bad: list[str] = []
    label_problems: dict[str, str | None] = {}
    row_counts: dict[str, int] = {}
    for number, row in enumerate(rows, 2 if path.suffix.lower() == ".csv" else 1):  # CSV: the header is row 1
        found, problem = _row_problem(row, str(folder), cfg, label_problems, row_counts)
        if found is None:
            bad.append(f"row {number}: {problem}")
        elif found.path not in kept:
            kept[found.path] = found
        elif kept[found.path].label != found.label:
            conflicted.add(found.path)
            bad.append(f"row {number}: {found.path.relative_to(folder)} listed again with another label "
                       f"('{kept[found.path].label}', '{found.label}'): left out")  # fmt: skip
    for image in conflicted:
        kept.pop(image)
    if not kept:
        raise UserError(f"{path}: no usable rows ({len(bad)} bad)" + (f"; first: {bad[0]}" if bad else ""))
    assignments = list(kept.values())
    plan = None
    if any(not a.split for a in assignments):
        if any(a.split for a in assignments):
            raise UserError(f"{path}: some rows have a split and some do not; give every row one, or none")
        plan = plan_splits([(a.path, a.label) for a in assignments], cfg.split, workers=workers)
        assignments = plan.assignments
    index = _index(folder, assignments, str(path))
    shown = [f"{path}: {line}" for line in bad[:SHOWN_BAD_ROWS]]
    if len(bad) > SHOWN_BAD_ROWS:
        shown.append(f"{path}: {len(bad) - SHOWN_BAD_ROWS} more bad rows")
    index.warnings = shown + (plan.warnings if plan else []) + index.warnings
    return Source(index, plan, bad)


def open_dataset(source: str | Path, cfg: DataConfig | None = None, workers: int = 4) -> Source:
    """The dataset at `source`, whichever of the three forms it has."""
    source, cfg = Path(source), cfg or DataConfig()
    if is_label_file(source):
        return _label_file(source, cfg, workers)
    if not source.is_dir():
        raise UserError(f"dataset folder not found: {source}")
    if find_split_dir(source, "train") is None and not any(find_split_dir(source, s) for s in SPLIT_NAMES):
        return _unsplit(source, cfg, workers)
    index = index_dataset(source)
    if "validation" not in index.splits and cfg.split.carve_validation:
        return _carve_validation(index, cfg, workers)
    return Source(index)


def dataset_root(data: str | Path) -> Path:
    """The folder a dataset's paths are relative to: the folder itself, or a label file's folder."""
    data = Path(data)
    return data.parent if is_label_file(data) else data


def run_split(run_dir: Path | None, data: str | Path, recorded_root: str | None) -> Path | None:
    """The run's splits.csv when `data` is the dataset the run was trained on (its own data source)."""
    if run_dir is None or not recorded_root or not (run_dir / SPLITS_FILE).is_file():
        return None
    return run_dir / SPLITS_FILE if Path(data).resolve() == Path(recorded_root).resolve() else None


def split_samples(
    data: str | Path, split: str, classes: list[str], own_split: Path | None = None, own_first: bool = False
) -> SplitIndex:
    """The images of `split` of `data`, labelled by `classes` (a model's): from the run's own split file
    when given, from a label file's split, or from `data/<split>/` (else `data` itself, laid out by class,
    all its images). A split folder is what it is, unless `own_first`: a fold run of `train --folds`
    drew its validation from the pooled train and validation folders, and only its split file says which."""
    folder_split = not is_label_file(data) and Path(data).is_dir() and find_split_dir(Path(data), split) is not None
    if (folder_split and not (own_first and own_split is not None)) or (own_split is None and not is_label_file(data)):
        folder = resolve_eval_folder(data, split)
        return index_folder(folder, classes, name=split)
    if own_split is not None:
        index = _label_file(own_split, DataConfig(), 4, folder=dataset_root(data)).index
    else:
        index = open_dataset(data).index
    found = index.splits.get(split)
    if found is None:
        raise UserError(f"{own_split or data}: no {split} images")
    lookup = {c: i for i, c in enumerate(classes)}
    samples = []
    for path, target in found.samples:
        name = index.classes[target]
        if name not in lookup:
            raise UserError(
                f"{own_split or data}: class '{name}' is not among the known classes ({', '.join(classes)})"
            )
        samples.append((path, lookup[name]))
    return SplitIndex(split, index.root, samples)


def available_splits(data: str | Path, own_split: Path | None = None, own_first: bool = False) -> set[str]:
    """The splits `split_samples` can give for `data`."""
    if own_first and own_split is not None:
        return set(_label_file(own_split, DataConfig(), 4, folder=dataset_root(data)).index.splits)
    if own_split is None and not is_label_file(data):
        return {name for name in SPLIT_NAMES if find_split_dir(Path(data), name) is not None}
    source = own_split or Path(data)
    index = (
        _label_file(source, DataConfig(), 4, folder=dataset_root(data)).index if own_split else open_dataset(data).index
    )
    return set(index.splits)


def describe_split(plan: SplitPlan, index: DatasetIndex, seed: int) -> str:
    """One line on a split made here: the counts, and what the grouping kept together."""
    counts = ", ".join(f"{len(split.samples)} {name}" for name, split in index.splits.items())
    return (
        f"split made here (data.split.seed {seed}): {counts}; {plan.groups_kept_together} duplicate groups "
        f"({plan.grouped_images} images) each kept in one split ({plan.seconds:.1f}s)"
    )


def split_rows(source: Source) -> list[Assignment]:
    """Every image of the dataset with its split and duplicate group (empty without a plan)."""
    groups = {a.path: a.group for a in source.plan.assignments} if source.plan else {}
    index = source.index
    return [
        Assignment(path, index.classes[target], name, groups.get(path, ""))
        for name, split in index.splits.items()
        for path, target in split.samples
    ]


def write_split_file(data: str | Path, out: Path, cfg: DataConfig | None = None) -> Source:
    """Write the split of `data` (as training would make it) to `out`, a splits.csv that `--data out` then
    uses as it stands. Its paths are relative to its own folder, so it must sit above every image."""
    if out.suffix.lower() != ".csv":
        raise UserError(f"--write-splits must end in .csv, got '{out.name}'")
    source = open_dataset(data, cfg)
    rows = split_rows(source)
    root = Path(os.path.abspath(out.parent))
    outside = next((r.path for r in rows if not Path(os.path.abspath(r.path)).is_relative_to(root)), None)
    if outside is not None:
        raise UserError(f"{out}: write it in {dataset_root(data)} or above: {outside} would be outside its folder")
    atomic_write_text(out, splits_csv(rows, root))
    return source
