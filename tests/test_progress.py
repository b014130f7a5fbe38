"""latentsearch.progress: a tqdm bar on a terminal, a few plain log lines in a redirected log.

Both modes are driven with fake streams (``isatty()`` True or False) and a fake clock; the real
call sites (training, encoding, the indexing stages) are run with a non-terminal stderr.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from latentsearch import progress as progress_module
from latentsearch.data.readers import ArrayDataset
from latentsearch.indexer import IndexJobConfig, run_index_job
from latentsearch.model.config import TrainConfig, VAEConfig
from latentsearch.model.train import train
from latentsearch.progress import Progress, format_count, is_terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """Monotonic seconds that advance only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (999, "999"), (5000, "5k"), (70_000, "70k"), (54_321, "54.3k"), (999_600, "1M"),
     (1_000_000, "1M"), (2_500_000, "2.5M"), (3e9, "3G"), (4e12, "4T"), (12.5, "12.5")],
)  # fmt: skip
def test_format_count(n: float, text: str) -> None:
    assert format_count(n) == text


def test_is_terminal() -> None:
    assert is_terminal(_Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(object())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


def test_redirected_stream_gets_a_few_plain_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream, clock = io.StringIO(), _Clock()
    logger = logging.getLogger("test.progress")
    bar = Progress(200, desc="encode", stream=stream, interval_s=10.0, logger=logger, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"), bar:
        assert bar.mode == "log"
        for _ in range(200):  # 0.25 s per item: 50 s in all, a line at t = 10, 20, 30, 40, 50 s
            clock.now += 0.25
            bar.update(1)
        bar.set_postfix(loss="1.5")
        clock.now += 1.0
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    assert stream.getvalue() == ""  # nothing drawn on the stream itself
    assert len(lines) == 6 and not any("\r" in line for line in lines)
    assert lines[0] == "encode: 40/200 items (20%), 4 items/s"
    assert lines[4] == "encode: 200/200 items (100%), 4 items/s"
    # The last line at close: the elapsed time, the rate over it (200 / 51 s) and the postfix.
    assert lines[5] == "encode: 200/200 items (100%) in 51.0 s, 3.92 items/s (loss 1.5)"


def test_short_loop_in_a_redirected_log_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    bar = Progress(10, desc="index", unit="stage", stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO), bar:
        for _ in range(10):
            clock.now += 0.1
            bar.update()
    assert not [r for r in caplog.records if "index:" in r.getMessage()]


def test_terminal_gets_the_tqdm_bar(caplog: pytest.LogCaptureFixture) -> None:
    stream = _Terminal()
    with caplog.at_level(logging.INFO), Progress(50, desc="encode", stream=stream, interval_s=0.0) as bar:
        assert bar.mode == "bar"
        for _ in range(5):
            bar.update(10)
        bar.set_postfix_str("save")
    text = stream.getvalue()
    assert "\r" in text and "encode" in text and "50/50" in text and "save" in text
    assert not [r for r in caplog.records if "encode:" in r.getMessage()]


def test_disabled_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    for stream in (_Terminal(), io.StringIO()):
        bar = Progress(5, desc="x", enabled=False, stream=stream, interval_s=0)
        with caplog.at_level(logging.INFO), bar:
            assert bar.mode == "off"
            bar.update(5)
        assert stream.getvalue() == ""
    assert not caplog.records


def test_training_and_indexing_log_plain_lines_to_a_redirected_stderr(
    tiny_images, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Every progress display of a job (training steps, encoding, index stages) goes through Progress:
    with stderr captured (not a terminal) nothing is drawn there, the log gets plain lines."""
    monkeypatch.setattr(progress_module, "DEFAULT_INTERVAL_S", 0.0)  # a line per update
    images = tiny_images(40, (12, 10, 1))
    np.save(tmp_path / "items.npy", images)
    vae = VAEConfig(input_shape=(12, 10, 1), latent_dim=2, channels=(4, 8), hidden=16)
    with caplog.at_level(logging.INFO):
        train(
            ArrayDataset(images), tmp_path / "model",
            config=TrainConfig(epochs=1, batch_size=16, device="cpu", progress=True), vae_config=vae,
        )  # fmt: skip
        run_index_job(
            IndexJobConfig(out=tmp_path / "index", model=str(tmp_path / "model"),
                           data=str(tmp_path / "items.npy"), device="cpu", progress=True)
        )  # fmt: skip
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err
    messages = [r.getMessage() for r in caplog.records]
    # 34 training items (6 held out for validation) in steps of 16: 3 steps.
    assert "epoch 1/1: 3/3 steps (100%)" in "\n".join(messages)
    assert any(m.startswith("encode: 40/40 items (100%)") for m in messages)
    assert any(m.startswith("index: ") and " stages (" in m for m in messages)
    assert not any("\r" in m for m in messages)


def test_only_the_progress_module_imports_tqdm() -> None:
    """One progress helper: no other module of the package, the benchmarks or the scripts uses tqdm."""
    root = Path(__file__).resolve().parents[1]
    users = sorted(
        path.relative_to(root).as_posix()
        for folder in ("latentsearch", "bench", "scripts", "deploy")
        for path in (root / folder).rglob("*.py")
        if re.search(r"^\s*(import tqdm|from tqdm)", path.read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert users == ["latentsearch/progress.py"]
