#!/usr/bin/env python3
"""Render divmoe's HTML pages (report.html, analysis.html, a compare report.html) to PNG in a
headless browser, so that a person can look at every plot before a release.

    python scripts/render_pages.py RUN_OR_PAGE... [--out DIR] [--browser PATH] [--width 1200]

Each argument is an .html file or a folder searched for report.html and analysis.html. One
full-page PNG per page is written to --out (default: next to each page, PAGE.png). Needs
Chromium or Chrome (Debian: ``apt-get install chromium``); exits with status 2 and says so
when none is found.

Steps per page: screenshot a tall window, grow it while the page reaches its bottom edge,
then crop the white space below the page's content.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PAGE_NAMES = ("report.html", "analysis.html")
MAX_HEIGHT = 65536


def find_browser(explicit: str | None) -> str:
    if explicit:
        if shutil.which(explicit) or Path(explicit).is_file():
            return shutil.which(explicit) or explicit
        sys.exit(f"render_pages: --browser {explicit} not found")
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    print(f"render_pages: no headless browser found (looked for {', '.join(BROWSERS)} on PATH); "
          f"install Chromium (Debian/Ubuntu: apt-get install chromium) or pass --browser PATH",
          file=sys.stderr)
    sys.exit(2)


def find_pages(args: list[str]) -> list[Path]:
    pages: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_file():
            pages.append(p)
        elif p.is_dir():
            pages += sorted(q for name in PAGE_NAMES for q in p.rglob(name))
        else:
            sys.exit(f"render_pages: {p} does not exist")
    if not pages:
        sys.exit(f"render_pages: no {' or '.join(PAGE_NAMES)} under {', '.join(args)}")
    return pages


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory(prefix="render-pages-") as profile:
        cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png}",
               page.resolve().as_uri()]
        if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
            cmd.insert(1, "--no-sandbox")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not png.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        sys.exit(f"render_pages: {browser} failed on {page} (exit {proc.returncode}): "
                 + " | ".join(tail))


def content_bottom(png: Path) -> tuple[int, int]:
    """(last row that is not plain background + 1, image height)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        bg = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
        box = ImageChops.difference(rgb, bg).getbbox()
        return (box[3] if box else 0), rgb.height


def render(browser: str, page: Path, png: Path, width: int) -> int:
    height = 4096
    while True:
        screenshot(browser, page, png, width, height)
        bottom, h = content_bottom(png)
        if bottom < h - 8 or height >= MAX_HEIGHT:
            break
        height *= 2  # the page runs past the window: take a taller one
    from PIL import Image

    with Image.open(png) as im:
        im.crop((0, 0, im.width, min(h, bottom + 24))).save(png)
    return bottom


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="HTML pages or folders holding them")
    ap.add_argument("--out", help="folder for the PNGs (default: next to each page)")
    ap.add_argument("--browser", help="Chromium/Chrome executable (default: first on PATH)")
    ap.add_argument("--width", type=int, default=1200, help="window width in pixels")
    args = ap.parse_args(argv)
    browser = find_browser(args.browser)
    pages = find_pages(args.paths)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for page in pages:
        if out:
            # name by the folders above the page, so that several runs do not collide
            stem = "_".join(page.resolve().parts[-3:-1] + (page.stem,))
            png = out / f"{stem}.png"
        else:
            png = page.with_suffix(".png")
        height = render(browser, page, png, args.width)
        print(f"{page} -> {png} ({args.width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
