"""Reports drawn with matplotlib (python -m train.report, one run and runs overlaid) and the
TensorBoard custom-scalars layout, from metrics written by the trainer's own MetricsLogger."""
from __future__ import annotations

from pathlib import Path

import pytest

from train.metrics import MetricsLogger

L = 3


def _fake_run(run_dir: Path, layerskip: bool, tensorboard: bool = False) -> Path:
    """A run directory as the trainer writes it: training windows every 5 steps, validation every
    10, with (layerskip) rotating exits, their weights and drop fractions; else the final layer only."""
    m = MetricsLogger(run_dir, enabled=True, tensorboard=tensorboard, n_layers=L)
    for step in range(0, 21, 5):
        if step:
            values = {"loss/total": 6.0 - 0.1 * step, f"loss/layer_{L - 1:02d}": 6.0 - 0.1 * step}
            if layerskip:
                exit_layer = (step // 5) % (L - 1)
                values[f"loss/layer_{exit_layer:02d}"] = 7.0 - 0.1 * step
                values[f"layerskip/exit_weight/layer_{exit_layer:02d}"] = 0.25
                values[f"layerskip/exit_weight/layer_{L - 1:02d}"] = 0.75
                values.update({f"layerskip/drop_fraction/layer_{l:02d}": 0.05 * l for l in range(L)})
            m.log(step, values)
        if step % 10 == 0:
            vals = {f"val/loss/layer_{l:02d}": 7.0 - 0.1 * step - (l if layerskip else 0.2 * l) for l in range(L)}
            vals.update({f"val/agree/layer_{l:02d}": (l + 1) / L for l in range(L)})
            vals["val/loss/final"] = vals[f"val/loss/layer_{L - 1:02d}"]
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
    assert metrics[10]["loss/total"] == 5.0 and metrics[10]["val/loss/layer_02"] == 4.0  # records merged

    out = main([str(layerskip)])
    assert out == layerskip / "report.png"
    _is_png(out, 800)
    table = capsys.readouterr().out
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
    for title, prefix in (("training loss by exit", "loss"), ("validation loss by exit", "val/loss"),
                          ("validation top-1 agreement with the final layer", "val/agree")):
        assert charts[title] == [f"^{prefix}/layer_{l:02d}$" for l in range(L)]
    # every exit's logged tag is matched by exactly one pattern of its chart
    import re
    for tag in scalars:
        if re.fullmatch(r"(val/)?loss/layer_\d\d", tag):
            assert sum(bool(re.search(p, tag)) for tags in charts.values() for p in tags) == 1, tag
