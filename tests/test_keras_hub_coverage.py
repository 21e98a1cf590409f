"""`benchmarks/keras_hub_coverage.py`: its files, its columns, and figures that agree with `convert` itself.

Only backbones whose attention is a `keras.layers.MultiHeadAttention`
(subclass) are asserted to convert; the keras-hub decoders with their own
attention classes depend on adapters and are not asserted here.
"""

import csv
import inspect
import json
import math

import keras_hub  # installed by `make test`: a missing keras-hub fails here, never skips
import numpy as np
import pytest

import keras_sara
from benchmarks import keras_hub_coverage as cov

NAMES = ("BertBackbone", "ViTBackbone", "GPT2Backbone")


def test_every_keras_hub_backbone_is_listed():
    """A keras-hub upgrade that adds a backbone fails here until it gets a builder or a no-attention reason."""
    backbones = {n for n, c in inspect.getmembers(keras_hub.models, inspect.isclass) if n.endswith("Backbone")}
    listed = set(cov.TINY_BACKBONES) | set(cov.NO_ATTENTION) | set(cov.ABSTRACT_BACKBONES)
    assert backbones - listed == set()
    assert not set(cov.TINY_BACKBONES) & set(cov.NO_ATTENTION)
    assert set(cov.TINY_BACKBONES) <= backbones  # no stale names


def test_build_tiny_rejects_unknown_names():
    with pytest.raises(ValueError, match="It has no attention"):
        cov.build_tiny("ResNetBackbone")
    with pytest.raises(ValueError, match="name='NoSuchBackbone'"):
        cov.build_tiny("NoSuchBackbone")


@pytest.mark.slow
def test_coverage_files_and_figures(tmp_path):
    rows, summary = cov.run(list(NAMES), str(tmp_path))

    for name in ("coverage.csv", "coverage.json", "coverage.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "coverage.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == cov.CSV_COLUMNS
        csv_rows = list(reader)
    assert [r["backbone"] for r in csv_rows] == list(NAMES)
    payload = json.loads((tmp_path / "coverage.json").read_text())
    assert [r["backbone"] for r in payload["rows"]] == list(NAMES)
    assert payload["summary"]["line"] == summary["line"]
    assert summary["line"] in (tmp_path / "coverage.md").read_text()
    assert summary["line"].startswith("3 of 3 backbones with attention convert fully")

    for name, row, csv_row in zip(NAMES, rows, csv_rows):
        assert row["status"] == "ok" and row["error"] == "", row
        assert row["reload_ok"] is True and row["reload_max_abs_diff"] < cov.RELOAD_ATOL, row
        assert csv_row["reload_ok"] == "True" and int(csv_row["num_converted"]) == row["num_converted"]

        # The same backbone converted here directly gives the same figures.
        backbone, inputs = cov.build_tiny(name)
        student, report = keras_sara.convert(backbone, probe=inputs)
        attention = cov.attention_layers(student)
        sara = [path for path, _, is_sara in attention if is_sara]
        assert row["num_converted"] == report.num_converted == len(sara) > 0, (name, sara)
        assert row["softmax_left"] == sum(not is_sara for _, _, is_sara in attention) == 0
        assert row["fully_converted"] is True
        assert row["num_skipped"] == len(report.skipped) == len(row["skipped_detail"])
        assert math.isclose(row["relative_error"], report.relative_error, rel_tol=1e-5, abs_tol=1e-12)
        assert row["attention_layers"] == len(cov.attention_layers(backbone)) == len(sara)
        assert {c["path"] for c in row["converted_detail"]} == {c.path for c in report.converted}


@pytest.mark.slow
def test_main_prints_the_table_and_counts_softmax_left(tmp_path, capsys):
    # SwinTransformer's WindowAttention is not a MultiHeadAttention: whatever
    # convert does with it, the row must agree with the student's layers.
    cov.main(["--only", "BertBackbone,SwinTransformerBackbone", "--out-dir", str(tmp_path),
              "--backend-note", "test"])
    out = capsys.readouterr().out
    assert "| backbone | status | attention | converted |" in out
    assert "backbones with attention convert fully" in out and "Backend note: test" in out
    payload = json.loads((tmp_path / "coverage.json").read_text())
    assert payload["machine"]["backend_note"] == "test"
    swin = payload["rows"][1]
    left = [a for a in swin["student_attention"] if not a["keras_sara"]]
    assert swin["softmax_left"] == len(left)
    assert swin["fully_converted"] == (swin["num_converted"] > 0 and not left)


def test_main_rejects_unknown_only():
    with pytest.raises(SystemExit, match="--only='NoSuchBackbone'"):
        cov.main(["--only", "NoSuchBackbone"])


def test_make_inputs_are_valid_for_the_vocabulary():
    backbone, inputs = cov.build_tiny("BertBackbone")
    assert set(inputs) == set(backbone.input)
    assert inputs["token_ids"].min() >= 1 and inputs["token_ids"].max() < cov.VOCAB
    np.testing.assert_array_equal(inputs["padding_mask"], 1)
