"""Reports drawn with matplotlib (python -m train.report, one run and runs overlaid) and the
TensorBoard custom-scalars layout, from metrics written by the trainer's own MetricsLogger."""
from __future__ import annotations

from pathlib import Path

import pytest

from train.metrics import MetricsLogger, block_key, exit_key

L = 3


def _fake_run(run_dir: Path, layerskip: bool, tensorboard: bool = False) -> Path:
    """A run directory as the trainer writes it: training windows every 5 steps, validation every
    10, with (layerskip) rotating exits, their weights and drop fractions; else the full model only.
    Exits E = 1..L (blocks run), blocks 1..L."""
    m = MetricsLogger(run_dir, enabled=True, tensorboard=tensorboard, n_layers=L)
    for step in range(0, 21, 5):
        if step:
            values = {"loss/total": 6.0 - 0.1 * step, exit_key("loss", L): 6.0 - 0.1 * step}
            if layerskip:
                early = 1 + (step // 5) % (L - 1)
                values[exit_key("loss", early)] = 7.0 - 0.1 * step
                values[exit_key("layerskip/exit_weight", early)] = 0.25
                values[exit_key("layerskip/exit_weight", L)] = 0.75
                values.update({block_key("layerskip/drop_fraction", b): 0.05 * b for b in range(1, L + 1)})
            m.log(step, values)
        if step % 10 == 0:
            vals = {exit_key("val/loss", e): 7.0 - 0.1 * step - ((e - 1) if layerskip else 0.2 * (e - 1))
                    for e in range(1, L + 1)}
            vals.update({exit_key("val/agree", e): e / L for e in range(1, L + 1)})
            vals["val/loss/final"] = vals[exit_key("val/loss", L)]
            m.log(step, vals)
    m.close()
    return run_dir


def _is_png(path: Path, min_width: int) -> None:
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_width
        assert len(im.convert("L").getcolors(1 << 16)) > 10  # something drawn, not a blank canvas


def test_report_of_one_run_and_of_runs_overlaid(tmp_path, capsys):
    from train.report import main, read_metrics
    layerskip = _fake_run(tmp_path / "layerskip", layerskip=True)
    baseline = _fake_run(tmp_path / "baseline", layerskip=False)
    metrics = read_metrics(layerskip)
    assert metrics[10]["loss/total"] == 5.0 and metrics[10]["val/loss/exit_03"] == 4.0  # records merged

    out = main([str(layerskip)])
    assert out == layerskip / "report.png"
    _is_png(out, 800)
    table = capsys.readouterr().out
    assert "| run | step | exit 1 | exit 2 | exit 3 |" in table  # exits E = 1..L
    assert "| layerskip val loss | 20 | 5.000 | 4.000 | 3.000 |" in table

    both = main([str(layerskip), str(baseline), "--labels", "LayerSkip,baseline", "--out", str(tmp_path / "cmp.png")])
    _is_png(both, 800)
    table = capsys.readouterr().out
    assert "| baseline val loss | 20 | 5.000 | 4.800 | 4.600 |" in table
    assert "| LayerSkip agreement | 20 | 0.333 | 0.667 | 1.000 |" in table

    _is_png(main([str(baseline)]), 800)  # no exits, no dropout: those panels say so
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--labels"):
        main([str(layerskip), str(baseline), "--labels", "one"])


def test_old_metric_names_are_read_as_exits(tmp_path):
    """A run written when `.../layer_XX` named block index XX: read as exit (block) XX + 1."""
    from train.report import by_exit, markdown_table, read_metrics
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    m.log(5, {"loss/layer_00": 7.0, "loss/layer_02": 6.0, "layerskip/drop_fraction/layer_02": 0.1})
    m.log(10, {"val/loss/layer_00": 5.0, "val/loss/layer_01": 4.0, "val/loss/layer_02": 3.0})
    m.close()
    metrics = read_metrics(tmp_path)
    assert metrics[5] == {"loss/exit_01": 7.0, "loss/exit_03": 6.0, "layerskip/drop_fraction/block_03": 0.1}
    assert by_exit(metrics, "val/loss") == {1: ([10], [5.0]), 2: ([10], [4.0]), 3: ([10], [3.0])}
    assert "| old val loss | 10 | 5.000 | 4.000 | 3.000 |" in markdown_table([tmp_path], ["old"])


def test_tensorboard_layout_overlays_every_exit(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2
    run = _fake_run(tmp_path / "run", layerskip=True, tensorboard=True)
    layouts, scalars = [], set()
    for events in (run / "tb").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "custom_scalars":
                    layouts.append(layout_pb2.Layout.FromString(v.tensor.string_val[0]))
                else:
                    scalars.add(v.tag)
    assert len(layouts) == 1
    charts = {c.title: list(c.multiline.tag) for cat in layouts[0].category for c in cat.chart}
    for title, prefix in (("training loss by exit E (blocks run)", "loss"),
                          ("validation loss by exit E (blocks run)", "val/loss"),
                          ("validation top-1 agreement with the full model", "val/agree")):
        assert charts[title] == [f"^{prefix}/exit_{e:02d}$" for e in range(1, L + 1)]
    assert charts["layer-dropout rate by block (1..L)"] == [
        f"^layerskip/drop_fraction/block_{b:02d}$" for b in range(1, L + 1)]
    # every exit's logged tag is matched by exactly one pattern of its chart
    import re
    assert {"loss/exit_01", "val/loss/exit_03", "layerskip/drop_fraction/block_01"} <= scalars
    for tag in scalars:
        if re.fullmatch(r"(val/)?loss/exit_\d\d|layerskip/drop_fraction/block_\d\d", tag):
            assert sum(bool(re.search(p, tag)) for tags in charts.values() for p in tags) == 1, tag
