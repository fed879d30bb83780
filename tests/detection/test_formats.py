"""Each annotation layout on tiny data; empty images; clipping; clear errors for bad annotations."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.detection.conftest import write_png
from visionpipe.errors import DataError, UnsafePathError
from visionpipe_plugins.detection.config import DetectionAugmentConfig, LoadConfig
from visionpipe_plugins.detection.data import DetectionDataset, build_train_transform, collate, load_splits
from visionpipe_plugins.detection.formats import coco_index, load_coco_json
from visionpipe_plugins.detection.metrics import coco_evaluate


def load(**kw):
    return load_splits(LoadConfig(**kw))


# ----------------------------------------------------------------------------- COCO


def test_generated_coco_dataset_loads_with_contiguous_labels(shapes_root: Path) -> None:
    split = {"annotations": "annotations/{}.json", "images": "images"}
    records, cats, bad, inputs, stats = load(
        format="coco", root=str(shapes_root),
        **{s: {k: v.format(s) for k, v in split.items()} for s in ("train", "val", "test")})
    assert cats.names == ["circle", "square", "triangle", "cross"]
    assert cats.ids == [1, 2, 3, 4]
    assert [len(records[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert not bad and len(inputs) == 3
    for recs in records.values():
        for r in recs:
            assert Path(r.path).is_file()
            assert set(r.labels.tolist()) <= {1, 2, 3, 4}
            assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 0] >= 0).all()
            assert (r.boxes[:, 2:] <= 48).all()
    assert stats["train"]["boxes"] == sum(len(r.labels) for r in records["train"])


def test_generator_boxes_are_tight_around_the_painted_shape(shapes_root: Path) -> None:
    doc = json.loads((shapes_root / "annotations" / "train.json").read_text())
    ann = doc["annotations"][0]
    assert ann["area"] <= ann["bbox"][2] * ann["bbox"][3]
    assert ann["bbox"][2] >= 4 and ann["bbox"][3] >= 4


def test_coco_maps_category_ids_keeps_empty_images_clips_and_drops_degenerate(coco_root: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        records, cats, *_ = load(format="coco", root=str(coco_root),
                                 train={"annotations": "train.json", "images": "imgs"})
    assert cats.ids == [3, 7] and cats.names == ["cat", "dog"]
    by_id = {r.image_id: r for r in records["train"]}
    a = by_id[10]
    assert a.labels.tolist() == [1, 2]
    np.testing.assert_allclose(a.boxes[1], [40, 30, 50, 40])  # clipped to the 50x40 image
    assert len(by_id[11].labels) == 0  # a negative, kept
    assert by_id[12].crowd.tolist() == [True]
    assert "dropped 1 degenerate box" in caplog.text and "train.json" in caplog.text


def test_crowd_boxes_are_left_out_of_training_targets_but_kept_for_evaluation(coco_root: Path) -> None:
    records, *_ = load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"})
    rec = [r for r in records["train"] if r.image_id == 12]
    assert len(DetectionDataset(rec, train=True)[0][1]["boxes"]) == 0
    _, target = DetectionDataset(rec, train=False)[0]
    assert target["iscrowd"].tolist() == [1]


def test_coco_classes_subset_keeps_only_those(coco_root: Path) -> None:
    records, cats, *_ = load(format="coco", root=str(coco_root), classes=["dog"],
                             train={"annotations": "train.json", "images": "imgs"})
    assert cats.names == ["dog"] and cats.ids == [7]
    assert all(set(r.labels.tolist()) <= {1} for r in records["train"])


def test_images_not_the_size_their_annotations_give_are_warned_about(coco_root: Path, caplog) -> None:
    """An EXIF-rotated JPEG annotated in its stored orientation: its box fell outside the decoded image, silently."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the 50x40 stored pixels decode as 40x50
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(coco_root / "imgs" / "a.jpg", exif=exif)
    doc = json.loads((coco_root / "train.json").read_text())
    doc["images"][0]["file_name"] = "a.jpg"
    (coco_root / "train.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"})
    assert re.search(r"load\.train: 1 image\(s\) are not the size their annotations give.*train\.json: a\.jpg is "
                     r"40x50 pixels, annotated 50x40 \(EXIF orientation\?\)", caplog.text)


def test_a_class_with_another_id_in_another_split_is_an_error(coco_root: Path) -> None:
    """Splits exported separately may number classes differently: 'dog' became two labels, trained on one and
    scored on the other (AP 0, no message)."""
    doc = json.loads((coco_root / "train.json").read_text())
    doc["categories"] = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}]
    doc["annotations"] = [dict(a, category_id=8) for a in doc["annotations"] if a["category_id"] == 7]
    (coco_root / "val.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"load\.val: category 'dog' has id 8 here but 7 in load\.train; give each "
                                        r"class the same id in every split"):
        load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"},
             val={"annotations": "val.json", "images": "imgs"})


def test_coco_file_name_escaping_the_image_root_is_refused(coco_root: Path) -> None:
    doc = json.loads((coco_root / "train.json").read_text())
    doc["images"][0]["file_name"] = "../../etc/passwd"
    (coco_root / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(UnsafePathError, match=r"bad\.json: image id 10 file_name '../../etc/passwd'.*outside"):
        load(format="coco", root=str(coco_root), train={"annotations": "bad.json", "images": "imgs"})


def test_coco_malformed_json_names_file_and_line(coco_root: Path) -> None:
    (coco_root / "broken.json").write_text('{"images": [\n  {"id": 1,\n')
    with pytest.raises(DataError, match=r"broken\.json:\d+: malformed JSON"):
        load(format="coco", root=str(coco_root), train="broken.json")


def _set(d: dict, key: str, i: int, **kw) -> None:
    d[key][i].update(kw)


def _pop(d: dict, key: str, i: int, field: str) -> None:
    d[key][i].pop(field)


def _mixed_category_ids(d: dict) -> None:
    d["categories"][1]["id"] = "7"
    for a in d["annotations"]:
        if a["category_id"] == 7:
            a["category_id"] = "7"


# (change to the coco_root file, what the error must say after "<file>: ")
BAD_COCO = [
    (lambda d: _set(d, "annotations", 0, category_id=99),
     r"annotations\[0\] \(id 1\): category_id: 99 is not among the categories' ids \(3, 7\)"),
    (lambda d: _set(d, "annotations", 0, category_id="3"),
     r"annotations\[0\] \(id 1\): category_id: '3' is not among .* \(a string here, a number there\)"),
    (lambda d: _set(d, "annotations", 0, category_id=[3]),
     r"annotations\[0\] \(id 1\): category_id: must be an integer or a string \(got \[3\]\)"),
    (lambda d: _pop(d, "annotations", 0, "category_id"), r"annotations\[0\] \(id 1\): category_id: missing"),
    (lambda d: _pop(d, "annotations", 1, "image_id"), r"annotations\[1\] \(id 2\): image_id: missing"),
    (lambda d: _set(d, "annotations", 0, image_id=999),
     r"annotations\[0\] \(id 1\): image_id: 999 is not in 'images' \(1 annotation\(s\) refer to no image\)"),
    (lambda d: _set(d, "annotations", 0, bbox=[1, 2, 3]),
     r"annotations\[0\] \(id 1\): bbox: must be \[x, y, width, height\] \(got \[1, 2, 3\]\)"),
    (lambda d: _set(d, "annotations", 0, bbox=[1, "x", 3, 4]), r"annotations\[0\] \(id 1\): bbox: expected 4 finite"),
    (lambda d: _set(d, "annotations", 0, bbox=[1, float("nan"), 3, 4]), r"annotations\[0\] \(id 1\): bbox: expected 4 finite numbers"),
    (lambda d: _set(d, "annotations", 0, bbox="abc"), r"annotations\[0\] \(id 1\): bbox: must be \[x, y, width, height\]"),
    (lambda d: _set(d, "annotations", 0, area="big"), r"annotations\[0\] \(id 1\): area: must be a number >= 0 \(got 'big'\)"),
    (lambda d: _set(d, "annotations", 0, iscrowd=2), r"annotations\[0\] \(id 1\): iscrowd: must be 0 or 1 \(got 2\)"),
    (lambda d: d["annotations"].append(5), r"annotations\[4\]: must be an object \{\.\.\.\} \(got 5\)"),
    (lambda d: _pop(d, "annotations", 2, "id"),
     r"annotations\[2\]: id: missing \(other annotations have one; give every annotation an id, or none\)"),
    (lambda d: _set(d, "annotations", 1, id=1), r"annotations\[1\] \(id 1\): id: duplicate \(also annotations\[0\]\)"),
    (lambda d: _set(d, "annotations", 0, id=[1]), r"annotations\[0\]: id: must be an integer or a string"),
    (lambda d: d.update(annotations={}), r"'annotations' must be a list"),
    (lambda d: _set(d, "images", 0, width="abc"),
     r"images\[0\] \(id 10\): width: must be a whole number of pixels >= 0 \(got 'abc'\)"),
    (lambda d: _set(d, "images", 1, height=-3), r"images\[1\] \(id 11\): height: must be a whole number"),
    (lambda d: _set(d, "images", 0, id=[10]), r"images\[0\]: id: must be an integer or a string \(got \[10\]\)"),
    (lambda d: _set(d, "images", 1, id=10), r"images\[1\] \(id 10\): id: duplicate \(also images\[0\]\)"),
    (lambda d: _set(d, "images", 1, id="11"),
     r"images\[1\] \(id '11'\): id: '11' is a string but images\[0\]'s id is an integer; use one type"),
    (lambda d: _pop(d, "images", 0, "file_name"), r"images\[0\] \(id 10\): file_name: missing"),
    (lambda d: d["images"].append("x.png"), r"images\[3\]: must be an object"),
    (lambda d: d.pop("categories"), r"no 'categories'"),
    (_mixed_category_ids,
     r"categories\[1\] \(id '7'\): id: '7' is a string but categories\[0\]'s id is an integer; use one type "
     r"for all category ids"),
    (lambda d: _set(d, "categories", 1, id=3), r"categories\[1\] \(id 3\): id: duplicate \(also categories\[0\]\)"),
    (lambda d: _pop(d, "categories", 0, "name"), r"categories\[0\] \(id 3\): name: missing"),
]


@pytest.mark.parametrize("mutate, message", BAD_COCO)
def test_coco_bad_annotations_are_one_line_errors_naming_file_entry_and_field(coco_root: Path, mutate,
                                                                              message: str) -> None:
    doc = json.loads((coco_root / "train.json").read_text())
    mutate(doc)
    (coco_root / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as e:
        load(format="coco", root=str(coco_root), train={"annotations": "bad.json", "images": "imgs"})
    assert re.match(rf"{re.escape(str(coco_root / 'bad.json'))}: {message}", str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_coco_without_ids_area_or_iscrowd_loads_with_coco_defaults(coco_root: Path) -> None:
    doc = json.loads((coco_root / "train.json").read_text())
    for a in doc["annotations"]:
        del a["id"], a["area"], a["iscrowd"]
    doc["annotations"][0]["bbox"] = [5, 5, 60, 10]  # leaves the 50 px image: the area is still the bbox's
    doc["images"][0]["width"] = 0  # 0 = unknown: read from the file
    (coco_root / "plain.json").write_text(json.dumps(doc))
    data = load_coco_json(coco_root / "plain.json")
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4]
    assert [a["area"] for a in data["annotations"]] == [600, 400, 0, 900]
    assert [a["iscrowd"] for a in data["annotations"]] == [0, 0, 0, 0]
    records, *_ = load(format="coco", root=str(coco_root), train={"annotations": "plain.json", "images": "imgs"})
    by_id = {r.image_id: r for r in records["train"]}
    assert by_id[10].areas.tolist() == [600, 400] and by_id[12].crowd.tolist() == [False]
    assert (by_id[10].width, by_id[10].height) == (50, 40)


def test_coco_string_ids_load_and_annotation_ids_pycocotools_cannot_match_are_renumbered(coco_root: Path) -> None:
    doc = json.loads((coco_root / "train.json").read_text())
    for c in doc["categories"]:
        c["id"] = f"c{c['id']}"
    for im in doc["images"]:
        im["id"] = f"img{im['id']}"
    for k, a in enumerate(doc["annotations"]):
        a.update(id=k, category_id=f"c{a['category_id']}", image_id=f"img{a['image_id']}")  # ids from 0
    (coco_root / "str.json").write_text(json.dumps(doc))
    records, cats, *_ = load(format="coco", root=str(coco_root), train={"annotations": "str.json", "images": "imgs"})
    assert cats.ids == ["c3", "c7"] and {r.image_id for r in records["train"]} == {"img10", "img11", "img12"}
    data = load_coco_json(coco_root / "str.json")
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4]
    # a ground truth with annotation id 0 scores a perfect detection as perfect
    gt = coco_index(data)
    perfect = [{"image_id": "img10", "category_id": "c3", "bbox": [5, 5, 15, 10], "score": 0.9}]
    metrics, _ = coco_evaluate(gt, perfect, image_ids=["img10"])
    assert metrics["AP/cat"] == pytest.approx(1.0)


def test_bad_coco_file_stops_the_load_stage_with_one_line(coco_root: Path, tmp_path: Path) -> None:
    doc = json.loads((coco_root / "train.json").read_text())
    del doc["annotations"][0]["category_id"]
    (coco_root / "bad.json").write_text(json.dumps(doc))
    proc = run_cli("run", str(REPO / "pipelines" / "detect.yaml"), "--set", "stages=[load]",
                   "--set", f"load.root={coco_root}", "--set", "load.generate=null", "--set", "load.val=null",
                   "--set", "load.test=null", "--set", "load.train={annotations: bad.json, images: imgs}",
                   "--run-dir", str(tmp_path / "run"), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert f"error: {coco_root / 'bad.json'}: annotations[0] (id 1): category_id: missing" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_missing_images_all_is_an_error_some_is_skipped(coco_root: Path) -> None:
    with pytest.raises(DataError, match=r"none of its 3 image\(s\) exist.*check load.train.images"):
        load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "nowhere"})
    (coco_root / "imgs" / "b.png").unlink()
    (coco_root / "imgs" / "sub" / "c.png").write_bytes(b"not a png")
    records, _, bad, *_ = load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"})
    assert [r.image_id for r in records["train"]] == [10]
    reasons = {Path(b.path).name: b.reason for b in bad}
    assert "file not found" in reasons["b.png"] and "c.png" in reasons


def _unreadable_images(folder: Path) -> None:
    """A text file named .jpg and a zero-byte .png: their headers cannot be read."""
    (folder / "text.jpg").write_text("this is not a picture")
    (folder / "empty.png").write_bytes(b"")


def test_coco_images_without_size_that_cannot_be_read_are_skipped(coco_root: Path) -> None:
    _unreadable_images(coco_root / "imgs")
    doc = json.loads((coco_root / "train.json").read_text())
    doc["images"] += [{"id": 20, "file_name": "text.jpg"}, {"id": 21, "file_name": "empty.png"},
                      {"id": 22, "file_name": "a.png"}]  # no width/height: read from the image header
    doc["annotations"] += [{"id": 10 + i, "image_id": i, "category_id": 3, "bbox": [1, 1, 5, 5]} for i in (20, 21, 22)]
    (coco_root / "train.json").write_text(json.dumps(doc))
    for check in (True, False):  # the size is needed to clip boxes: skipped even without the image check
        records, _, bad, *_ = load(format="coco", root=str(coco_root), check_images=check,
                                   train={"annotations": "train.json", "images": "imgs"})
        assert [r.image_id for r in records["train"]] == [10, 11, 12, 22]
        assert sorted(Path(b.path).name for b in bad) == ["empty.png", "text.jpg"]
        assert all("cannot read image header" in b.reason for b in bad)


def test_yolo_images_that_cannot_be_read_are_skipped(yolo_root: Path) -> None:
    _unreadable_images(yolo_root / "images" / "train")
    for name in ("text", "empty"):
        (yolo_root / "labels" / "train" / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    records, _, bad, *_ = load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    assert sorted(Path(r.path).name for r in records["train"]) == ["a.png", "b.png", "c.png"]
    assert sorted(Path(b.path).name for b in bad) == ["empty.png", "text.jpg"]


def test_unreadable_yolo_images_go_to_data_errors(yolo_root: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    _unreadable_images(yolo_root / "images" / "train")
    for name in ("text", "empty"):
        (yolo_root / "labels" / "train" / f"{name}.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    p = tmp_path / "det.yaml"
    p.write_text(f"task: detection\nname: det\nload: {{format: yolo, root: {yolo_root}, train: {{images: images/train}}}}\n")
    proc = run_cli("run", str(p), "--run-dir", "r", cwd=tmp_path, timeout=300)  # the load stage alone
    errors = [json.loads(x) for x in (tmp_path / "r" / "data_errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["empty.png", "text.jpg"]
    assert "2 unreadable input(s) skipped" in " ".join((proc.stdout + proc.stderr).split())


def test_split_path_escaping_the_root_is_refused(coco_root: Path) -> None:
    with pytest.raises(UnsafePathError, match="load.train.annotations"):
        load(format="coco", root=str(coco_root), train="../outside.json")


# ----------------------------------------------------------------------------- VOC


def voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int], int]], size=(50, 40)) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    for name in ("001", "002", "003"):
        write_png(root / "JPEGImages" / f"{name}.png")
    ann = root / "Annotations"
    ann.mkdir(parents=True)
    (ann / "001.xml").write_text(voc_xml("001.png", [("dog", (1, 1, 10, 20), 0), ("cat", (20, 5, 60, 30), 1)]))
    (ann / "002.xml").write_text(voc_xml("002.png", [("cat", (5, 5, 25, 25), 0)]))
    (ann / "003.xml").write_text(voc_xml("003.png", []))
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("001\n002\n")
    (sets / "val.txt").write_text("003\n")
    return root


def test_voc_folder_and_imagesets_lists(voc_root: Path) -> None:
    records, cats, *_ = load(format="voc", root=str(voc_root), train="ImageSets/Main/train.txt",
                             val="ImageSets/Main/val.txt")
    assert cats.names == ["cat", "dog"] and cats.ids == [1, 2]
    first = records["train"][0]
    assert first.labels.tolist() == [2, 1]
    np.testing.assert_allclose(first.boxes[0], [0, 0, 10, 20])  # 1-based inclusive → 0-based xyxy
    np.testing.assert_allclose(first.boxes[1], [19, 4, 50, 30])  # clipped to width 50
    assert first.crowd.tolist() == [False, True]  # difficult → ignored in evaluation
    assert len(records["val"]) == 1 and len(records["val"][0].labels) == 0
    records, *_ = load(format="voc", root=str(voc_root), train={"annotations": "Annotations"})
    assert len(records["train"]) == 3


def test_voc_malformed_xml_and_missing_fields(voc_root: Path) -> None:
    (voc_root / "Annotations" / "002.xml").write_text("<annotation><filename>002.png</filename><object>")
    with pytest.raises(DataError, match=r"002\.xml: malformed XML"):
        load(format="voc", root=str(voc_root), train="Annotations")
    (voc_root / "Annotations" / "002.xml").write_text(
        "<annotation><filename>002.png</filename><object><name>cat</name><bndbox><xmin>1</xmin></bndbox>"
        "</object></annotation>")
    with pytest.raises(DataError, match=r"002\.xml: object 1: missing <ymin>"):
        load(format="voc", root=str(voc_root), train="Annotations")


def test_voc_unknown_class_with_classes_given(voc_root: Path) -> None:
    with pytest.raises(DataError, match=r"001\.xml: class 'dog' is not in load.classes"):
        load(format="voc", root=str(voc_root), train="Annotations", classes=["cat"])


# ----------------------------------------------------------------------------- YOLO


@pytest.fixture
def yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    for name in ("a", "b", "c"):
        write_png(root / "images" / "train" / f"{name}.png", size=(40, 80))
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.1 0.1 0.4 0.4\n")
    (labels / "b.txt").write_text("")  # empty: a negative
    (root / "classes.txt").write_text("ball\nbox\n")  # c has no label file: a negative too
    return root


def test_yolo_normalized_boxes_to_pixels_and_negatives(yolo_root: Path) -> None:
    records, cats, *_ = load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    assert cats.names == ["ball", "box"] and cats.ids == [1, 2]
    by_name = {Path(r.path).name: r for r in records["train"]}
    a = by_name["a.png"]
    np.testing.assert_allclose(a.boxes, [[30, 10, 50, 30], [0, 0, 24, 12]])  # second one clipped at 0
    assert a.labels.tolist() == [1, 2]
    assert len(by_name["b.png"].labels) == 0 and len(by_name["c.png"].labels) == 0


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", r"a\.txt:2: expected 'class cx cy w h' \(5 values\), got 4"),
    ("7 0.5 0.5 0.2 0.2", r"a\.txt:2: class 7 out of range"),
    ("x 0.5 0.5 0.2 0.2", r"a\.txt:2: class must be an integer"),
    ("0 0.5 nan 0.2 0.2", r"a\.txt:2: not a finite number"),
])
def test_yolo_bad_lines_name_file_and_line(yolo_root: Path, line: str, message: str) -> None:
    (yolo_root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})


def test_yolo_needs_class_names(yolo_root: Path) -> None:
    (yolo_root / "classes.txt").unlink()
    with pytest.raises(DataError, match="load.classes: required for yolo"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    records, cats, *_ = load(format="yolo", root=str(yolo_root), classes=["x", "y"], train={"images": "images/train"})
    assert cats.names == ["x", "y"]


def test_yolo_data_yaml_names_mapping_keys_are_the_class_ids(yolo_root: Path) -> None:
    (yolo_root / "classes.txt").unlink()
    (yolo_root / "data.yaml").write_text("names: {1: box, 0: ball}\n")
    records, cats, *_ = load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    assert cats.names == ["ball", "box"]
    # a gap would shift every later class onto the wrong name
    (yolo_root / "data.yaml").write_text("names: {0: ball, 2: box}\n")
    with pytest.raises(DataError, match=r"data\.yaml: names: keys must be the class ids 0\.\.1 \(got 0, 2\)"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    (yolo_root / "data.yaml").write_text("- ball\n- box\n")  # not a mapping: no names, as if absent
    with pytest.raises(DataError, match="load.classes: required for yolo"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})


def test_repeated_class_names_and_non_utf8_class_files_are_one_line_errors(yolo_root: Path, tmp_path: Path) -> None:
    (yolo_root / "classes.txt").write_text("ball\n\nball\n")
    with pytest.raises(DataError, match=r"classes\.txt:3: class name 'ball' again \(first on line 1\)"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    (yolo_root / "classes.txt").write_bytes(b"ball\nb\xe4ll\n")
    with pytest.raises(DataError, match=r"classes\.txt:2: not UTF-8 text \(byte 0xe4\)"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    (yolo_root / "classes.txt").unlink()
    (yolo_root / "data.yaml").write_text("names: [ball, box, ball]\n")
    with pytest.raises(DataError, match=r"data\.yaml: names: class name 'ball' appears twice"):
        load(format="yolo", root=str(yolo_root), train={"images": "images/train"})
    with pytest.raises(ValueError, match=r"class name 'ball' appears twice"):
        LoadConfig(format="coco", root=str(tmp_path), train="t.json", classes=["ball", "box", "ball"])


def test_voc_list_file_that_is_not_utf8_names_file_and_line(voc_root: Path) -> None:
    (voc_root / "ImageSets" / "Main" / "train.txt").write_bytes(b"001\n00\xe92\n")
    with pytest.raises(DataError, match=r"train\.txt:2: not UTF-8 text"):
        load(format="voc", root=str(voc_root), train="ImageSets/Main/train.txt")


# ----------------------------------------------------------------------------- dataset / augment


def test_boxes_follow_a_flip_and_empty_images_batch(coco_root: Path) -> None:
    records, *_ = load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"})
    tf = build_train_transform(DetectionAugmentConfig(train=[{"name": "HorizontalFlip", "p": 1.0}]))
    ds = DetectionDataset(records["train"], tf, train=True)
    x, t = ds[0]
    assert x.shape == (3, 40, 50) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    np.testing.assert_allclose(t["boxes"][0].numpy(), [50 - 20, 5, 50 - 5, 15])
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].dtype == torch.int64


def test_boxes_leaving_the_image_are_dropped_by_visibility(coco_root: Path) -> None:
    records, *_ = load(format="coco", root=str(coco_root), train={"annotations": "train.json", "images": "imgs"})
    crop = [{"name": "Crop", "x_min": 25, "y_min": 0, "x_max": 50, "y_max": 40, "p": 1.0}]
    ds = DetectionDataset(records["train"][:1], build_train_transform(DetectionAugmentConfig(train=crop)), train=True)
    _, t = ds[0]
    assert t["labels"].tolist() == [2]  # the box at x 5..20 left the crop; the one at 40..50 stays
