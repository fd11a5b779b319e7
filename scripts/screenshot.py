"""The README's pictures of `convlad serve` and `convlad groups`, on real photos that may be committed: the public-domain
and CC0 sample photos that scikit-image ships (each one's licence is in skimage.data's docstrings),
four views of each (crops, turns, scale, light). The benchmark photos' licences keep them out of
the repository. Needs scikit-image and Chromium:

    pip install scikit-image && python scripts/screenshot.py [--out docs/img]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# public domain or CC0, in colour, of a size the network sees well (skimage.data documents each licence)
PHOTOS = {"astronaut": "public domain (NASA)", "chelsea": "CC0 (Stefan van der Walt)",
          "coffee": "CC0 (Rachel Michetti)", "rocket": "public domain (SpaceX)",
          "hubble_deep_field": "public domain (NASA)", "immunohistochemistry": "no known copyright restrictions",
          "retina": "CC0 (Mikael Häggström)"}


def photo_views(root: Path) -> tuple[Path, dict]:
    """Four views of each photo: crops of 65–90 %, a turn of up to 12°, a rescale, other light."""
    import numpy as np
    from PIL import Image, ImageEnhance
    try:
        from skimage import data
    except ImportError:
        sys.exit("error: the screenshots need scikit-image's sample photos: pip install scikit-image")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    groups = {}
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        groups[name] = []
        for v in range(4):
            f = rng.uniform(0.65, 0.9)
            x, y = rng.uniform(0, 1 - f, 2)
            view = im.crop((int(x * w), int(y * h), int((x + f) * w), int((y + f) * h)))
            view = view.rotate(rng.uniform(-12, 12), Image.BILINEAR, expand=False)
            view = view.resize((int(view.width * rng.uniform(0.7, 1.1)), int(view.height * rng.uniform(0.7, 1.1))))
            view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.75, 1.25))
            view.save(photos / f"{name}_{v}.jpg", quality=90)
            groups[name].append(f"{name}_{v}.jpg")
    return photos, groups


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
        photos, groups = photo_views(Path(tmp))
        query = Path(tmp) / "query.jpg"
        shutil.move(photos / groups["chelsea"][0], query)  # held out of the index
        # no model given: index fits one on the collection itself, as a newcomer's first command does
        subprocess.run([*cli, "index", photos, "--out", f"{tmp}/photos.index"], check=True)
        # which photos show the same thing, as a contact sheet (a smaller copy of one view: a duplicate)
        from PIL import Image

        with Image.open(photos / groups["astronaut"][1]) as im:
            im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(photos / "astronaut_copy.jpg", quality=70)
        subprocess.run([*cli, "index", photos, "--out", f"{tmp}/photos.index"], check=True)
        subprocess.run([*cli, "groups", f"{tmp}/photos.index", "--limit", "4", "--sheet", str(out / "groups.png")],
                       check=True)
        server = subprocess.Popen([*cli, "serve", f"{tmp}/photos.index", "--port", str(a.port)])
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
                # the waits below are page-side predicates, which the page's CSP (no eval) would refuse
                page = b.new_page(viewport={"width": 1180, "height": 760}, bypass_csp=True)
                page.goto(url)
                page.set_input_files("#pick", str(query))
                page.wait_for_selector("#grid .card .dist")  # results, not the browse grid shown at load
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
    print(f"wrote {out / 'serve-search.png'}, {out / 'serve-match.png'}, {out / 'groups.png'}")


if __name__ == "__main__":
    main()
