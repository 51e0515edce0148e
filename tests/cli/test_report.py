"""torchkeep report: a real CheckpointManager run, the page's content, and the page in a real browser."""

from __future__ import annotations

import importlib
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli.main import main
from torchkeep.report import svg

LOSSES = {10: 1.0, 20: 0.4, 30: 0.6, 40: 0.7, 50: 0.8}  # best by loss: step 20; keep_last=2 keeps 40 and 50
HOSTILE = 'note<img src="x" onerror="alert(1)">'  # a metric name is any str: the page must show it as text


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2].half()  # a second dtype for the dtype mix
    return model


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Five saves with keep_last=2 and keep_best=1 on loss; between the last two only layer 0 changes."""
    directory, model, saved = tmp_path / "run", make_model(), {}
    with torchkeep.CheckpointManager(directory, keep_last=2, keep_best=1, monitor="loss") as manager:
        for index, (step, loss) in enumerate(LOSSES.items()):
            with torch.no_grad():
                model[0].weight.add_(0.05 * (index + 1))
                if step != 50:
                    model[2].weight.mul_(1.5)
            manager.save(step, metrics={"loss": loss, "acc": 0.2 * index, HOSTILE: index}, model=model)
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return directory, saved


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document (stdlib only)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(a.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())
        ]


def rows_by_step(page: str) -> dict[int, str]:
    """The table row of each step, as HTML."""
    return {int(m[1]): m[2] for m in re.finditer(r'<tr data-step="(\d+)">(.*?)</tr>', page)}


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float(torch.linalg.vector_norm(b64 - a64) / torch.linalg.vector_norm(a64))


def test_cli_writes_a_self_contained_page_about_the_run(
    run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, saved = run
    out = tmp_path / "report.html"
    args = ["report", str(directory), "-o", str(out), "--keep-last", "2", "--keep-best", "1", "--monitor", "loss"]
    assert main(args) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    doc = Elements(page)

    rows = rows_by_step(page)
    assert sorted(rows) == [20, 40, 50]  # what retention left on disk; 10 and 30 were deleted
    assert 'class="mark latest"' in rows[50] and 'class="mark best"' in rows[20]
    assert "mark" not in rows[40]
    assert "keep_last=2" in rows[40] and "keep_best=1 (loss, min)" in rows[20] and "latest (always kept)" in rows[50]
    assert "policies-unknown" not in page

    # one chart per metric, a dot per checkpoint, the hostile name only ever as escaped text
    assert {f["data-metric"] for f in doc.find("figure")} == {"loss", "acc", HOSTILE}
    assert page.count("<circle") == 3 * len(rows)
    assert HOSTILE not in page and "&lt;img" in page and not doc.find("img")
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page

    # treemap: bytes by module of the latest checkpoint, as the model holds them
    latest = saved[50]
    expected = {m: sum(t.numel() * t.element_size() for k, t in latest.items() if k.startswith(m + ".")) for m in "02"}
    assert {leaf["data-module"]: int(leaf["data-bytes"]) for leaf in doc.find("rect", class_="leaf")} == expected
    assert {d["data-dtype"] for d in doc.find("tr") if "data-dtype" in d} == {"float32", "float16"}

    # heat map of 40 -> 50: layer 0 changed by exactly what torch says, layer 2 not at all
    change = {row["data-module"]: float(row["data-change"]) for row in doc.find("g", class_="row")}
    worst = max(relative_change(saved[40][f"0.{p}"], latest[f"0.{p}"]) for p in ("weight", "bias"))
    assert change["0"] == pytest.approx(worst) and change["0"] > 0
    assert change["2"] == 0.0
    assert "Change from step 40 to step 50" in page


def test_without_policies_the_page_says_they_are_unknown(
    run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    directory, _ = run
    page = torchkeep.report(directory, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="policies-unknown"' in page and "not recorded on disk" in page
    rows = rows_by_step(page)
    assert all(row.endswith('<td class="why">?</td>') for row in rows.values())
    assert 'class="mark best"' not in page and 'class="mark latest"' in rows[50]  # best needs --monitor


def test_one_checkpoint_has_no_diff_and_says_why(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as manager:
        manager.save(7, metrics={"loss": 0.5}, model=make_model())
    page = torchkeep.report(tmp_path / "run", tmp_path / "new folder" / "r.html").read_text(encoding="utf-8")
    assert list(rows_by_step(page)) == [7]  # the output's folder made, as every save makes its own
    assert 'id="no-diff"' in page and "one checkpoint (step 7)" in page and 'class="row"' not in page
    assert 'class="leaf"' in page  # the treemap is still there


def test_a_checkpoint_without_a_model_says_so(tmp_path: Path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as manager:
        manager.save(1, metrics={"loss": 1.0}, rng=False, note="no model")
        manager.save(2, metrics={"loss": 0.5}, rng=False, note="no model")
    page = torchkeep.report(tmp_path / "run", tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No model weights in step 2" in page and 'id="no-diff"' in page and 'class="leaf"' not in page


@pytest.mark.parametrize("empty", [True, False], ids=["empty", "missing"])
def test_an_empty_or_missing_run_is_a_clear_error(
    tmp_path: Path, empty: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    if empty:
        run_dir.mkdir()
    with pytest.raises(torchkeep.CheckpointNotFoundError) as caught:
        torchkeep.report(run_dir, tmp_path / "r.html")
    assert str(run_dir) in str(caught.value)
    assert main(["report", str(run_dir), "-o", str(tmp_path / "r.html")]) == 1
    assert "torchkeep: error:" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def test_invalid_policy_options_are_a_usage_error(
    run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = run
    assert main(["report", str(directory), "-o", str(tmp_path / "r.html"), "--keep-best", "1"]) == 2
    assert "keep_best needs monitor=" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def test_squarify_tiles_the_box_with_areas_in_proportion() -> None:
    box = svg.Box(0, 0, 600, 400)
    values = [500.0, 250.0, 120.0, 80.0, 40.0, 10.0]
    tiles = svg.squarify(values, box)
    assert sum(t.w * t.h for t in tiles) == pytest.approx(box.w * box.h)
    for value, tile in zip(values, tiles, strict=True):
        assert tile.w * tile.h == pytest.approx(value / sum(values) * box.w * box.h)
        assert tile.x >= 0 and tile.y >= 0
        assert tile.x + tile.w <= box.w + 1e-9 and tile.y + tile.h <= box.h + 1e-9
    assert max(max(t.w / t.h, t.h / t.w) for t in tiles) < 4  # squarified, not slices


# -- in a real browser ---------------------------------------------------------------------------------------
#
# Chromium headless is driven from the command line, no driver library: --dump-dom prints the DOM after the
# page loaded, --screenshot writes a PNG. Console messages go to stderr with --enable-logging=stderr as lines
# holding "CONSOLE"; the page has no script, so the only ones it could cause are the browser refusing a fetch
# under the page's Content-Security-Policy. A control page with an external image proves that line appears.
# The PNG is decoded with zlib alone (Pillow is not a dependency).

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and RGB pixels of an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        header, idat = (chunk, idat) if kind == b"IHDR" else (header, idat + chunk if kind == b"IDAT" else idat)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 3 if colour == 2 else 4
    raw, stride, previous = zlib.decompress(idat), width * channels, bytearray(width * channels)
    pixels: list[tuple[int, ...]] = []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):  # undo the scanline filter (PNG spec, section 9)
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                guess = left + up - corner
                near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner))
                line[i] = (line[i] + near[2]) & 255
        pixels += [tuple(line[i : i + 3]) for i in range(0, stride, channels)]
        previous = line
    return width, height, pixels


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it"
)
def test_the_page_renders_in_a_real_browser_offline(
    run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    directory, _ = run
    out = torchkeep.report(directory, tmp_path / "report.html", keep_last=2, keep_best=1, monitor="loss")
    source = out.read_text(encoding="utf-8")

    loaded = chromium(tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", out.as_uri())
    assert console_lines(loaded.stderr) == []  # no refused fetch, no error
    dom = Elements(loaded.stdout)
    # The browser built the same structure the file holds: every chart, table row and heat-map row survived
    # parsing (an unescaped '<' in a name would have swallowed elements), and the hostile name is text.
    assert len(dom.find("svg")) == source.count("<svg") >= 6
    assert {int(r["data-step"]) for r in dom.find("tr") if "data-step" in r} == {20, 40, 50}
    assert {r["data-module"] for r in dom.find("g", class_="row")} == {"0", "2"}
    assert not dom.find("img") and any(HOSTILE in text for text in dom.text)

    control = tmp_path / "control.html"  # the console check can fail: an external image is refused and logged
    control.write_text(source.replace("</body>", '<img src="https://example.invalid/x.png"></body>'), "utf-8")
    refused = console_lines(
        chromium(tmp_path / "profile", "--enable-logging=stderr", "--dump-dom", control.as_uri()).stderr
    )
    assert any("Content Security Policy" in line for line in refused), refused

    shot = tmp_path / "page.png"
    chromium(tmp_path / "profile", "--hide-scrollbars", "--window-size=1200,2000", f"--screenshot={shot}", out.as_uri())
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 2000)
    assert len(set(pixels)) > 50  # text, charts and blocks, not a blank page
    # The treemap's largest block (layer 0, 2/3 of its 960x420 px) is painted in the first palette colour.
    first_block = tuple(int(svg.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    assert pixels.count(first_block) > 100_000


def test_each_checkpoint_the_page_needs_is_loaded_once(
    run: tuple[Path, dict[int, dict[str, torch.Tensor]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collect_module = importlib.import_module("torchkeep.report.collect")  # the package re-exports collect()
    loads: list[str] = []
    original = collect_module.load

    def counted(path: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        loads.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(collect_module, "load", counted)
    monkeypatch.setattr(importlib.import_module("torchkeep.weights.diff"), "load", counted)  # diff() reads too
    page = torchkeep.report(run[0], tmp_path / "r.html").read_text(encoding="utf-8")
    assert sorted(loads) == ["step-00000040", "step-00000050"]  # the diff reuses the latest's weights
    assert 'class="row"' in page
