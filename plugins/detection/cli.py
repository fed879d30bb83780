"""`visionpipe evaluate-coco`: score a COCO results file against COCO ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from visionpipe.errors import DataError


def evaluate_coco_files(predictions: Path, gt: Path) -> dict[str, float]:
    """COCO box metrics of a results file (a JSON list of detections) against a COCO annotation file."""
    from visionpipe_plugins.detection.formats import coco_index, load_coco_json
    from visionpipe_plugins.detection.metrics import check_coco_results, coco_evaluate

    gt_coco = coco_index(load_coco_json(gt))
    if not predictions.is_file():
        raise DataError(f"{predictions}: predictions file not found")
    try:
        results = json.loads(predictions.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{predictions}:{e.lineno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{predictions}: not UTF-8 text ({e.reason})") from None
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        results = results["annotations"]
    if not isinstance(results, list):
        raise DataError(f"{predictions}: expected a COCO results list [{{image_id, category_id, bbox, score}}, ...]")
    check_coco_results(gt_coco, results, str(predictions), f"the ground truth {gt}")
    metrics, _ = coco_evaluate(gt_coco, results)
    return metrics


def register(app: typer.Typer) -> None:
    """Add the command to the visionpipe CLI."""

    @app.command("evaluate-coco")
    def evaluate_coco(
        predictions: Annotated[Path, typer.Argument(help="COCO results JSON: [{image_id, category_id, bbox, score}].")],
        gt: Annotated[Path, typer.Option("--gt", help="COCO annotation file (ground truth) with the same image ids.")],
        out_file: Annotated[Path | None, typer.Option("--out", help="Also write the metrics to this JSON file.")] = None,
    ) -> None:
        """Score detections (ours, ONNX's or another tool's) against COCO ground truth: AP, AP50, AP75, AR, per class."""
        from rich.console import Console
        from rich.table import Table

        from visionpipe.io import write_json

        metrics = evaluate_coco_files(predictions, gt)
        table = Table(title="COCO box metrics", caption=f"{predictions} vs {gt}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in metrics.items():
            table.add_row(k, f"{v:.4f}")
        Console().print(table)
        if out_file:
            write_json(out_file, metrics)
