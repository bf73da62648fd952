"""`adcam demo --quick` runs the whole pipeline: data, training, ablation, labelling."""

from __future__ import annotations

import json

from adcam_fast.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--workers", "0"]) == 0
    result = json.loads((out / "demo.json").read_text())
    assert set(result["ablation"]) == {"cam", "product", "diffusion", "adcam"}
    for scores in result["ablation"].values():
        assert abs(scores["miou"] + scores["fp"] + scores["fn"] - 1) < 1e-9
    assert result["label_summary"]["failed"] == 0
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert len(list((out / "labels" / "masks").iterdir())) == result["label_summary"]["written"]
    assert "adcam @" in capsys.readouterr().out
    # a second run on the same folder (or one after ^C) resumes the training and goes on
    assert main(["demo", "--quick", "--out", str(out), "--workers", "0"]) == 0
    assert json.loads((out / "demo.json").read_text())["ablation"] == result["ablation"]
