"""Find and read raw documents: text and Markdown files, JSON/JSONL/CSV/Parquet records, saved datasets."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sdgrpo.errors import UserError
from sdgrpo.textio import TextDecodeError, decode_text

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
RECORD_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass
class Document:
    text: str
    source: str  # file path, with ":line" or "#row" for records


@dataclass
class ReadReport:
    files_read: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"


def is_saved_dataset(path: Path) -> bool:
    try:
        return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json",
                                                                   "state.json"))
    except OSError:  # a folder that cannot be searched: not one (walking it reports why)
        return False


def _records_text(records: Iterator[tuple[str, dict]], text_field: str) -> Iterator[Document]:
    for loc, rec in records:
        if not isinstance(rec, dict) or text_field not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{loc}: no field {text_field!r} (found {keys}); pass --text_field NAME")
        value = rec[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(f"{loc}: field {text_field!r} is {type(value).__name__}, not text")
        yield Document(value.replace("\r\n", "\n"), loc)


def _read_jsonl(path: Path, text: str, text_field: str) -> Iterator[Document]:
    def records():
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None

    yield from _records_text(records(), text_field)


def _read_json(path: Path, text: str, text_field: str) -> Iterator[Document]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict) and text_field not in data:
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects with a {text_field!r} field")
    yield from _records_text(((f"{path}#{i}", r) for i, r in enumerate(data)), text_field)


def _read_csv(path: Path, text: str, text_field: str) -> Iterator[Document]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise UserError(f"{path}: no column {text_field!r} (columns: {reader.fieldnames}); pass --text_field NAME")
    yield from _records_text(((f"{path}:{i + 2}", r) for i, r in enumerate(reader)), text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in schema.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {schema.names}); pass --text_field NAME")
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    yield from _records_text(((f"{path}#{i}", {text_field: v}) for i, v in enumerate(column)), text_field)


def _read_saved_dataset(path: Path, text_field: str) -> Iterator[Document]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    splits = ds.items() if isinstance(ds, DatasetDict) else [("", ds)]
    for name, split in splits:
        if text_field not in split.column_names:
            raise UserError(f"{path}: dataset has no column {text_field!r} (columns: {split.column_names}); "
                            "pass --text_field NAME")
        for i, value in enumerate(split[text_field]):
            if value:
                yield Document(value.replace("\r\n", "\n"), f"{path}[{name}]#{i}")


def _read_file(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    text = decode_text(path.read_bytes(), str(path))
    if suffix in TEXT_SUFFIXES:
        yield Document(text, str(path))
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text, text_field)
    elif suffix == ".json":
        yield from _read_json(path, text, text_field)
    elif suffix == ".csv":
        yield from _read_csv(path, text, text_field)


@dataclass
class _Walk:
    """What a walk over folders found besides the files it returns, each reported in one warning."""

    ignored: list[str] = field(default_factory=list)  # files of a type sdgrpo does not read
    looped: list[str] = field(default_factory=list)  # symlinks to a folder or file already reached
    unreadable: list[str] = field(default_factory=list)  # "path (why)": folders that cannot be listed, files read

    def warn(self, report: ReadReport, unreadable: bool) -> None:
        """One warning per kind (files of other types and symlinks once the walk is done; what could not be read,
        folders and files together, once the files are read), each listed in ``report.skipped``."""
        kinds = [("unreadable", "unreadable file(s) or folder(s)", "unreadable")] if unreadable else [
            ("ignored", "file(s) of a type sdgrpo does not read (.txt .md .jsonl .json .csv .parquet)",
             "not a text or record file"),
            ("looped", "link(s) to a folder or file already read (a loop or a second path; each is read once)",
             "a link to what was already read")]
        for attr, what, why in kinds:
            items = getattr(self, attr)
            if items:
                shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
                logger.warning("skipping %d %s: %s", len(items), what, shown)
                report.skipped.extend(f"{item}: {why}" for item in items)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()  # follows symlinks: a folder or file is the same one by whatever path it is reached
    return st.st_dev, st.st_ino


def _walk(folder: Path, top: Path, seen: set, walk: _Walk, files: list[Path]) -> None:
    """The files (and saved-dataset folders) under ``folder``, sorted, into ``files``; hidden entries skipped,
    symlinked folders followed once (``seen``: the folders and files reached so far, by device and inode), what
    cannot be listed or reached counted in ``walk``."""
    try:
        children = sorted(folder.iterdir())
    except OSError as err:
        walk.unreadable.append(f"{folder} ({err.strerror or type(err).__name__})")
        return
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            identity = _identity(child)
        except OSError as err:  # a dangling symlink, a file gone since the listing
            walk.unreadable.append(f"{child} ({err.strerror or type(err).__name__})")
            continue
        if identity in seen:
            walk.looped.append(str(child.relative_to(top)) if child.is_relative_to(top) else str(child))
            continue
        seen.add(identity)
        if is_saved_dataset(child):
            files.append(child)
        elif child.is_dir():
            _walk(child, top, seen, walk, files)
        elif child.is_file():
            if child.suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES:
                files.append(child)
            else:
                walk.ignored.append(str(child))


def _expand(paths: list[str], walk: _Walk) -> list[Path]:
    """The files (and saved-dataset folders) under ``paths`` (see :func:`_walk`)."""
    files: list[Path] = []
    seen: set = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"{raw}: no such file or directory")
        if is_saved_dataset(path) or path.is_file():
            files.append(path)
        else:
            seen.add(_identity(path))
            found: list[Path] = []
            _walk(path, path, seen, walk, found)
            files += sorted(found)  # the order of a sorted recursive listing, whatever links were followed
    return files


def iter_documents(paths: list[str], text_field: str = "text", report: ReadReport | None = None) -> Iterator[Document]:
    """Yield every usable document under ``paths`` (files or directories, recursively), one file at a time.

    A file that is not UTF-8 is skipped with a warning while other files are usable; if nothing usable was found,
    :class:`UserError` is raised once the walk is done. In folders, symlinked subfolders are followed once (a loop or
    a second path to a folder already read is skipped), and what cannot be read (a folder that cannot be listed, a
    file that cannot be opened) is skipped: each kind is one warning with its count, and listed in
    ``report.skipped``. A file named on its own that cannot be read is an error.
    """
    report = report if report is not None else ReadReport()
    walk = _Walk()
    files = _expand(paths, walk)
    named = {Path(p) for p in paths}
    walk.warn(report, unreadable=False)
    found_any = False
    for path in files:
        if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES | RECORD_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .md, .jsonl, .json, .csv, "
                            ".parquet or a dataset folder saved with save_to_disk")
        try:
            found = list(_read_saved_dataset(path, text_field) if path.is_dir() else _read_file(path, text_field))
        except TextDecodeError as err:
            if len(files) == 1:
                raise UserError(str(err)) from None
            logger.warning("skipping %s", err)
            report.skipped.append(str(err))
            continue
        except OSError as err:
            if path in named:
                why = "permission denied; make the file readable" if isinstance(err, PermissionError) else (
                    f"cannot be read ({err.strerror or err})")
                raise UserError(f"{path}: {why}") from None
            walk.unreadable.append(f"{path} ({err.strerror or type(err).__name__})")
            continue
        report.files_read += 1
        for doc in found:
            if doc.text.strip():
                found_any = True
                yield doc
        del found
    walk.warn(report, unreadable=True)
    if not found_any:
        where = ", ".join(paths)
        raise UserError(f"{where}: no usable text found (looked for .txt, .md, .jsonl, .json, .csv, .parquet "
                        "and saved datasets, with non-empty text)")


def read_documents(paths: list[str], text_field: str = "text", report: ReadReport | None = None) -> list[Document]:
    """Every usable document under ``paths`` as a list (see :func:`iter_documents`)."""
    return list(iter_documents(paths, text_field, report))
