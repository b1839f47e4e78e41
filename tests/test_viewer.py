"""`medvqa show`: the static sample page — its data, its escaping, and (in a real headless Chromium)
its filters, checked on the DOM the page's own script built and on the pixels of a screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.io import atomic_write_json, atomic_write_jsonl
from medvqa.scoring import score_samples
from medvqa.types import VQASample
from PIL import Image

HOSTILE_Q = 'Is there <script>document.title="pwned"</script> a lesion?'
HOSTILE_GOLD = '</script><img src=x onerror="document.body.dataset.pwned=1">'
MODALITIES = ("CT", "MRI")


def _samples(root: Path) -> list[VQASample]:
    """24 questions on 12 images (each image a different gray level), 2 modalities, closed and open."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(12):
        img = root / f"img{i}.png"
        Image.new("L", (32, 32), color=20 * i).save(img)
        meta = {
            "image_id": f"img{i}",
            "modality": MODALITIES[i % 2],
            "slot": "presence" if i % 3 else "organ",
        }
        out.append(
            VQASample(f"c{i}", str(img), f"Is image {i} abnormal?", "yes", "CLOSED", "phantom", "test", meta)
        )
        out.append(
            VQASample(
                f"o{i}",
                str(img),
                f"Which organ in image {i}?",
                "left kidney",
                "OPEN",
                "phantom",
                "test",
                meta,
            )
        )
    out[0] = VQASample("c0", out[0].image, HOSTILE_Q, "yes", "CLOSED", "phantom", "test", out[0].meta)
    out[1] = VQASample(
        "o0", out[1].image, "What is it?", HOSTILE_GOLD, "OPEN", "phantom", "test", out[1].meta
    )
    return out


def write_eval(eval_dir: Path, samples: list[VQASample], predictions: list[str]) -> Path:
    """An eval folder as `medvqa eval` writes one: scored.jsonl from the real scorer, scores.json."""
    result = score_samples(samples, predictions, n_boot=0)
    atomic_write_jsonl(eval_dir / "scored.jsonl", result.rows)
    atomic_write_json(eval_dir / "scores.json", {"benchmark": "phantom", "split": "test", **result.to_json()})
    return eval_dir


def _preds(samples: list[VQASample], wrong_every: int) -> list[str]:
    return [
        ("no" if s.answer_type == "CLOSED" else "liver") if i % wrong_every == 0 else s.answer
        for i, s in enumerate(samples)
    ]


@pytest.fixture
def evals(tmp_path):
    samples = _samples(tmp_path / "images")
    a = write_eval(tmp_path / "a" / "eval" / "phantom", samples, _preds(samples, 3))
    b = write_eval(tmp_path / "b" / "eval" / "phantom", samples, _preds(samples, 4))
    return a, b, samples


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="medvqa-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def test_the_page_is_self_contained_and_escapes_every_string(evals, tmp_path):
    a, _, samples = evals
    out = tmp_path / "page.html"
    assert main(["show", str(a), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<script") == 2  # the data block and the page's own script: nothing injected
    assert "<script>document.title" not in page and "<img src=x" not in page
    assert 'src="http' not in page and 'href="http' not in page  # nothing fetched from anywhere
    data = _data(page)
    assert len(data["items"]) == len(samples) == 24
    first = data["items"][0]
    assert first["q"] == HOSTILE_Q and data["items"][1]["g"] == HOSTILE_GOLD  # stored as text, intact
    assert first["s"][0]["v"]["llava-med"]["v"] == "wrong" and first["s"][0]["p"] == "no"
    assert len(data["thumbs"]) == 12 and all(
        t.startswith("data:image/png;base64,") for t in data["thumbs"].values()
    )
    assert data["categories"] == {"modality": ["CT", "MRI"], "slot": ["organ", "presence"]}


def test_compare_pairs_questions_by_id(evals, tmp_path):
    a, b, _ = evals
    out = tmp_path / "cmp.html"
    assert main(["show", str(a.parents[1]), "--compare", str(b.parents[1]), "--out", str(out)]) == 0
    data = _data(out.read_text())
    assert len(data["sides"]) == 2
    by_id = {it["id"]: it for it in data["items"]}
    # item 3 (o1): wrong in A (every 3rd), right in B (every 4th)
    assert (
        by_id["o1"]["s"][0]["v"]["strict"]["v"] == "wrong"
        and by_id["o1"]["s"][1]["v"]["strict"]["v"] == "right"
    )


def test_bad_input_is_one_line(tmp_path, capsys, evals):
    a, _, _ = evals
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["show", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no scored.jsonl" in err[1]
    shutil.copytree(a, tmp_path / "two" / "x" / "eval" / "phantom")
    shutil.copytree(a, tmp_path / "two" / "y" / "eval" / "phantom")
    assert main(["show", str(tmp_path / "two"), "--compare", str(a), "--out", str(tmp_path / "p.html")]) == 2
    assert "2 evals of benchmark 'phantom'" in capsys.readouterr().err
    (a / "scored.jsonl").write_text('{"id": 1}\n[1, 2]\n')
    assert main(["show", str(a), "--out", str(tmp_path / "p.html")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_show_never_imports_torch(evals, tmp_path):
    import sys

    a, _, _ = evals
    code = (
        "import sys\nfrom medvqa.cli import main\n"
        f"assert main(['show', {str(a)!r}, '--out', {str(tmp_path / 'p.html')!r}]) == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- in a real browser ------------------------------------------------------------------------------

CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)"
)
GREEN, RED = (26, 152, 80), (215, 48, 39)  # the row stripes: right / wrong under the judging scorer


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chrome-profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--force-color-profile=srgb",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _dom(tmp_path: Path, url: str) -> str:
    proc = _chromium(tmp_path, "--dump-dom", url)
    assert proc.returncode == 0 and "<tbody" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def _screenshot(tmp_path: Path, url: str, name: str) -> Path:
    png = tmp_path / name
    proc = _chromium(tmp_path, f"--screenshot={png}", "--window-size=1100,1400", url)
    assert png.is_file(), proc.stderr[-2000:]
    return png


def _count_color(png: Path, rgb: tuple[int, int, int], tol: int = 4) -> int:
    with Image.open(png) as im:
        return sum(
            n
            for n, c in im.convert("RGB").getcolors(maxcolors=1 << 24)
            if all(abs(x - y) <= tol for x, y in zip(c, rgb))
        )


@needs_chromium
def test_filters_in_a_headless_browser(evals, tmp_path):
    a, _, samples = evals
    page = tmp_path / "page.html"
    assert main(["show", str(a), "--out", str(page)]) == 0
    url = page.resolve().as_uri()
    n_wrong = sum(1 for i in range(len(samples)) if i % 3 == 0)  # every 3rd prediction is wrong

    dom = _dom(tmp_path, url)
    assert dom.count("<tr data-verdict=") == 24 and 'data-shown="24"' in dom
    body_tag = re.search(r"<body[^>]*>", dom).group(0)
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert "pwned" not in body_tag and "pwned" not in title  # neither injected script ran
    assert "Is there &lt;script&gt;document.title" in dom  # shown as text

    dom = _dom(tmp_path, url + "#show=wrong")
    rows = re.findall(r'<tr data-verdict="(\w+)"', dom)
    assert len(rows) == n_wrong and set(rows) == {"wrong"}
    assert f"{n_wrong} of 24 samples shown" in dom

    dom = _dom(tmp_path, url + "#show=wrong&type=CLOSED&m.modality=CT")
    ids = re.findall(r'<tr data-verdict="wrong" data-id="(\w+)"', dom)
    expected = [
        s.id
        for i, s in enumerate(samples)
        if i % 3 == 0 and s.answer_type == "CLOSED" and s.meta["modality"] == "CT"
    ]
    assert ids == expected and ids

    everything = _screenshot(tmp_path, url, "all.png")
    wrong = _screenshot(tmp_path, url + "#show=wrong", "wrong.png")
    assert _count_color(everything, GREEN) > 500 and _count_color(everything, RED) > 500
    assert _count_color(wrong, GREEN) == 0 and _count_color(wrong, RED) > 500  # only wrong rows drawn
    keep = os.environ.get("MEDVQA_KEEP_SCREENSHOTS")
    if keep:
        for p in (everything, wrong):
            shutil.copy(p, Path(keep) / p.name)


@needs_chromium
def test_compare_lists_disagreements_first_in_a_browser(evals, tmp_path):
    a, b, _ = evals
    page = tmp_path / "cmp.html"
    assert main(["show", str(a), "--compare", str(b), "--out", str(page)]) == 0
    dom = _dom(tmp_path, page.resolve().as_uri() + "#judge=strict")
    flags = re.findall(r'<tr [^>]*data-disagree="(\d)"', dom)
    assert len(flags) == 24 and "1" in flags and "0" in flags
    assert flags == sorted(flags, reverse=True)  # every disagreement above every agreement
    dom = _dom(tmp_path, page.resolve().as_uri() + "#show=disagree")
    assert set(re.findall(r'<tr [^>]*data-disagree="(\d)"', dom)) == {"1"}
