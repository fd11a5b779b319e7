"""The web page in a real browser: Debian's Chromium driven by Playwright (no browser download).

Upload a mvbench-dev photo held out of the index: its group's photos come first. Click a result to
search with it, open the match view, add a photo and delete one. Screenshots go to
$CONVLAD_SCREENSHOTS (default: the test's temporary folder).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .servers import TOKEN, Server, build_index

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                               "--disable-background-networking",
                                                               "--disable-component-update", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, train_images):
    wd = tmp_path_factory.mktemp("web")
    index, groups = build_index(wd, train_images)
    s = Server(index, "--token", TOKEN)
    yield s, groups
    s.stop()


def test_search_click_match_add_and_delete_in_a_browser(browser, site, tmp_path):
    server, groups = site
    shots = Path(os.environ.get("CONVLAD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    # Playwright evaluates its waits as strings, which the page's CSP forbids (no eval): bypassed
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('stats').textContent.includes('photos')")

    # without a query the page browses the collection, a page of 24 at a time
    total = int(page.locator("#stats").inner_text().split()[0].replace(",", ""))
    page.wait_for_selector("#grid .card")
    assert page.locator("#grid .card").count() == min(24, total) and total > 24
    assert page.locator("#pageinfo").inner_text() == f"page 1 of {-(-total // 24)}"
    page.locator("#next").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Photos 25–')")
    assert page.locator("#grid .card").count() == min(24, total - 24) and page.locator("#prev").is_enabled()

    # search by upload: the held-out photo's group comes first
    name, files = list(groups.items())[0]
    page.set_input_files("#pick", str(files[0]))
    page.wait_for_function("document.getElementById('status').textContent.includes(' ms ·')")
    paths = page.locator("#grid .card .path").all_inner_texts()
    # plain words, and the order explained: the server's defaults re-rank the top 100
    labels = page.locator("#grid .card .dist").all_inner_texts()
    assert len(labels) == 10 and all(t.startswith("distance ") and "matching features" in t for t in labels), labels
    assert "ordered by matching features" in page.locator("#status").inner_text() and not page.locator("#pager").is_visible()
    page.locator("#more").click()
    page.wait_for_function("document.querySelectorAll('#grid .card').length > 10")
    top = paths[:len(files) - 1]
    assert sum(p.startswith(name) for p in top) >= len(files) - 2, paths
    page.wait_for_function("[...document.querySelectorAll('#grid img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "serve-search.png"))

    # click a result: search with it
    second = page.locator("#grid .card").nth(1)
    clicked = second.locator(".path").inner_text()
    second.locator(".thumb").click()
    page.wait_for_function("document.getElementById('status').textContent.includes('photos like photo')")
    assert clicked not in page.locator("#grid .card .path").all_inner_texts()

    # the match view of the first result
    page.locator("#grid .card").first.locator(".match").click()
    page.wait_for_function("document.getElementById('mimg').complete && document.getElementById('mimg').naturalWidth > 300")
    page.screenshot(path=str(shots / "serve-match.png"))
    page.keyboard.press("Escape")
    assert not page.locator("#modal").is_visible()

    # add a photo (with the token), then delete it
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    before = int(page.locator("#stats").inner_text().split()[0].replace(",", ""))
    other = list(groups.values())[3][0]
    page.set_input_files("#addfile", str(other))
    page.wait_for_function(f"document.getElementById('stats').textContent.startsWith('{before + 1} ')")
    page.wait_for_function("document.getElementById('status').textContent.includes('photos like photo')")
    page.on("dialog", lambda d: d.accept())
    card = page.locator("#grid .card").first
    gone = card.locator(".path").inner_text()
    card.locator(".del").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Deleted')")
    assert gone not in page.locator("#grid .card .path").all_inner_texts()
    page.wait_for_function(f"document.getElementById('stats').textContent.startsWith('{before} ')")
    assert not page.locator("#error").is_visible()
    page.screenshot(path=str(shots / "serve-after-delete.png"))

    # a bad file shows the server's sentence, and the page keeps working
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    page.set_input_files("#pick", str(bad))
    page.wait_for_selector("#error", state="visible")
    assert "not an image" in page.locator("#error").inner_text()
    # the previous results are gone: nothing is shown under a query that failed
    assert page.locator("#grid .card").count() == 0 and "failed" in page.locator("#status").inner_text()
    page.close()


def test_the_groups_view_and_a_match_view_from_it(browser, site, tmp_path):
    """The Groups view: the groups the server's API gives, largest first, each member saying why it
    is there, paths as text; a member's match view with the photo it joins through."""
    import httpx

    server, _ = site
    shots = Path(os.environ.get("CONVLAD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    want = httpx.get(server.url + "/api/groups?limit=8", timeout=60).json()
    assert want["groups"], "the test index has groups"
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(server.url + "/")
    page.wait_for_selector("#grid .card")
    page.locator("#groups").click()
    page.wait_for_selector("#groupsview .group")
    assert not page.locator("#grid").is_visible() and "largest first" in page.locator("#status").inner_text()
    shown = page.locator("#groupsview .group")
    assert shown.count() == len(want["groups"])
    first = shown.first
    g = want["groups"][0]
    assert first.locator("h3").inner_text().startswith(f"Group {g['id']}: {g['size']} photos")
    assert first.locator(".card .path").all_inner_texts() == [m["path"] for m in g["members"]]
    whys = first.locator(".card .why").all_inner_texts()
    assert whys[0] == "the group's representative" and all(w.startswith("via photo ") for w in whys[1:len(g["members"])])
    page.wait_for_function("[...document.querySelectorAll('#groupsview img')].slice(0, 3).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "serve-groups.png"))
    # a member's match view: the verification with the photo it joins through
    first.locator(".card").nth(1).locator(".match").click()
    page.wait_for_function("document.getElementById('mimg').complete && document.getElementById('mimg').naturalWidth > 300")
    assert page.locator("#mtitle").inner_text().startswith(f"Match view: photo {g['members'][1]['via']} → photo")
    page.keyboard.press("Escape")
    # back to a search from a member: the groups view makes way for the results, and the query's
    # group is named; it opens that one group
    member = g["members"][1]["id"]
    first.locator(".card").nth(1).locator(".thumb").click()
    page.wait_for_function(f"document.getElementById('status').textContent.includes('photos like photo {member}')")
    assert not page.locator("#groupsview").is_visible() and page.locator("#grid .card").count() > 0
    assert page.locator("#qgroup").inner_text() == f"In group {g['id']}: {g['size']} photos of the same thing"
    page.locator("#qgroup").click()
    page.wait_for_selector("#groupsview .group")
    assert page.locator("#groupsview .group").count() == 1 and not page.locator("#qgroup").is_visible()
    assert page.locator("#groupsview .group .card .path").all_inner_texts() == [m["path"] for m in g["members"]]
    # a photo alone in the index names no group
    alone = httpx.get(server.url + "/api/images?limit=100", timeout=60).json()["images"]
    grouped = {m["id"]: x["id"] for x in httpx.get(server.url + "/api/groups?limit=100", timeout=60).json()["groups"]
               for m in x["members"]}
    lone = next(x["id"] for x in alone if x["id"] not in grouped)
    got = httpx.get(f"{server.url}/api/similar/{lone}", timeout=60).json()
    same = [r["id"] for r in got["results"] if r["same"] and r["id"] in grouped]
    if same:  # ... unless a result shows the same thing: then that one's group
        assert got["group"]["id"] == grouped[same[0]]
    else:
        assert got["group"] is None
        page.evaluate(f"searchId({lone})")
        page.wait_for_function(f"document.getElementById('status').textContent.includes('photos like photo {lone}')")
        assert not page.locator("#qgroup").is_visible()
    assert not page.locator("#error").is_visible()
    page.close()
