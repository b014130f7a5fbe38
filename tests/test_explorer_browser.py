"""The explorer page in a real headless Chromium (Playwright for Python, the system's browser):
move a slider, the image and the listed items follow, and they are exactly what the gRPC service
answers for the z the sliders show; clicking an item moves the sliders to its mean; the label
filter and the buttons work; the page asks nothing of any host but its own, and asks the user
for the bearer token when the API needs one.

Skipped only when no Chromium executable can be found (scripts/setup.sh installs Debian's).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from playwright.sync_api import Page, sync_playwright

from latentsearch.browser import find_chromium
from latentsearch.v1 import latentsearch_pb2 as pb
from latentsearch.v1 import latentsearch_pb2_grpc as pb_grpc

DIM = 4
CHROMIUM = find_chromium()
# The z the sliders show, in the page.
SLIDERS_JS = "[...document.querySelectorAll('input.zslider')].map(e => parseFloat(e.value))"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium executable found: install Debian's (apt-get install -y chromium, which "
        "scripts/setup.sh does) or set LATENTSEARCH_CHROMIUM",
    ),
]


@pytest.fixture
def explorer(catalogue_index: Path, start_server):
    srv = start_server(index=catalogue_index, http_port=0)
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with grpc.insecure_channel(srv.target) as channel, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            # Most requests each widget had in flight at once, by API path.
            inflight: dict[str, int] = {}
            most: dict[str, int] = {}

            def began(r: Any) -> None:
                path = r.url.split("?")[0].removeprefix(base)
                inflight[path] = inflight.get(path, 0) + 1
                most[path] = max(most.get(path, 0), inflight[path])

            def ended(r: Any) -> None:
                path = r.url.split("?")[0].removeprefix(base)
                inflight[path] -= 1

            page.on("request", began)
            page.on("requestfinished", ended)
            page.on("requestfailed", ended)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            yield page, base, pb_grpc.LatentSearchStub(channel), requests, errors, most
        finally:
            browser.close()


def _sliders(page: Page) -> list[float]:
    return page.evaluate(f"() => {SLIDERS_JS}")


def _settled(page: Page) -> list[float]:
    """Wait until the image and the list both answer the z the sliders show; that z."""
    page.wait_for_function(
        f"""() => {{
            const z = JSON.stringify({SLIDERS_JS});
            return document.getElementById('decoded').dataset.z === z
                && document.getElementById('neighbours').dataset.z === z;
        }}"""
    )
    return _sliders(page)


def _listed(page: Page) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "#neighbours li",
        "els => els.map(e => ({id: e.dataset.id, ll: parseFloat(e.dataset.logLikelihood),"
        " p: parseFloat(e.dataset.probability), img: !!e.querySelector('img')}))",
    )


def _check_against_grpc(
    page: Page, stub: Any, z: list[float], labels: tuple[int, ...] = ()
) -> None:
    k = int(page.eval_on_selector("#k", "e => e.value"))
    want = stub.Nearest(pb.NearestRequest(z=z, k=k, labels=labels, with_probability=True), timeout=10)
    listed = _listed(page)
    assert [x["id"] for x in listed] == [n.id for n in want.neighbors]
    assert [x["ll"] for x in listed] == [n.log_likelihood for n in want.neighbors]
    assert [x["p"] for x in listed] == [n.probability for n in want.neighbors]
    assert all(x["img"] for x in listed)  # every item shows its thumbnail
    png = page.evaluate(
        """async () => {
            const buf = await (await fetch(document.getElementById('decoded').src)).arrayBuffer();
            return btoa(String.fromCharCode(...new Uint8Array(buf)));
        }"""
    )
    assert base64.b64decode(png) == stub.Decode(pb.DecodeRequest(z=z), timeout=10).png


def _check_gauge(page: Page, stub: Any, z: list[float]) -> None:
    """The typicality gauge shows what gRPC answers for z over every item."""
    want = stub.Nearest(pb.NearestRequest(z=z, k=1, with_probability=True), timeout=10)
    assert want.HasField("typicality")  # the version stores its typicality reference
    assert float(page.get_attribute("#gauge", "data-typicality") or "nan") == want.typicality


def test_sliders_image_items_and_buttons(explorer, tmp_path: Path) -> None:
    page, base, stub, requests, errors, most = explorer
    info = stub.Info(pb.InfoRequest(), timeout=10)
    page.wait_for_selector("#neighbours li")
    assert page.locator("input.zslider").count() == DIM
    assert info.index_version in page.inner_text("#version")
    # Ranges from the diagnostics; collapsed dimensions marked.
    collapsed = [i for i, a in enumerate(info.diagnostics.active) if not a]
    marked = page.eval_on_selector_all(".dim.collapsed input", "els => els.map(e => Number(e.dataset.dim))")
    assert marked == collapsed
    lows = page.eval_on_selector_all("input.zslider", "els => els.map(e => parseFloat(e.min))")
    assert all(lo < p01 for lo, p01 in zip(lows, info.diagnostics.mean_p01, strict=True))

    z0 = _settled(page)
    first = page.get_attribute("#decoded", "src")
    _check_against_grpc(page, stub, z0)

    # Drag slider 0 with the mouse: many input events, at most one request in flight per widget.
    box = page.locator("#z-0").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.5, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.85, y, steps=12)
    page.mouse.up()
    page.wait_for_function(f"() => document.getElementById('decoded').src !== {json.dumps(first)}")
    z1 = _settled(page)
    assert z1[0] > z0[0] and z1[1:] == z0[1:]
    assert most["/api/v1/nearest"] == most["/api/v1/decode"] == 1  # one request in flight per widget
    _check_against_grpc(page, stub, z1)
    _check_gauge(page, stub, z1)

    # Click the third item: the sliders move to its mean (within each slider's range).
    third = _listed(page)[2]["id"]
    page.click(f"#neighbours li[data-id='{third}']")
    mean = list(stub.GetItem(pb.GetItemRequest(id=third), timeout=10).mean)
    highs = page.eval_on_selector_all("input.zslider", "els => els.map(e => parseFloat(e.max))")
    expected = [min(max(m, lo), hi) for m, lo, hi in zip(mean, lows, highs, strict=True)]
    page.wait_for_function(
        f"() => {SLIDERS_JS}.every((v, i) => Math.abs(v - {json.dumps(expected)}[i]) < 1e-9)"
    )
    np.testing.assert_allclose(_sliders(page), expected, rtol=0, atol=1e-9)
    _check_against_grpc(page, stub, _settled(page))

    # The label filter: only label 1 ("ring") items, exactly the filtered gRPC answer.
    page.check("#labels input[value='1']")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#neighbours li')].every(e => e.textContent.startsWith('ring'))"
    )
    z = _settled(page)
    _check_against_grpc(page, stub, z, labels=(1,))
    _check_gauge(page, stub, z)  # of z against every item, filter or not

    # Random prior sample, then random item (of the filtered label): the sliders move, the list follows.
    for button in ("#random-prior", "#random-item"):
        before = json.dumps(_sliders(page))
        page.click(button)
        page.wait_for_function(f"() => JSON.stringify({before}) !== JSON.stringify({SLIDERS_JS})")
        _check_against_grpc(page, stub, _settled(page), labels=(1,))

    shot = Path(os.environ.get("LATENTSEARCH_EXPLORER_SHOT", tmp_path / "explorer.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []
    others = [u for u in requests if not u.startswith(base + "/") and not u.startswith(("data:", "blob:"))]
    assert others == [], "the page asked another host"
    assert any(u.startswith(base + "/api/v1/nearest") for u in requests)


def test_the_page_asks_for_the_token(catalogue_index: Path, start_server) -> None:
    srv = start_server(index=catalogue_index, http_port=0, token="s3cret")
    base = f"http://127.0.0.1:{srv.server.http_port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(base + "/")  # the page itself is open; the API answers 401 without the token
            page.wait_for_selector("#token-form:not([hidden])")
            assert "missing or invalid bearer token" in page.inner_text("#status")
            page.fill("#token", "s3cret")
            page.click("#token-form button")
            page.wait_for_selector("#neighbours li")
            assert page.locator("input.zslider").count() == DIM
        finally:
            browser.close()
