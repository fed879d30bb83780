"""Annotation readers: COCO JSON (pycocotools), Pascal VOC XML and YOLO txt → one in-memory form.

Every reader returns :class:`RawImage` items whose objects carry a category *key* (COCO
category id, VOC class name, YOLO class index) and the categories it saw; mapping keys to
contiguous labels, clipping and dropping degenerate boxes happen once, in ``data.py``.
Errors name the annotation file (and line or entry) and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from visionpipe.errors import DataError, ImageReadError
from visionpipe.images import BadImage, iter_image_files
from visionpipe.paths import resolve_under


@dataclass
class RawObject:
    """One annotated box: category key, xyxy pixels (unclipped), crowd/difficult flag, area."""

    key: Any
    box: tuple[float, float, float, float]
    crowd: bool = False
    area: float | None = None


@dataclass
class RawImage:
    """One image of an annotation source, before labels are made contiguous."""

    path: str
    image_id: int
    width: int
    height: int
    file_name: str
    source: str
    objects: list[RawObject] = field(default_factory=list)


@dataclass
class RawSplit:
    """What a reader found for one split: images, categories as (key, name) pairs, images it could not read."""

    images: list[RawImage]
    categories: list[tuple[Any, str]]
    files: list[Path] = field(default_factory=list)
    skipped: list[BadImage] = field(default_factory=list)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as :func:`visionpipe.images.read_image` will return it (EXIF rotation applied).

    Raises ImageReadError (a DataError) when the file is missing or its header cannot be read.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ImageReadError(str(path), "file not found") from None
    except Exception as e:
        raise ImageReadError(str(path), f"cannot read image header ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_text(path: Path) -> str:
    """A UTF-8 text file; a file that is not UTF-8 or cannot be read is a DataError naming it (and the line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _number(v: Any, where: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number (got {v!r})") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: not a finite number ({v!r})")
    return x


# ----------------------------------------------------------------------------- COCO


def load_coco_json(path: Path) -> dict[str, Any]:
    """A COCO annotation file, parsed, checked by :func:`check_coco` and with COCO's defaults filled."""
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    return check_coco(data, path)


def is_coco_id(v: Any) -> bool:
    """True for an id COCO tools accept: an int or a str (not a bool)."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """True for an int or float (not a bool) that is finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at(path: Path | str, key: str, i: int, entry: Any) -> str:
    """``file: key[i] (id X)``, the prefix of every message about one entry."""
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{path}: {key}[{i}]" + (f" (id {ident!r})" if is_coco_id(ident) else "")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _id_list(ids: set[Any]) -> str:
    shown = sorted(ids, key=lambda k: (str(type(k)), k))
    return ", ".join(map(repr, shown[:12])) + (", ..." if len(shown) > 12 else "")


def _check_entries(path: Path | str, key: str, entries: list[Any], required: tuple[str, ...]) -> set[Any]:
    """Each entry an object with ``required`` keys and a unique id, all ids of one type; returns the ids."""
    ids: dict[Any, int] = {}
    first_type: type | None = None
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"{path}: {key}[{i}]: must be an object {{...}} (got {_short(e)})")
        at = _at(path, key, i, e)
        for f in required:
            if f not in e:
                raise DataError(f"{at}: {f}: missing")
        v = e["id"]
        if not is_coco_id(v):
            raise DataError(f"{at}: id: must be an integer or a string (got {_short(v)})")
        first_type = first_type or type(v)
        if type(v) is not first_type:
            kind = {int: "an integer", str: "a string"}
            raise DataError(f"{at}: id: {v!r} is {kind[type(v)]} but {key}[0]'s id is {kind[first_type]}; "
                            f"use one type for all {key[:-1].replace('categorie', 'category')} ids")
        if v in ids:
            raise DataError(f"{at}: id: duplicate (also {key}[{ids[v]}])")
        ids[v] = i
    return set(ids)


def _ref(at: str, a: dict[str, Any], field_: str, known: set[Any], what: str) -> None:
    """Check that ``a[field_]`` is present, an id, and one of ``known``."""
    if field_ not in a:
        raise DataError(f"{at}: {field_}: missing")
    v = a[field_]
    if not is_coco_id(v):
        raise DataError(f"{at}: {field_}: must be an integer or a string (got {_short(v)})")
    if v not in known:
        hint = " (a string here, a number there)" if isinstance(v, str) and v.lstrip("-").isdigit() and \
            int(v) in known else ""
        raise DataError(f"{at}: {field_}: {v!r} is not among the {what} ids ({_id_list(known)}){hint}")


def check_coco(data: Any, path: Path | str) -> dict[str, Any]:
    """``data`` checked as a COCO detection document; ``area``, ``iscrowd`` and annotation ids are filled in place.

    Missing ``area`` becomes the bbox's width x height and missing ``iscrowd`` 0. Annotation ids are
    numbered 1..N when none has one, or when some are strings or 0 (pycocotools' matcher needs positive
    numeric ids; a match to id 0 counts as a false positive). A problem raises one DataError naming
    ``path``, the list, the entry's index and id, and the field.
    """
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO detection file (no 'images' list at the top level)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataError(f"{path}: no 'categories' list")
    anns = data.setdefault("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"{path}: 'annotations' must be a list")
    cat_ids = _check_entries(path, "categories", data["categories"], ("id", "name"))
    img_ids = _check_entries(path, "images", data["images"], ("id", "file_name"))
    for i, im in enumerate(data["images"]):
        for f in ("width", "height"):
            v = im.get(f)
            if v is None:
                continue
            if not is_finite_number(v) or v < 0 or v != int(v):
                raise DataError(f"{_at(path, 'images', i, im)}: {f}: must be a whole number of pixels >= 0 "
                                f"(got {_short(v)})")
            im[f] = int(v)
    ann_ids: dict[Any, int] = {}
    without_id: int | None = None
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise DataError(f"{path}: annotations[{i}]: must be an object {{...}} (got {_short(a)})")
        at = _at(path, "annotations", i, a)
        if "id" in a:
            if not is_coco_id(a["id"]):
                raise DataError(f"{at}: id: must be an integer or a string (got {_short(a['id'])})")
            if a["id"] in ann_ids:
                raise DataError(f"{at}: id: duplicate (also annotations[{ann_ids[a['id']]}])")
            ann_ids[a["id"]] = i
        elif without_id is None:
            without_id = i
        if "image_id" in a and is_coco_id(a["image_id"]) and a["image_id"] not in img_ids:
            orphans = sum(1 for b in anns if isinstance(b, dict) and not (is_coco_id(b.get("image_id"))
                                                                          and b["image_id"] in img_ids))
            raise DataError(f"{at}: image_id: {a['image_id']!r} is not in 'images' ({orphans} annotation(s) "
                            "refer to no image)")
        _ref(at, a, "image_id", img_ids, "images'")
        _ref(at, a, "category_id", cat_ids, "categories'")
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DataError(f"{at}: bbox: must be [x, y, width, height] (got {_short(bbox)})")
        if not all(is_finite_number(v) for v in bbox):
            raise DataError(f"{at}: bbox: expected 4 finite numbers (got {_short(bbox)})")
        if "area" in a and not (is_finite_number(a["area"]) and a["area"] >= 0):
            raise DataError(f"{at}: area: must be a number >= 0 (got {_short(a['area'])})")
        if a.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"{at}: iscrowd: must be 0 or 1 (got {_short(a['iscrowd'])})")
        a.setdefault("area", max(bbox[2], 0) * max(bbox[3], 0))
        a.setdefault("iscrowd", 0)
    if ann_ids and without_id is not None:
        raise DataError(f"{path}: annotations[{without_id}]: id: missing (other annotations have one; give every "
                        "annotation an id, or none)")
    if len(ann_ids) < len(anns) or any(isinstance(k, str) or k == 0 for k in ann_ids):
        for n, a in enumerate(anns, 1):
            a["id"] = n
    return data


def coco_index(data: dict[str, Any]) -> Any:
    """A pycocotools COCO object over already-loaded data, without its prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_coco(json_path: Path, image_root: Path) -> RawSplit:
    """Images and boxes of a COCO file; ``file_name`` must stay inside ``image_root``."""
    data = load_coco_json(json_path)
    coco = coco_index(data)
    cats = [(c["id"], str(c["name"])) for c in sorted(data["categories"], key=lambda c: c["id"])]
    images: list[RawImage] = []
    for im in data["images"]:
        path = resolve_under(image_root, str(im["file_name"]), what=f"{json_path}: image id {im['id']} file_name")
        rec = RawImage(str(path), im["id"], im.get("width") or 0, im.get("height") or 0, str(im["file_name"]),
                       str(json_path))
        for a in coco.imgToAnns.get(im["id"], []):
            x, y, bw, bh = (float(v) for v in a["bbox"])
            rec.objects.append(RawObject(a["category_id"], (x, y, x + bw, y + bh), bool(a["iscrowd"]),
                                         float(a["area"])))
        images.append(rec)
    return RawSplit(images, cats, [json_path])


# ----------------------------------------------------------------------------- Pascal VOC


def _text(node: ET.Element, tag: str, where: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    return found.text.strip()


def parse_voc_xml(xml_path: Path, image_root: Path, image_id: int) -> RawImage:
    """One Pascal VOC annotation file (1-based inclusive pixel boxes → 0-based xyxy)."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{xml_path}: malformed XML: {e}") from None
    except OSError as e:
        raise DataError(f"{xml_path}: cannot read ({e.strerror or e})") from None
    if root.tag != "annotation":
        raise DataError(f"{xml_path}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    where = str(xml_path)
    file_name = _text(root, "filename", where)
    path = resolve_under(image_root, file_name, what=f"{xml_path}: <filename>")
    w = h = 0
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        w = int(_number(_text(size, "width", where), f"{where}: <size><width>"))
        h = int(_number(_text(size, "height", where), f"{where}: <size><height>"))
    rec = RawImage(str(path), image_id, w, h, file_name, where)
    for k, obj in enumerate(root.findall("object")):
        ow = f"{where}: object {k + 1}"
        name = _text(obj, "name", ow)
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{ow} ({name}): missing <bndbox>")
        x1, y1, x2, y2 = (_number(_text(bb, t, ow), f"{ow} <{t}>") for t in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.find("difficult")
        hard = difficult is not None and (difficult.text or "0").strip() == "1"
        rec.objects.append(RawObject(name, (x1 - 1, y1 - 1, x2, y2), hard))
    return rec


def read_voc(root: Path, ann: str | None, images: str | None, split: str) -> RawSplit:
    """A VOC split: a folder of XML files, or an ImageSets .txt list of ids (XMLs in root/Annotations)."""
    ann_path = resolve_under(root, ann or "Annotations", what=f"load.{split}.annotations")
    image_root = resolve_under(root, images or "JPEGImages", what=f"load.{split}.images")
    if ann_path.is_dir():
        xmls = sorted(ann_path.rglob("*.xml"))
        files: list[Path] = []
    elif ann_path.is_file():
        xml_dir = resolve_under(root, "Annotations", what="Annotations")
        xmls = []
        for lineno, line in enumerate(read_text(ann_path).splitlines(), 1):
            stem = line.split()[0] if line.strip() else ""
            if stem and not stem.startswith("#"):
                xmls.append(resolve_under(xml_dir, stem + ".xml", what=f"{ann_path}:{lineno}"))
        files = [ann_path]
    else:
        raise DataError(f"load.{split}.annotations: {ann_path} is neither a folder of XML files nor a list file")
    if not xmls:
        raise DataError(f"load.{split}.annotations: no .xml files in {ann_path}")
    recs = [parse_voc_xml(x, image_root, i + 1) for i, x in enumerate(xmls)]
    names = sorted({o.key for r in recs for o in r.objects})
    return RawSplit(recs, [(n, n) for n in names], files)


# ----------------------------------------------------------------------------- YOLO


def yolo_class_names(root: Path) -> list[str] | None:
    """Class names from root/classes.txt (one a line) or root/data.yaml ``names``, if present.

    Line i of classes.txt (blank lines skipped), item i of a ``names`` list or key i of a ``names``
    mapping is class i; a repeated name, or mapping keys that are not 0..N-1, is a DataError.
    """
    txt = root / "classes.txt"
    if txt.is_file():
        first: dict[str, int] = {}
        for lineno, ln in enumerate(read_text(txt).splitlines(), 1):
            name = ln.strip()
            if name in first:
                raise DataError(f"{txt}:{lineno}: class name '{name}' again (first on line {first[name]})")
            if name:
                first[name] = lineno
        return list(first)
    for name in ("data.yaml", "dataset.yaml"):
        y = root / name
        if y.is_file():
            try:
                doc = yaml.safe_load(read_text(y))
            except yaml.YAMLError as e:
                raise DataError(f"{y}: invalid YAML ({e})") from None
            names = doc.get("names") if isinstance(doc, dict) else None
            if isinstance(names, dict):
                if not all(type(k) is int for k in names) or set(names) != set(range(len(names))):
                    raise DataError(f"{y}: names: keys must be the class ids 0..{len(names) - 1} "
                                    f"(got {', '.join(map(repr, names))})")
                names = [names[k] for k in range(len(names))]
            if isinstance(names, list):
                out = [str(n) for n in names]
                dup = next((n for i, n in enumerate(out) if n in out[:i]), None)
                if dup is not None:
                    raise DataError(f"{y}: names: class name '{dup}' appears twice")
                return out
    return None


def parse_yolo_txt(txt: Path, width: int, height: int, num_classes: int) -> list[RawObject]:
    """``class cx cy w h`` lines (normalized 0..1) → objects in pixels; errors name file and line."""
    objs: list[RawObject] = []
    try:
        text = txt.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{txt}: not UTF-8 text ({e.reason})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{txt}:{lineno}"
        if len(parts) != 5:
            raise DataError(f"{where}: expected 'class cx cy w h' (5 values), got {len(parts)}: {line.strip()!r}")
        try:
            cls = int(parts[0])
        except ValueError:
            raise DataError(f"{where}: class must be an integer (got {parts[0]!r})") from None
        if not 0 <= cls < num_classes:
            raise DataError(f"{where}: class {cls} out of range (0..{num_classes - 1}, {num_classes} class names)")
        cx, cy, w, h = (_number(p, where) for p in parts[1:])
        if w < 0 or h < 0:
            raise DataError(f"{where}: negative width/height")
        objs.append(RawObject(cls, ((cx - w / 2) * width, (cy - h / 2) * height,
                                    (cx + w / 2) * width, (cy + h / 2) * height)))
    return objs


def read_yolo(root: Path, ann: str | None, images: str | None, split: str, classes: list[str]) -> RawSplit:
    """A YOLO split: images under ``images``, one ``.txt`` per image under the labels folder (none = negative).

    An image with labels whose size cannot be read is left out and listed in ``skipped``.
    """
    if images is None:
        raise DataError(f"load.{split}.images: required for yolo (e.g. images/{split})")
    image_root = resolve_under(root, images, what=f"load.{split}.images")
    if not image_root.is_dir():
        raise DataError(f"load.{split}.images: {image_root} is not a folder")
    if ann is None:
        rel = Path(images)
        if "images" not in rel.parts:
            raise DataError(f"load.{split}.annotations: give the labels folder (cannot derive it from "
                            f"'{images}', which has no 'images' component)")
        ann = str(Path(*["labels" if p == "images" else p for p in rel.parts]))
    label_root = resolve_under(root, ann, what=f"load.{split}.annotations")
    recs: list[RawImage] = []
    skipped: list[BadImage] = []
    for i, p in enumerate(iter_image_files(image_root)):
        rel = p.relative_to(image_root)
        txt = label_root / rel.with_suffix(".txt")
        rec = RawImage(str(p), i + 1, 0, 0, str(rel), str(txt))
        if txt.is_file():
            try:
                w, h = image_size(p)
            except ImageReadError as e:
                skipped.append(BadImage(e.path, e.reason))
                continue
            rec.width, rec.height = w, h
            rec.objects = parse_yolo_txt(txt, w, h, len(classes))
        recs.append(rec)
    if not recs and not skipped:
        raise DataError(f"load.{split}.images: no images in {image_root}")
    return RawSplit(recs, list(enumerate(classes)), [], skipped)
