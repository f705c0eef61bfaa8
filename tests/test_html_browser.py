"""The HTML report in a real browser: headless Chromium renders every plot, no JavaScript error, a
non-blank screenshot. Needs Debian's `chromium` (.ci/run installs it)."""

import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from lora_cost.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=15000"]

ERROR_TRAP = ("<script>window.addEventListener('error', function (e) { var r = document.documentElement;"
              " r.setAttribute('data-js-errors', (r.getAttribute('data-js-errors') || '') + e.message + ';'); });</script>")


def chromium(tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def render(tmp_path, html_path, figures):
    trapped = tmp_path / "trapped.html"
    trapped.write_text(html_path.read_text().replace("<head>", "<head>" + ERROR_TRAP, 1))
    dom = chromium(tmp_path, "--dump-dom", trapped.as_uri()).stdout
    assert "</html>" in dom, "chromium produced no DOM"
    errors = re.findall(r'<html[^>]*data-js-errors="([^"]*)"', dom)
    assert not errors, errors
    # every figure became a plotly SVG (two main-svg layers per plot)
    assert dom.count('class="main-svg"') >= 2 * figures, dom.count('class="main-svg"')
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,1800", f"--screenshot={shot}", html_path.as_uri())
    from PIL import Image, ImageStat
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50, "screenshot looks blank"
    assert max(ImageStat.Stat(img).stddev) > 10


def test_plan_report_renders(tmp_path):
    out = tmp_path / "plan.html"
    r = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090-24gb", "--methods",
                                  "lora,qlora,dora,vera", "--seq", "2048", "--html", str(out)])
    assert r.exit_code == 0, r.output
    render(tmp_path, out, figures=4)


def test_nothing_fits_report_renders(tmp_path):
    out = tmp_path / "nofit.html"
    r = CliRunner().invoke(main, ["plan", "--model", "llama-3.1-70b", "--budget", "8GiB", "--html", str(out)])
    assert r.exit_code == 0, r.output
    assert "Nothing fits" in out.read_text()
    render(tmp_path, out, figures=4)


def test_profile_report_renders(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "examples" / "train_tiny.py"
    run_json, out = tmp_path / "run.json", tmp_path / "run.html"
    r = CliRunner().invoke(main, ["profile", str(example), "--steps", "2", "--out", str(run_json), "--", "--steps", "4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(run_json), "--html", str(out)])
    assert r.exit_code == 0, r.output
    render(tmp_path, out, figures=4)
