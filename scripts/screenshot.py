"""The README's pictures of `convlad serve`, on the demo's generated scenes (the benchmark photos'
licences keep them out of the repository): python scripts/screenshot.py [--out docs/img]."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo import synthetic_set  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    import httpx
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "convlad.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        train, photos, groups = synthetic_set(Path(tmp))
        query = Path(tmp) / "query.jpg"
        shutil.move(photos / groups["scene2"][0], query)  # held out of the index
        subprocess.run([*cli, "train", "--images", train, "--out", f"{tmp}/model.npz", "--dim", "0"], check=True)
        subprocess.run([*cli, "index", f"{tmp}/model.npz", photos, "--out", f"{tmp}/scenes.index"], check=True)
        server = subprocess.Popen([*cli, "serve", f"{tmp}/scenes.index", "--port", str(a.port)])
        try:
            url = f"http://127.0.0.1:{a.port}"
            for _ in range(300):
                try:
                    httpx.get(url + "/api/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
                page = b.new_page(viewport={"width": 1180, "height": 760})
                page.goto(url)
                page.set_input_files("#pick", str(query))
                page.wait_for_selector("#grid .card")
                page.wait_for_function("[...document.querySelectorAll('#grid img')].slice(0, 6)"
                                       ".every(i => i.complete && i.naturalWidth > 0)")
                page.screenshot(path=str(out / "serve-search.png"))
                page.locator("#grid .card").first.locator(".match").click()
                page.wait_for_function("document.getElementById('mimg').naturalWidth > 300")
                page.screenshot(path=str(out / "serve-match.png"))
                b.close()
        finally:
            server.terminate()
            server.wait()
    print(f"wrote {out / 'serve-search.png'}, {out / 'serve-match.png'}")


if __name__ == "__main__":
    main()
