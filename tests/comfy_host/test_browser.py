"""The pack in a real ComfyUI with its real frontend, driven in Debian's Chromium (playwright, executable_path;
nothing downloads a browser): every template opens from the Templates browser with its thumbnail and no node
title under the menu bar; tiny_demo queued from the browser shows training previews while it runs and its
numbers on the canvas when done. Screenshots are kept in $DIPP_ARTIFACTS (default out/browser/)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
CHROMIUM = os.environ.get("DIPP_CHROMIUM", "/usr/bin/chromium")
if not COMFY or not (Path(COMFY) / "main.py").is_file():
    pytest.skip("browser tests skipped: set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"browser tests skipped: no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="browser tests skipped: pip install playwright")

from comfy_server import ROOT, comfy_server  # noqa: E402

WORKFLOWS = ROOT / "workflows"
TEMPLATES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
ARTIFACTS = Path(os.environ.get("DIPP_ARTIFACTS", ROOT / "out" / "browser"))
RUN_TIMEOUT_S = 600
READY = "() => window.app?.graph && window.LiteGraph?.registered_node_types?.DIPPAlign"
LISTEN = """() => {
  const seen = window.__dipp = {previews: [], status: [], done: false, error: null};
  app.api.addEventListener('b_preview_with_metadata', e => seen.previews.push(String(e.detail.nodeId)));
  app.api.addEventListener('diffinstruct.progress', e => seen.status.push(e.detail));
  app.api.addEventListener('execution_success', () => { seen.done = true; });
  app.api.addEventListener('execution_error', e => { seen.done = true; seen.error = e.detail; });
}"""
LAYOUT = """() => {
  const ds = app.canvas.ds, top = app.canvasEl.getBoundingClientRect().top;
  const menu = document.getElementById('comfyui-body-top').getBoundingClientRect().bottom;
  const title = (n) => top + (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + ds.offset[1]) * ds.scale;
  return {menu, titles: app.graph.nodes.map(title), types: app.graph.nodes.map(n => n.type)};
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfy_server(COMFY, tmp_path_factory.mktemp("browser"), "clone") as running:
        yield running


@pytest.fixture()
def page(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1600, "height": 1000})
            tab.thumbnails = []
            tab.on("response", lambda r: tab.thumbnails.append((r.url.rsplit("/", 1)[-1], r.status,
                                                                r.headers.get("content-type")))
                   if "/workflow_templates/" in r.url and r.url.endswith(".jpg") else None)
            tab.goto(server.url)
            tab.wait_for_function(READY, timeout=120_000)
            yield tab
        finally:
            browser.close()


def open_template(page, server, name: str) -> None:
    """Templates (side bar) -> diffinstruct -> the template's card, as a user clicks them. A fresh ComfyUI opens
    the same dialog by itself on the first visit."""
    dialog = page.get_by_text("Get Started with a Template")
    page.wait_for_timeout(1000)
    if not dialog.is_visible():
        page.get_by_role("button", name="Templates", exact=True).click()
    dialog.wait_for()
    page.get_by_text(server.module, exact=True).first.click()
    cards = page.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for()
    assert sorted(cards.nth(i).get_attribute("data-testid") for i in range(cards.count())) == \
        [f"template-workflow-{t}" for t in TEMPLATES]
    page.get_by_test_id(f"template-workflow-{name}").click()
    expected = Counter(n["type"] for n in json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"])
    page.wait_for_function("(want) => app.graph.nodes.length === want && app.canvas", arg=sum(expected.values()))
    page.wait_for_timeout(500)  # the dialog closes and the canvas draws


def test_every_template_opens_from_the_templates_browser(page, server):
    started = time.perf_counter()
    for name in TEMPLATES:
        open_template(page, server, name)
        layout = page.evaluate(LAYOUT)
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert Counter(layout["types"]) == Counter(n["type"] for n in workflow["nodes"]), name
        assert min(layout["titles"]) >= layout["menu"], (name, min(layout["titles"]), layout["menu"])
        page.screenshot(path=str(ARTIFACTS / f"template-{name}.png"))
    served = {(n, s, t) for n, s, t in page.thumbnails}
    assert {(f"{t}.jpg", 200, "image/jpeg") for t in TEMPLATES} <= served, page.thumbnails
    print(f"\nbrowser: {len(TEMPLATES)} templates opened from the Templates browser in "
          f"{time.perf_counter() - started:.1f} s")


def center_on(page, node_id: int) -> None:
    page.evaluate("(id) => { app.canvas.centerOnNode(app.graph.getNodeById(id)); app.canvas.setDirty(true, true); }",
                  node_id)
    page.wait_for_timeout(300)


def test_tiny_demo_queued_from_the_browser_previews_while_training_and_shows_its_numbers(page, server):
    open_template(page, server, "tiny_demo")
    prompt = json.loads((WORKFLOWS / "api" / "tiny_demo_api.json").read_text())
    title = {v["_meta"]["title"]: k for k, v in prompt.items()}
    trains = [k for k, v in prompt.items() if v["class_type"] == "DIPPTrain"]
    stage3 = title["Stage 3: DI++ alignment"]
    page.evaluate(LISTEN)
    started = time.perf_counter()
    page.get_by_role("button", name="Run", exact=True).click()
    shot_during = None
    while not page.evaluate("() => window.__dipp.done"):
        if shot_during is None and stage3 in page.evaluate("() => window.__dipp.previews"):
            center_on(page, int(stage3))
            page.screenshot(path=str(ARTIFACTS / "tiny_demo-during.png"))
            shot_during = time.perf_counter() - started
        assert time.perf_counter() - started < RUN_TIMEOUT_S, "tiny_demo did not finish"
        page.wait_for_timeout(250)
    wall = time.perf_counter() - started
    seen = page.evaluate("() => window.__dipp")
    assert seen["error"] is None, seen["error"]
    assert shot_during is not None, "no training preview arrived while Stage 3 ran"
    previews = Counter(seen["previews"])
    for key in trains:  # one picture every preview_every steps, through ComfyUI's progress-with-preview path
        inputs = prompt[key]["inputs"]
        assert previews[key] == inputs["steps"] // inputs["preview_every"], (key, previews)
    page.wait_for_timeout(500)
    shown = {str(k): v for k, v in page.evaluate("() => app.graph.nodes.filter(n => n.dippStatus)"
                                                 ".map(n => [n.id, n.dippStatus])")}
    boxes = page.evaluate("() => Array.from(document.querySelectorAll('textarea[data-dipp-status]')).map(t => t.value)")
    assert sorted(boxes) == sorted(shown.values())  # the numbers are in text boxes on the nodes
    before = shown[title["Before (DI)"]].split()[2]
    after = shown[title["After (DI++)"]].split()[2]
    first, last = shown[stage3].split("\n")[0].split()[1:4:2]
    assert float(after) > float(before) and float(last) > float(first)
    assert shown[title["Fidelity: DI++"]].startswith("attribute_accuracy ")
    assert "agreement with taste" in shown[title["Stage 2: learned reward (hidden taste)"]]
    assert "checkpoint folder" in shown[stage3]
    center_on(page, int(stage3))
    page.screenshot(path=str(ARTIFACTS / "tiny_demo-done.png"))
    print(f"\nbrowser: tiny_demo queued from the browser ran in {wall:.1f} s; previews per Train node "
          f"{dict(previews)}, the first of Stage 3 on screen after {shot_during:.1f} s; {len(seen['status'])} status "
          f"events; learned reward on the canvas {before} -> {after}; Stage 3: {shown[stage3].splitlines()[0]}; "
          f"{shown[title['Fidelity: DI++']].split('  ')[0]}")


def test_cancel_in_the_browser_says_where_the_checkpoint_is_and_run_resumes(page, server):
    """Cancel (the toolbar's button) during Stage 1 of tiny_demo: the node says where the checkpoint is; Run again
    resumes that run (the default, empty checkpoint_dir) instead of starting over."""
    open_template(page, server, "tiny_demo")
    prompt = json.loads((WORKFLOWS / "api" / "tiny_demo_api.json").read_text())
    stage1 = next(k for k, v in prompt.items() if v["_meta"]["title"].startswith("Stage 1") and
                  v["class_type"] == "DIPPTrain")
    # another seed: a run of its own (the earlier test's finished Stage 1 has the shipped seed's folder)
    page.evaluate("(id) => { app.graph.getNodeById(Number(id)).widgets.find(w => w.name === 'seed').value = 7; }",
                  stage1)
    page.evaluate(LISTEN)
    page.evaluate("() => app.api.addEventListener('execution_interrupted', () => { window.__dipp.done = 'stop'; })")
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function("(id) => window.__dipp.previews.includes(id)", arg=stage1, timeout=120_000)
    page.get_by_role("button", name="Cancel current run").click()
    page.wait_for_function("() => window.__dipp.done === 'stop'", timeout=120_000)
    page.wait_for_timeout(500)
    said = page.evaluate("(id) => app.graph.getNodeById(Number(id)).dippStatus", stage1)
    assert said.startswith("stopped after ") and "checkpoint " in said and "queue the same workflow again" in said
    stopped_at = int(said.split()[2])
    folder = Path(said.split("checkpoint ", 1)[1].split("\n")[0]).parent
    assert folder.parent.name == "diffinstruct_runs" and (folder / "latest").is_file()
    center_on(page, int(stage1))
    page.screenshot(path=str(ARTIFACTS / "tiny_demo-cancelled.png"))
    page.evaluate(LISTEN)
    page.get_by_role("button", name="Run", exact=True).click()
    # the queued prompt carries no status text: the same run key, so the same folder
    page.wait_for_function("() => window.__dipp.done", timeout=120_000)
    queued = [h["prompt"][2][stage1]["inputs"] for h in server.get_json("/history").values()]
    assert not any("dipp_status" in q for q in queued)
    page.wait_for_function("(id) => (app.graph.getNodeById(Number(id)).dippStatus || '').includes('resumed at')",
                           arg=stage1, timeout=120_000)
    done = page.evaluate("(id) => app.graph.getNodeById(Number(id)).dippStatus", stage1)
    assert f"(resumed at {stopped_at})" in done and f"checkpoint folder {folder}" in done
    print(f"\nbrowser: Cancel after step {stopped_at} of Stage 1 -> checkpoint in {folder.name}; Run again resumed at "
          f"{stopped_at}")
