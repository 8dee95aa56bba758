"""The HTML viewer in a real headless Chromium (Debian's), offline: groups, expanding, search, side by side, speed.

A screenshot of the side-by-side view goes to /tmp/viz_screenshot.png, and the
48-layer GPT's render time to /tmp/viz_render_48_layers.txt.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardfx.config import Config
from shardfx.tools.cli import main
from shardfx.tools.model_spec import load_model_spec
from shardfx.tools.stages import compile_stages
from shardfx.tools.viz_html import render_html
from tests.tools.browser import CHROMIUM, Browser

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]

SCREENSHOT = Path("/tmp/viz_screenshot.png")
RENDER_TIMES = Path("/tmp/viz_render_48_layers.txt")
READY = "new Promise(done => { const poll = () => window.vizReady ? done(window.vizReady) : setTimeout(poll, 10); poll(); })"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def gpt_pages(tmp_path_factory):
    """The tiny GPT after ZeRO-3 alone, and side by side with its capture."""
    spec = load_model_spec("gpt", "tiny", batch_size=8)
    stages = compile_stages(spec, Config(zero_stage=3), 2, stop_after="shard_parameters")
    folder = tmp_path_factory.mktemp("viz")
    single, compare = folder / "zero3.html", folder / "compare.html"
    single.write_text(render_html("gpt tiny, ZeRO-3", [stages[-1]]))
    compare.write_text(render_html("gpt tiny, capture vs ZeRO-3", [stages[0], stages[-1]]))
    return stages, single, compare


def open_page(browser: Browser, path: Path):
    page = browser.open()
    page.goto(path.as_uri())
    page.evaluate(READY)
    return page


def type_search(page, text: str) -> int:
    """Type into the search box, wait for the results, press Enter; returns the number of results listed."""
    page.evaluate(
        f"(() => {{ const s = document.getElementById('search'); s.value = {text!r}; s.dispatchEvent(new Event('input')); }})()"
    )
    count = page.evaluate(  # 0 if nothing is listed within 5 s (a search with no match must not hang the test)
        "new Promise(done => { const end = performance.now() + 5000; const poll = () => {"
        " const n = document.querySelectorAll('#results .r').length;"
        " n || performance.now() > end ? done(n) : setTimeout(poll, 20); }; poll(); })"
    )
    page.evaluate("document.getElementById('search').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
    return count


def test_loads_offline_shows_module_groups_expands_and_searches(browser, gpt_pages):
    _, single, _ = gpt_pages
    page = open_page(browser, single)
    assert page.requests() == [single.as_uri()]  # the page fetched nothing but itself
    groups = page.evaluate("[...document.querySelectorAll('#pane-0 .tree > .group')].map(g => g.dataset.path)")
    # Top-level modules of the GPT, plus the nodes of no module (batch, loss).
    assert sorted(groups) == ["(top level)", "blocks", "head", "ln_f", "wpe", "wte"]
    assert page.evaluate("document.querySelectorAll('.node').length") == 0  # collapsed: no rows built yet

    page.evaluate("""document.querySelector('.group[data-path="blocks"] > .ghead').click()""")
    children = page.evaluate(
        """[...document.querySelectorAll('.group[data-path="blocks"] > .gbody > .group')].map(g => g.dataset.path)"""
    )
    assert children == ["blocks.0", "blocks.1"]
    assert page.evaluate("""document.querySelector('.group[data-path="blocks"]').classList.contains('open')""")

    assert type_search(page, "reduce_scatter_default_3") == 1
    assert page.evaluate("document.querySelector('.node.selected .nm').textContent") == "%reduce_scatter_default_3"
    details = page.evaluate("document.getElementById('details').innerText")
    assert "shardfx.reduce_scatter" in details and "dp:S(0)" in details and "shard_parameters" in details
    assert "backward" in details and "grad_sync" in details


def test_side_by_side_marks_what_the_pass_added(browser, gpt_pages):
    stages, _, compare = gpt_pages
    page = open_page(browser, compare)
    assert page.evaluate("document.querySelectorAll('.pane:not(.hidden)').length") == 2
    assert page.evaluate("[...document.querySelectorAll('#modes button')].map(b => b.textContent)") == [
        "capture",
        "shard_parameters",
        "side by side",
    ]
    type_search(page, "all_gather_default_6")
    row = "document.querySelector('#pane-1 .node.selected')"
    assert page.evaluate(f"{row}.classList.contains('d-added')")
    # The node it feeds exists in both stages: selecting it opens the same place on both sides.
    page.evaluate(f"{row}.nextElementSibling.click()")
    assert page.evaluate("document.querySelectorAll('.node.selected').length") == 2
    page.screenshot(SCREENSHOT)
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # ~22 s to compile and render a 48-layer program; the other browser tests open smaller ones
def test_48_layer_gpt_opens_and_renders_in_under_5_seconds(browser, tmp_path):
    path = tmp_path / "gpt48.html"
    argv = ["viz", "gpt", "--preset", "tiny", "--set", "n_layer=48", "--zero", "3", "-o", str(path), "--no-progress"]
    argv += ["--config", "bucket_mb=0", "--config", "overlap=False"]  # a gather per parameter: _1, _10, _100
    assert main(argv) == 0
    page = browser.open()
    start = time.perf_counter()
    page.goto(path.as_uri())
    in_page_ms = page.evaluate(READY)  # performance.now() at the first frame: ms since navigation began
    wall = time.perf_counter() - start
    RENDER_TIMES.write_text(
        f"48-layer GPT, ZeRO-3, {path.stat().st_size / 2**20:.1f} MiB of HTML: "
        f"first frame {in_page_ms:.0f} ms after navigation, {wall:.2f} s wall from navigate to ready\n"
    )
    assert wall < 5.0, RENDER_TIMES.read_text()
    page.evaluate("""document.querySelector('.group[data-path="blocks"] > .ghead').click()""")
    assert page.evaluate("""document.querySelectorAll('.group[data-path="blocks"] > .gbody > .group').length""") == 48
    assert type_search(page, "all_gather_default_1") > 1  # _1, _10, _100, ...
