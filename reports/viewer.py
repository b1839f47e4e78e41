"""`medvqa show`: one self-contained static HTML page to look at an eval's samples, or two side by side.

Reads only stored files — `scored.jsonl` (question, gold, prediction, both scorers' values, the
sample's meta and image path), `scores.json` (benchmark, data root), and `predictions.jsonl` for the
question where an older `scored.jsonl` lacks it — and writes one HTML file with everything inlined:
the data as JSON in a `<script type="application/json">` block (every `<`, `>` and `&` written as a
JSON escape, so no stored string can close the block), images as small base64 thumbnails, and a
script that builds the rows with `textContent` only: a question holding `<script>` shows as text.

Filters live in the page and in its URL hash (`#show=wrong&benchmark=phantom&type=CLOSED&judge=strict
&m.modality=CT`), so a filtered view is a link, and a headless browser can open one.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_text, read_json, read_jsonl
from medvqa.layout import is_stale
from medvqa.reports.stats import load_scored
from medvqa.scoring import HEADLINE

SCORERS = ("llava-med", "strict")
MAX_CATEGORY_VALUES = 40  # a meta field with more distinct values is an id, not a category


@dataclass
class EvalView:
    """One eval folder as the page shows it."""

    label: str
    benchmark: str
    eval_dir: Path
    rows: list[dict[str, Any]]
    root: Path | None


def find_evals(path: str | Path) -> list[Path]:
    """The eval folders at or under `path`: folders holding a scored.jsonl (ones a sweep moved aside skipped)."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput("not a folder: expected an eval folder or a run folder", path=path)
    if (path / "scored.jsonl").is_file():
        return [path]
    found = sorted(
        p.parent
        for p in path.rglob("scored.jsonl")
        if not any(is_stale(part) for part in p.relative_to(path).parts)
    )
    if not found:
        raise BadInput("no scored.jsonl at or under this folder (run medvqa eval first)", path=path)
    return found


def load_eval(eval_dir: Path, base: Path) -> EvalView:
    scores_file = eval_dir / "scores.json"
    scores = read_json(scores_file) if scores_file.is_file() else {}
    if not isinstance(scores, dict):
        raise BadInput("expected a JSON object", path=scores_file)
    rows = load_scored(eval_dir)  # each row an object with an id (BadInput naming the line otherwise)
    questions = _questions_from_predictions(eval_dir)
    for row in rows:
        if not row.get("question") and str(row["id"]) in questions:
            row["question"] = questions[str(row["id"])]
    root = scores.get("root")
    label = eval_dir.name if eval_dir == base else str(eval_dir.relative_to(base))
    bench = scores.get("benchmark")
    return EvalView(
        label=label or eval_dir.name,
        benchmark=str(bench) if isinstance(bench, str) and bench else eval_dir.name,
        eval_dir=eval_dir,
        rows=rows,
        root=Path(root) if isinstance(root, str) and root else None,
    )


def _questions_from_predictions(eval_dir: Path) -> dict[str, str]:
    """Question text from predictions.jsonl's `prompt` (older scored.jsonl files do not carry it)."""
    path = eval_dir / "predictions.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for row in read_jsonl(path, allow_truncated_tail=True):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out[str(row.get("question_id"))] = row["prompt"].replace("<image>", "").strip()
    return out


def verdict(row: dict[str, Any], scorer: str) -> dict[str, Any] | None:
    """right / partial / wrong under one scorer, from the row's headline metric (closed acc or open recall)."""
    values = row.get(scorer)
    if not isinstance(values, dict):
        return None
    metric = HEADLINE["CLOSED" if row.get("answer_type") == "CLOSED" else "OPEN"]
    v = values.get(metric)
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    word = "right" if v >= 100 else "wrong" if v <= 0 else "partial"
    return {"v": word, "x": round(float(v), 1), "metric": metric}


def _thumbnail(path: Path, size: int) -> str | None:
    """A small PNG/JPEG data URI of the image, or None when it cannot be read (missing, not an image)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced size
            im = im.convert("L" if im.mode in ("L", "I", "I;16", "F", "1") else "RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            if im.mode == "L" and max(im.size) <= 64:
                im.save(buf, format="PNG", optimize=True)
                mime = "image/png"
            else:
                im.save(buf, format="JPEG", quality=80)
                mime = "image/jpeg"
    except Exception:  # any unreadable image becomes "no image", never a failed page
        return None
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_path(row: dict[str, Any], view: EvalView) -> Path | None:
    image = row.get("image")
    if not isinstance(image, str) or not image or "\x00" in image:
        return None
    p = Path(image)
    if not p.is_absolute():
        p = (view.root or view.eval_dir) / p
    return p


def _side(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    pred = row.get("prediction")
    return {
        "p": pred if isinstance(pred, str) else json.dumps(pred),
        "v": {sc: verdict(row, sc) for sc in SCORERS if verdict(row, sc) is not None},
    }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def build_data(
    a_path: str | Path,
    b_path: str | Path | None = None,
    *,
    thumb: int = 96,
    images: bool = True,
    labels: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The page's data: items (one per question; with a comparison, both runs' answers), thumbnails."""
    a_base = Path(a_path)
    a_views = [load_eval(d, a_base) for d in find_evals(a_base)]
    b_views: list[EvalView] = []
    if b_path is not None:
        b_base = Path(b_path)
        b_views = [load_eval(d, b_base) for d in find_evals(b_base)]
        for name, views, base in (("RUN", a_views, a_base), ("--compare", b_views, b_base)):
            benches = [v.benchmark for v in views]
            dup = sorted({b for b in benches if benches.count(b) > 1})
            if dup:
                raise BadInput(
                    f"{name} holds {benches.count(dup[0])} evals of benchmark {dup[0]!r}: "
                    "to compare, point at one model's folder (one eval per benchmark)",
                    path=base,
                )
    b_by_bench = {v.benchmark: v for v in b_views}
    thumbs: dict[str, str | None] = {}
    paths: dict[Path, str] = {}
    items = []
    for view in a_views:
        other = b_by_bench.get(view.benchmark)
        other_rows = {str(r["id"]): r for r in other.rows} if other else {}
        for row in view.rows:
            key = None
            if images and (p := _image_path(row, view)) is not None:
                if p not in paths:
                    paths[p] = f"i{len(paths)}"
                    thumbs[paths[p]] = _thumbnail(p, thumb)
                key = paths[p] if thumbs[paths[p]] else None
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            sides = [_side(row)]
            if b_views:
                sides.append(_side(other_rows.get(str(row["id"]))))
            items.append(
                {
                    "run": view.label,
                    "b": view.benchmark,
                    "id": str(row["id"]),
                    "q": _text(row.get("question")),
                    "g": _text(row.get("gold")),
                    "t": _text(row.get("answer_type")),
                    "img": key,
                    "meta": {str(k): _text(v) for k, v in meta.items() if v is not None},
                    "s": sides,
                }
            )
    runs = [v.label for v in a_views]
    sides = [str(a_path)] + ([str(b_path)] if b_path is not None else [])
    if labels:
        sides = [str(x) for x in labels[: len(sides)]] + sides[len(labels) :]
    return {
        "sides": sides,
        "runs": runs,
        "items": items,
        "thumbs": {k: v for k, v in thumbs.items() if v},
        "categories": _categories(items),
        "scorers": list(SCORERS),
    }


def _categories(items: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Meta fields that work as filters: 2..MAX_CATEGORY_VALUES distinct values (modality, organ, slot...)."""
    values: dict[str, set[str]] = {}
    for item in items:
        for k, v in item["meta"].items():
            values.setdefault(k, set()).add(v)
    return {
        k: sorted(vs)
        for k, vs in sorted(values.items())
        if 2 <= len(vs) <= MAX_CATEGORY_VALUES and len(vs) < max(3, len(items))
    }


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> block: no '<', '>' or '&' appears literally."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_page(data: dict[str, Any], *, title: str = "medvqa samples") -> str:
    return (
        _TEMPLATE.replace("__TITLE__", html.escape(title))
        .replace("__STYLE__", _STYLE)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__DATA__", _json_for_script(data))
    )


def write_page(
    a_path: str | Path,
    out: str | Path,
    *,
    compare: str | Path | None = None,
    thumb: int = 96,
    images: bool = True,
    title: str | None = None,
    labels: tuple[str, ...] | None = None,
) -> tuple[Path, int]:
    """Build and write the page (`labels`: the column names of the runs, default their paths);
    returns (path, number of samples)."""
    data = build_data(a_path, compare, thumb=thumb, images=images, labels=labels)
    name = title or (f"{a_path} vs {compare}" if compare else str(a_path))
    out = Path(out)
    atomic_write_text(out, render_page(data, title=f"medvqa samples: {name}"))
    return out, len(data["items"])


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header>
<h1>__TITLE__</h1>
<div id="controls"></div>
<div id="count"></div>
</header>
<table id="samples"><thead id="head"></thead><tbody id="rows"></tbody></table>
<script type="application/json" id="medvqa-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font: 14px/1.35 system-ui, sans-serif; margin: 0; color: #222; background: #fff; }
header { position: sticky; top: 0; background: #f4f4f4; border-bottom: 1px solid #ccc; padding: 6px 12px; }
h1 { font-size: 15px; margin: 0 0 6px 0; }
#controls label { margin-right: 12px; white-space: nowrap; }
#count { margin-top: 4px; color: #555; }
table { border-collapse: collapse; width: 100%; }
td, th { border-bottom: 1px solid #e3e3e3; padding: 4px 8px; vertical-align: top; text-align: left;
         overflow-wrap: anywhere; }
td.stripe { width: 10px; padding: 0; }
tr[data-verdict="right"] td.stripe { background: rgb(26, 152, 80); }
tr[data-verdict="wrong"] td.stripe { background: rgb(215, 48, 39); }
tr[data-verdict="partial"] td.stripe { background: rgb(254, 196, 79); }
tr[data-verdict="none"] td.stripe { background: rgb(160, 160, 160); }
tr[data-disagree="1"] { background: #fff8e1; }
img.thumb { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; background: #000; }
.noimg { width: 96px; height: 96px; display: flex; align-items: center; justify-content: center;
         background: #eee; color: #777; font-size: 11px; }
.badge { display: inline-block; padding: 0 5px; margin: 1px 2px 1px 0; border-radius: 3px; font-size: 12px; }
.right { background: #d9f0d3; } .wrong { background: #fddbc7; } .partial { background: #fff2c6; }
.meta { color: #666; font-size: 12px; }
.pred { white-space: pre-wrap; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("medvqa-data").textContent);
  const LIMIT = 1000;
  const compare = DATA.sides.length > 1;
  const controls = document.getElementById("controls");
  const state = {show: "all", benchmark: "", type: "", run: "", judge: DATA.scorers[0]};
  const metaState = {};

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function select(name, label, options, value, onchange) {
    const lab = el("label", {}, label + " ");
    const s = el("select", {id: "f-" + name, name: name});
    for (const [v, text] of options) {
      const o = el("option", {value: v}, text);
      if (v === value) o.selected = true;
      s.appendChild(o);
    }
    s.addEventListener("change", () => { onchange(s.value); update(); });
    lab.appendChild(s);
    controls.appendChild(lab);
  }
  function distinct(key) {
    return Array.from(new Set(DATA.items.map(it => it[key]))).sort();
  }
  function readHash() {
    const h = new URLSearchParams(location.hash.replace(/^#/, ""));
    for (const [k, v] of h.entries()) {
      if (k.startsWith("m.")) metaState[k.slice(2)] = v;
      else if (k in state) state[k] = v;
    }
  }
  function writeHash() {
    const h = new URLSearchParams();
    for (const [k, v] of Object.entries(state)) if (v && !(k === "show" && v === "all") && !(k === "judge" && v === DATA.scorers[0])) h.set(k, v);
    for (const [k, v] of Object.entries(metaState)) if (v) h.set("m." + k, v);
    history.replaceState(null, "", "#" + h.toString());
  }
  function verdictOf(side) {
    if (!side) return "none";
    const v = side.v[state.judge];
    return v ? v.v : "none";
  }
  function disagree(it) {
    return compare && verdictOf(it.s[0]) !== verdictOf(it.s[1]);
  }
  function keep(it) {
    if (state.benchmark && it.b !== state.benchmark) return false;
    if (state.type && it.t !== state.type) return false;
    if (state.run && it.run !== state.run) return false;
    for (const [k, v] of Object.entries(metaState)) if (v && it.meta[k] !== v) return false;
    const a = verdictOf(it.s[0]), b = compare ? verdictOf(it.s[1]) : null;
    switch (state.show) {
      case "wrong": return a !== "right";
      case "right": return a === "right";
      case "disagree": return disagree(it);
      case "b-wrong": return b !== "right";
      case "both-wrong": return a !== "right" && b !== "right";
      default: return true;
    }
  }
  function badges(cell, side) {
    if (!side) { cell.appendChild(el("span", {class: "meta"}, "not answered in this run")); return; }
    cell.appendChild(el("div", {class: "pred"}, side.p));
    const line = el("div");
    for (const sc of DATA.scorers) {
      const v = side.v[sc];
      if (!v) continue;
      line.appendChild(el("span", {class: "badge " + v.v, "data-scorer": sc}, sc + ": " + v.v + " (" + v.x + ")"));
    }
    cell.appendChild(line);
  }
  function head() {
    const tr = el("tr");
    for (const h of ["", "image", "question", "gold"]) tr.appendChild(el("th", {}, h));
    DATA.sides.forEach((s, i) => tr.appendChild(el("th", {}, (compare ? (i ? "B: " : "A: ") : "prediction: ") + s)));
    document.getElementById("head").appendChild(tr);
  }
  function row(it) {
    const tr = el("tr", {"data-verdict": verdictOf(it.s[0]), "data-id": it.id, "data-disagree": disagree(it) ? "1" : "0"});
    tr.appendChild(el("td", {class: "stripe"}));
    const imgCell = el("td");
    if (it.img && DATA.thumbs[it.img]) imgCell.appendChild(el("img", {class: "thumb", src: DATA.thumbs[it.img], alt: "image"}));
    else imgCell.appendChild(el("div", {class: "noimg"}, "no image"));
    tr.appendChild(imgCell);
    const q = el("td");
    q.appendChild(el("div", {class: "question"}, it.q || "(question not stored)"));
    const metaText = [it.b, it.t, it.id].concat(Object.entries(it.meta).map(([k, v]) => k + "=" + v)).join(" · ");
    q.appendChild(el("div", {class: "meta"}, (DATA.runs.length > 1 ? it.run + " · " : "") + metaText));
    tr.appendChild(q);
    tr.appendChild(el("td", {class: "gold"}, it.g));
    for (let i = 0; i < DATA.sides.length; i++) {
      const c = el("td", {class: "side"});
      badges(c, it.s[i]);
      tr.appendChild(c);
    }
    return tr;
  }
  function update() {
    writeHash();
    let shown = DATA.items.filter(keep);
    if (compare) shown = shown.map((it, i) => [disagree(it) ? 0 : 1, i, it]).sort((x, y) => x[0] - y[0] || x[1] - y[1]).map(x => x[2]);
    const body = document.getElementById("rows");
    body.replaceChildren();
    for (const it of shown.slice(0, LIMIT)) body.appendChild(row(it));
    const nd = compare ? DATA.items.filter(disagree).length : 0;
    const more = shown.length > LIMIT ? " (the first " + LIMIT + " drawn; narrow the filters)" : "";
    document.getElementById("count").textContent = shown.length + " of " + DATA.items.length + " samples shown" + more + (compare ? "; " + nd + " disagreements under " + state.judge + ", listed first" : "");
    document.body.setAttribute("data-shown", String(shown.length));
  }

  readHash();
  const showOpts = [["all", "all"], ["wrong", compare ? "A wrong or partial" : "wrong or partial"], ["right", compare ? "A right" : "right"]];
  if (compare) showOpts.push(["disagree", "A and B disagree"], ["b-wrong", "B wrong or partial"], ["both-wrong", "both wrong"]);
  select("show", "show", showOpts, state.show, v => { state.show = v; });
  select("judge", "judged by", DATA.scorers.map(s => [s, s]), state.judge, v => { state.judge = v; });
  const benches = distinct("b");
  if (benches.length > 1) select("benchmark", "benchmark", [["", "all"]].concat(benches.map(b => [b, b])), state.benchmark, v => { state.benchmark = v; });
  select("type", "answer type", [["", "all"], ["CLOSED", "closed"], ["OPEN", "open"]], state.type, v => { state.type = v; });
  if (DATA.runs.length > 1) select("run", "run", [["", "all"]].concat(DATA.runs.map(r => [r, r])), state.run, v => { state.run = v; });
  for (const [k, vals] of Object.entries(DATA.categories)) {
    select("m." + k, k, [["", "all"]].concat(vals.map(v => [v, v])), metaState[k] || "", v => { metaState[k] = v; });
  }
  head();
  update();
})();
"""
