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
    """The parsed and shape-checked content of a COCO annotation file."""
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO detection file (no 'images' list at the top level)")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataError(f"{path}: no 'categories' list")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' must be a list")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{path}: categories[{i}] needs 'id' and 'name' (got {c!r})")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name' (got {str(im)[:120]})")
    data.setdefault("annotations", [])
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
    ids = [im["id"] for im in data["images"]]
    if len(set(ids)) != len(ids):
        raise DataError(f"{json_path}: duplicate image ids")
    coco = coco_index(data)
    cats = [(c["id"], str(c["name"])) for c in sorted(data["categories"], key=lambda c: c["id"])]
    known = {c for c, _ in cats}
    images: list[RawImage] = []
    for im in data["images"]:
        where = f"{json_path}: image id {im['id']}"
        path = resolve_under(image_root, str(im["file_name"]), what=f"{where} file_name")
        w, h = im.get("width"), im.get("height")
        rec = RawImage(str(path), im["id"], int(w) if w else 0, int(h) if h else 0, str(im["file_name"]),
                       str(json_path))
        for a in coco.imgToAnns.get(im["id"], []):
            aw = f"{json_path}: annotation id {a.get('id')}"
            if a.get("category_id") not in known:
                raise DataError(f"{aw}: unknown category_id {a.get('category_id')!r}")
            bbox = a.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DataError(f"{aw}: bbox must be [x, y, width, height] (got {bbox!r})")
            x, y, bw, bh = (_number(v, f"{aw} bbox") for v in bbox)
            area = a.get("area")
            rec.objects.append(RawObject(a["category_id"], (x, y, x + bw, y + bh), bool(a.get("iscrowd", 0)),
                                         float(area) if isinstance(area, (int, float)) else None))
        images.append(rec)
    orphans = [a.get("id") for a in data["annotations"] if a.get("image_id") not in coco.imgs]
    if orphans:
        raise DataError(f"{json_path}: annotation id {orphans[0]} refers to an image_id that is not in 'images' "
                        f"({len(orphans)} such annotation(s))")
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
        for lineno, line in enumerate(ann_path.read_text(encoding="utf-8").splitlines(), 1):
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
    """Class names from root/classes.txt (one a line) or root/data.yaml ``names``, if present."""
    txt = root / "classes.txt"
    if txt.is_file():
        return [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for name in ("data.yaml", "dataset.yaml"):
        y = root / name
        if y.is_file():
            try:
                names = (yaml.safe_load(y.read_text(encoding="utf-8")) or {}).get("names")
            except yaml.YAMLError as e:
                raise DataError(f"{y}: invalid YAML ({e})") from None
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
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
