"""train: a run killed mid-training resumes from its checkpoint and ends exactly where an
uninterrupted run ends; the model output is never half-written; prepare is byte-reproducible; and a
bad config fails before any training, naming the key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from soundmood import cli
from soundmood.data import prepare

from .conftest import ROOT, compose_config, smoke_config

EPOCHS, WARMUP = 3, 2  # the kill lands inside the warm-up: the resume restores optimizer slots


def _train_args(cfg: DictConfig, out: Path) -> list[str]:
    """`soundmood train` on the smoke profile's prepared data, every output under `out`."""
    return [
        f"data.prepared_dir={cfg.data.prepared_dir}",
        f"data.image_size={cfg.data.image_size}",
        f"data.limit_per_class={cfg.data.limit_per_class}",
        f"train.model_dir={out / 'models'}",
        f"evaluate.reports_dir={out / 'reports'}",
        f"tune.best_params_path={out / 'best_params.yaml'}",
        "train.use_tuned=false",
        f"train.epochs={EPOCHS}",
        f"train.warmup_epochs={WARMUP}",
        f"train.batch_size={cfg.train.batch_size}",
        "train.early_stopping_patience=10",
        "train.deterministic=true",
    ]


def _env(tmp_path: Path, work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SOUNDMOOD_WORK_DIR": str(work),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _complete_model(path: Path) -> bool:
    """A .keras file that is a whole, readable archive with its weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None and "model.weights.h5" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _progress(work: Path) -> dict:
    for index in work.glob("*/progress.json"):
        try:
            return json.loads(index.read_text())
        except (OSError, json.JSONDecodeError):  # replaced atomically, but be lenient
            pass
    return {}


def _weights(path: Path) -> list[np.ndarray]:
    import keras

    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).get_weights()]


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(
    prepared_smoke: DictConfig, tmp_path: Path
) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    done = subprocess.run(
        ["soundmood", "train", *_train_args(prepared_smoke, reference)],
        cwd=ROOT,
        env=_env(tmp_path, tmp_path / "work-reference"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout

    # a previous model sits in the output: it must stay whole until the new one replaces it
    model = interrupted / "models" / "model.keras"
    model.parent.mkdir(parents=True)
    shutil.copy(reference / "models" / "model.keras", model)
    previous = model.read_bytes()

    work = tmp_path / "work"
    args = ["soundmood", "train", *_train_args(prepared_smoke, interrupted)]
    victim = subprocess.Popen(
        args, cwd=ROOT, env=_env(tmp_path, work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 600
    try:
        while _progress(work).get("next_epoch", 0) < 1:
            assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
            assert model.read_bytes() == previous  # never touched while training
            assert time.monotonic() < deadline, "no epoch finished in 10 minutes"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
        victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _progress(work)["next_epoch"]
    assert 1 <= killed_at < EPOCHS
    assert model.read_bytes() == previous and _complete_model(model)
    assert not (interrupted / "reports" / "train.json").exists()

    resumed = subprocess.run(
        args, cwd=ROOT, env=_env(tmp_path, work), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"train: resuming from epoch {killed_at + 1}/{EPOCHS}" in resumed.stdout
    assert f"epoch {killed_at}/{EPOCHS}" not in resumed.stdout  # finished epochs not redone
    assert not list(work.glob("*/progress.json"))  # the checkpoint is removed once done
    assert _complete_model(model) and model.read_bytes() != previous

    # the same history (every metric and learning rate of every epoch, exactly) ...
    curves = "plots/training_curves.csv"
    assert (interrupted / "reports" / curves).read_text() == (
        reference / "reports" / curves
    ).read_text()
    summaries = [
        json.loads((d / "reports" / "train.json").read_text()) for d in (reference, interrupted)
    ]
    for summary in summaries:
        for timing in ("train_seconds", "train_images_per_second"):
            summary.pop(timing)
    assert summaries[0] == summaries[1]
    # ... and bit-identical weights
    for got, want in zip(
        _weights(model), _weights(reference / "models" / "model.keras"), strict=True
    ):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_prepare_is_byte_reproducible(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # data_version() reads data.dvc
    folders = []
    for name in ("one", "two"):
        cfg = smoke_config(tmp_path / name, data_root, ["data.limit_per_class=12"])
        prepare.run(cfg)
        folders.append(Path(cfg.data.prepared_dir))
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == [
        "index.json",
        "test_x.npy",
        "test_y.npy",
        "train_x.npy",
        "train_y.npy",
        "val_x.npy",
        "val_y.npy",
    ]
    assert sorted(p.name for p in folders[1].iterdir()) == files
    for name in files:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    # another seed carves another validation split from the same images
    other = smoke_config(tmp_path / "seed7", data_root, ["data.limit_per_class=12", "seed=7"])
    prepare.run(other)
    assert (
        prepare.load_index(other.data.prepared_dir)["files"]["val"]
        != prepare.load_index(folders[0])["files"]["val"]
    )


def test_class_weights_average_one_and_sqrt_halves_the_balanced_spread() -> None:
    from soundmood.fitting import class_weights

    y = np.repeat([0, 1, 2], [100, 400, 25])
    balanced, sqrt = class_weights(y, 3, "balanced"), class_weights(y, 3, "sqrt")
    assert class_weights(y, 3, "none") is None
    assert balanced == pytest.approx({0: 525 / 300, 1: 525 / 1200, 2: 525 / 75})
    for weights in (balanced, sqrt):
        assert np.mean([weights[k] for k in y]) == pytest.approx(1.0)  # the loss keeps its scale
    assert balanced[2] / balanced[1] == pytest.approx(16.0)  # count ratio 16
    assert sqrt[2] / sqrt[1] == pytest.approx(4.0)  # its square root
    assert class_weights(np.array([0, 0, 1]), 3, "sqrt")[2] > 0  # an absent class stays finite


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "model.name=resnet50",
            "model.name: 'resnet50' is not one of mobilenet_v2, seed_cnn",
        ),
        ("train.lr=-0.001", "train.lr: -0.001 is not in (0.0, 10.0]"),
        (
            "data.image_size=24",
            "data.image_size: 24 is under 32 px, the least model mobilenet_v2 takes",
        ),
        ("train.deterministic=maybe", "train.deterministic: 'maybe' is not true or false"),
        ("train.epochs=0", "train.epochs: 0 is not in [1, 10000]"),
    ],
)
def test_bad_config_fails_before_training(
    override: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SOUNDMOOD_WORK_DIR", str(tmp_path / "work"))
    code = cli.main(
        [
            "train",
            f"train.model_dir={tmp_path / 'models'}",
            f"evaluate.reports_dir={tmp_path / 'reports'}",
            override,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_mirrored_strategy_only_with_several_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU or none: the default strategy (None). Several: MirroredStrategy. (No multi-GPU
    machine runs the tests, so the strategy itself is stood in for.)"""
    import tensorflow as tf

    from soundmood import fitting

    assert fitting.distribution_strategy() is None  # this machine: CPU (or one GPU)
    made = []
    monkeypatch.setattr(
        tf.config,
        "list_logical_devices",
        lambda kind=None: ["/gpu:0", "/gpu:1"] if kind == "GPU" else [],
    )
    monkeypatch.setattr(
        tf.distribute,
        "MirroredStrategy",
        lambda: made.append(1) or type("S", (), {"num_replicas_in_sync": 2})(),
    )
    assert fitting.distribution_strategy() is not None and made == [1]
    monkeypatch.setattr(
        tf.config, "list_logical_devices", lambda kind=None: ["/gpu:0"] if kind == "GPU" else []
    )
    assert fitting.distribution_strategy() is None and made == [1]


@pytest.mark.parametrize(
    ("tuned", "message"),
    [
        ("train.lrr: 0.001\n", "'train.lrr' is not a key of the config"),
        ("train.lr: -0.5\n", "train.lr: -0.5 is not in"),
    ],
)
def test_stale_or_invalid_tuned_values_are_refused(
    tuned: str, message: str, tmp_path: Path, data_root: Path
) -> None:
    from soundmood.errors import ConfigError
    from soundmood.train import apply_tuned

    cfg = smoke_config(tmp_path, data_root)
    best = Path(cfg.tune.best_params_path)
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text(tuned)
    with pytest.raises(ConfigError, match=message) as raised:
        apply_tuned(cfg)
    assert str(best) in str(raised.value)


def test_checkpoint_fingerprint_covers_training_config_only() -> None:
    """An evaluate or registry change keeps a resumable checkpoint; a training change does not."""
    from soundmood.fitting import training_fingerprint

    cfg = compose_config()
    arrays = (np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    base = training_fingerprint(cfg, arrays, arrays, 2)

    def with_change(key: str, value: object) -> str:
        other = cfg.copy()
        OmegaConf.update(other, key, value)
        return training_fingerprint(other, arrays, arrays, 2)

    for key, value in [("evaluate.batch_size", 3), ("registry.min_improvement", 0.5)]:
        assert with_change(key, value) == base, key
    for key, value in [("train.lr", 0.5), ("model.dropout", 0.33), ("seed", 7)]:
        assert with_change(key, value) != base, key
    assert training_fingerprint(cfg, arrays, arrays, 3) != base


@pytest.mark.slow
def test_fit_keeps_the_best_epoch_and_stops_on_patience(
    prepared_smoke: DictConfig, tmp_path: Path
) -> None:
    """The weights returned are the best epoch's (ModelCheckpoint's file, loaded into a model
    whose optimizer is another phase's), and early stopping counts fine-tune epochs only.
    Monitoring `lr` makes both predictable: the warm-up's constant rate is the highest, and the
    cosine schedule only falls after it."""
    import keras

    from soundmood import fitting
    from soundmood.data.prepare import load_split

    class RecordEpochs(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.weights: list[list[np.ndarray]] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.weights.append([np.array(w) for w in self.model.get_weights()])

    cfg = OmegaConf.merge(
        prepared_smoke,
        {"train": {"epochs": 5, "warmup_epochs": 1, "monitor": "lr", "early_stopping_patience": 1}},
    )
    x, y = load_split(cfg.data.prepared_dir, "train")
    vx, vy = load_split(cfg.data.prepared_dir, "val")
    record = RecordEpochs()
    result = fitting.fit(
        cfg,
        (x[:64], y[:64]),
        (vx[:32], vy[:32]),
        tmp_path / "work",
        extra_callbacks=[record],
        verbose=0,
    )
    # epoch 1 (the first fine-tune one) sets early stopping's reference, epoch 2 misses it
    assert len(result.history) == 3 and result.best_epoch == 0
    assert result.best_value == result.history[0]["lr"] == pytest.approx(cfg.train.lr)  # float32
    for got, want in zip(result.model.get_weights(), record.weights[0], strict=True):
        assert np.array_equal(got, want)
    # and fine-tuning had moved them: the restore is real
    moved = zip(record.weights[2], record.weights[0], strict=True)
    assert any(later.tobytes() != best.tobytes() for later, best in moved)
