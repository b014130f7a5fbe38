"""``latentsearch quickstart --keep-serving``: prints the explorer page's URL, saves its screenshot
(when a Chromium is installed), keeps serving the page and the API until SIGTERM, then stops."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from latentsearch.browser import find_chromium

pytestmark = pytest.mark.timeout(300)


def test_keep_serving_prints_the_url_and_serves_until_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "latentsearch", "quickstart", "--data", "shapes", "--items", "200",
           "--epochs", "1", "--no-progress", "--keep-serving", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("explorer: serving"):
                break
        text = "".join(lines)
        match = re.search(r"^explorer: (http://127\.0\.0\.1:\d+/) ", text, flags=re.M)
        assert match, text
        url = match.group(1)
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "<title>latentsearch explorer</title>" in page
        health = json.loads(urllib.request.urlopen(url + "api/v1/health", timeout=10).read())
        info = json.loads(urllib.request.urlopen(url + "api/v1/info", timeout=10).read())
        assert health == {"status": "SERVING", "index_version": info["index_version"]}
        if find_chromium() is not None:
            assert f"explorer: screenshot {out / 'explorer.png'}" in text
            assert (out / "explorer.png").stat().st_size > 10_000
        else:
            assert "explorer: no screenshot (no Chromium found" in text
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert re.search(r"server: stopped \(port \d+ closed\)", rest), rest
