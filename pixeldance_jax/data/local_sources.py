"""Listing local collections: which files to read and their captions (no decoding here).

Three layouts (the `source` of a local dataset):

- `video_folder`: videos anywhere under a folder. Captions from a CSV (default
  `<folder>/captions.csv`; columns `file` and `caption`, `file` relative to the folder) or, for a
  video without a row there, a side file with the same stem and `.txt` (`clip.mp4` ->
  `clip.txt`).
- `webvid_csv`: a WebVid-style CSV (`videoid`, `name`, optional `duration` as seconds or
  `PT00H00M12S`, optional `page_dir`) or the same with `path` / `caption` columns; videos are found
  under the folder as `<videoid>.<ext>` (at any depth) or at `path`, relative to the folder (an
  absolute path or one through `..` is not read: the row counts as a missing file).
- `image_folder`: images with captions, exactly like `video_folder`.

CSVs are UTF-8 (with or without a byte order mark); another encoding, or a row with another
number of fields than the header, is an error naming the file and line. Folders are walked
without following symbolic links to folders (a link to a file is read).

Rows with no usable file or caption stay in the listing with `path` or `caption` None: the
build counts and reports them instead of dropping them silently.
"""

import csv
import dataclasses
import hashlib
import io
import os
import re
from typing import Iterable

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_FILE_COLUMNS = ("file", "path", "filename", "video", "image", "videoid")
_CAPTION_COLUMNS = ("caption", "text", "name", "prompt")
_ISO_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One listed example. `path` None: no such file; `caption` None: no caption found."""
  key: str
  path: str | None
  caption: str | None
  duration: float | None = None


def _files_under(folder: str, extensions: tuple[str, ...]) -> list[str]:
  """Paths relative to `folder` (posix separators, sorted) of files with these extensions."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Folder not found: {folder!r}.")
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      if name.lower().endswith(extensions) and not name.startswith("."):
        found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
  return sorted(found)


def _pick_column(fieldnames: Iterable[str], candidates: tuple[str, ...], csv_path: str,
                 what: str) -> str:
  names = {name.strip().lower(): name for name in fieldnames}
  for candidate in candidates:
    if candidate in names:
      return names[candidate]
  raise ValueError(f"{csv_path}: no {what} column; expected one of {list(candidates)}, "
                   f"found {sorted(names)}.")


def _read_csv(csv_path: str) -> tuple[list[dict[str, str]], list[str]]:
  """The rows and header of a UTF-8 CSV (a byte order mark is dropped); another encoding, or
  a row with more or fewer fields than the header, is a ValueError naming the file and line."""
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"Captions file not found: {csv_path!r}.")
  with open(csv_path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = data.count(b"\n", 0, error.start) + 1
    raise ValueError(f"{csv_path}:{line}: not UTF-8 ({error.reason} at byte {error.start}); "
                     "save the captions as UTF-8") from error
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    fieldnames = next(reader, [])
    rows = []
    for fields in reader:
      if not fields:  # Blank line.
        continue
      if len(fields) != len(fieldnames):
        raise ValueError(f"{csv_path}:{reader.line_num}: {len(fields)} fields, the header has "
                         f"{len(fieldnames)} (a caption with a comma needs double quotes)")
      rows.append(dict(zip(fieldnames, fields)))
  except csv.Error as error:
    raise ValueError(f"{csv_path}:{reader.line_num}: {error}") from error
  return rows, fieldnames


def _clean_caption(text: str | None) -> str | None:
  text = " ".join((text or "").split())
  return text or None


def read_captions_csv(csv_path: str) -> dict[str, str | None]:
  """`file` (relative path) -> caption, from a CSV with a file and a caption column."""
  rows, fieldnames = _read_csv(csv_path)
  file_column = _pick_column(fieldnames, _FILE_COLUMNS, csv_path, "file")
  caption_column = _pick_column(fieldnames, _CAPTION_COLUMNS, csv_path, "caption")
  return {os.path.normpath(row[file_column].strip()).replace(os.sep, "/"):
          _clean_caption(row[caption_column]) for row in rows}


def _side_caption(path: str) -> str | None:
  side_file = os.path.splitext(path)[0] + ".txt"
  if not os.path.isfile(side_file):
    return None
  with open(side_file, encoding="utf-8") as f:
    return _clean_caption(f.read())


def list_folder(folder: str, captions: str, extensions: tuple[str, ...]) -> list[Entry]:
  """Every media file under `folder` with its caption (CSV row first, then `.txt` file).

  `captions` is the CSV path; empty means `<folder>/captions.csv` when it exists. CSV rows
  naming a file that is not there are listed with `path=None`.
  """
  csv_path = captions or os.path.join(folder, "captions.csv")
  if captions and not os.path.isfile(captions):
    raise FileNotFoundError(f"Captions file not found: {captions!r}.")
  by_file = read_captions_csv(csv_path) if os.path.isfile(csv_path) else {}
  files = _files_under(folder, extensions)
  entries = []
  for relative in files:
    path = os.path.join(folder, relative)
    caption = by_file[relative] if relative in by_file else _side_caption(path)
    entries.append(Entry(key=relative, path=path, caption=caption))
  present = set(files)
  entries += [Entry(key=relative, path=None, caption=caption)
              for relative, caption in by_file.items() if relative not in present]
  return entries


def parse_duration(text: str | None) -> float | None:
  """Seconds from `12.5` or WebVid's `PT00H00M12S`; None when absent or unparseable."""
  text = (text or "").strip()
  match = _ISO_DURATION.match(text)
  if match and any(match.groups()):
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return 3600 * hours + 60 * minutes + seconds
  try:
    return float(text)
  except ValueError:
    return None


def list_webvid_csv(csv_path: str, video_dir: str) -> list[Entry]:
  """One entry per CSV row; the video is `path` (relative to `video_dir`) or `<videoid>.*`."""
  rows, fieldnames = _read_csv(csv_path)
  file_column = _pick_column(fieldnames, ("path", "videoid", "file", "video"), csv_path,
                             "video id or path")
  caption_column = _pick_column(fieldnames, _CAPTION_COLUMNS, csv_path, "caption")
  by_stem = {}
  if file_column.strip().lower() != "path":
    # One walk instead of probing every extension for every row.
    for relative in _files_under(video_dir, VIDEO_EXTENSIONS):
      by_stem.setdefault(os.path.splitext(os.path.basename(relative))[0], relative)
  entries = []
  for row in rows:
    key = row[file_column].strip()
    relative = key if file_column.strip().lower() == "path" else by_stem.get(key)
    # Paths stay inside the folder: an absolute path or one through ".." is not read.
    inside = relative and not os.path.isabs(relative) and (
        ".." not in relative.replace("\\", "/").split("/"))
    path = os.path.join(video_dir, relative) if inside else None
    if path is not None and not os.path.isfile(path):
      path = None
    entries.append(Entry(key=key, path=path, caption=_clean_caption(row[caption_column]),
                         duration=parse_duration(row.get("duration"))))
  return entries


# What a collection's identity reads besides its media: side captions and caption CSVs.
_CAPTION_EXTENSIONS = (".txt", ".csv")


def listing_digest(folder: str, extensions: tuple[str, ...], *files: str) -> str | None:
  """Short hash of what a collection holds: the name, size and modification time of every
  media or caption file under `folder` (as listed: links to folders not followed) and of
  `files` (a captions CSV elsewhere). None when `folder` is not there."""
  if not os.path.isdir(folder):
    return None
  listed = [(os.path.join(folder, relative), relative)
            for relative in _files_under(folder, tuple(extensions) + _CAPTION_EXTENSIONS)]
  listed += [(path, os.path.abspath(path)) for path in files if path and os.path.isfile(path)]
  digest = hashlib.sha1()
  for path, name in listed:
    stat = os.stat(path)
    digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:10]


def collection_name(base: str, folder: str, extensions: tuple[str, ...], captions: str,
                    built_under: str | None) -> str:
  """`base` + the listing's digest: a collection whose files or captions change is another
  dataset. When `folder` is gone, the one dataset built from it under `built_under` (the
  builder's folder in the data dir) is named; FileNotFoundError when there is none or several."""
  digest = listing_digest(folder, extensions, captions)
  if digest is not None:
    return f"{base}_files{digest}"
  built = sorted(name for name in (os.listdir(built_under) if built_under and os.path.isdir(
      built_under) else []) if name.startswith(f"{base}_files"))
  if len(built) != 1:
    raise FileNotFoundError(
        f"Folder not found: {folder!r}" + (f"; {len(built)} datasets were built from it under "
                                           f"{built_under}, which one is meant is unknown"
                                           if built else "") + ".")
  return built[0]


def path_digest(*paths: str) -> str:
  """Short hash of absolute paths, for dataset names: collections never share files."""
  joined = "|".join(os.path.abspath(path) if path else "" for path in paths)
  return hashlib.sha1(joined.encode("utf-8")).hexdigest()[:10]


def hash_order(entry: Entry) -> str:
  """A sort key that spreads entries over folders and is stable when files are added."""
  return hashlib.sha1(entry.key.encode("utf-8")).hexdigest()
