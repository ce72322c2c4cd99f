"""Aggregate a sweep folder into ``results.jsonl``, ``report.md`` and a self-contained
``report.html`` (tables, metric-vs-swept-value plots, reference | driving | generated frames; all
images inline as base64, no external files or scripts).

    python -m eval.report SWEEP_DIR [--wandb] [--wandb-project P] [--wandb-mode offline]

``python eval/main.py`` runs this automatically at the end of a run / multirun (Hydra callback).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import re
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from eval.config import METRICS
from eval.records import METRICS_FILE, RESULTS_FILE, loads_record, write_results

# Headline metrics first, in this order; True = higher is better.
HEADLINE = {
    "psnr": True, "ssim": True, "lpips": False, "fvd": False,
    "body_error": False, "body_pck@0.05": True, "body_pck@0.1": True,
    "hands_error": False, "hands_pck@0.05": True, "hands_pck@0.1": True,
    "face_nme": False, "identity": True, "flicker": False, "temporal_error": False,
    "heldout_loss": False,
    # condition sensitivity: loss with another sample's condition minus own; larger = the model follows it
    "sensitivity_pose": True, "sensitivity_face": True, "sensitivity_ref": True,
}
MAX_FRAME_STRIPS = 2  # per cell in the HTML
# The main table and the plots show these (when computed); every metric is in "All metrics".
PLOTTED = ("psnr", "ssim", "lpips", "fvd", "body_pck@0.1", "hands_pck@0.1", "body_error", "face_nme",
           "identity", "temporal_error", "flicker", "heldout_loss", "sensitivity_pose", "sensitivity_face",
           "sensitivity_ref")


# ---------------------------------------------------------------------------- collect


def collect(sweep_dir: Path, skipped: set[str] = frozenset()) -> list[dict]:
    records = []
    for path in sorted(Path(sweep_dir).rglob(METRICS_FILE)):
        if ".hydra" in path.parts:
            continue
        try:
            rec = loads_record(path.read_text())
        except json.JSONDecodeError as e:
            rec = {"status": "failed", "error": f"unreadable metrics.json ({e})", "overrides": []}
        rec["cell"] = str(path.parent.relative_to(sweep_dir))  # "." for a single run's own folder
        rec["_dir"] = path.parent
        rec["skipped"] = str(path.parent.resolve()) in skipped
        overrides = (o.partition("=") for o in rec.get("overrides", []))
        rec["params"] = {key.lstrip("+~"): value for key, _, value in overrides}
        records.append(rec)
    return records


def swept_keys(records: list[dict]) -> list[str]:
    keys = sorted({k for r in records for k in r["params"]})
    return [k for k in keys if len({r["params"].get(k) for r in records}) > 1]


def metric_columns(records: list[dict]) -> list[str]:
    # None = undefined for every sample of that cell (e.g. nobody detected); shown as n/a.
    present = {k for r in records for k, v in (r.get("metrics") or {}).items()
               if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
    cols = [m for m in HEADLINE if m in present]
    extra = sorted(k for k in present - set(cols)
                   if not k.endswith(("_points", "_frames", "_without_person", "_detected", "_clips", "_samples")))
    return cols + extra


def not_computed(records: list[dict]) -> dict[str, str]:
    out = {k: v for r in reversed(records) for k, v in (r.get("not_computed") or {}).items()}  # the first cell's wins
    computed = {k for r in records for k in (r.get("metrics") or {})}
    return {k: v for k, v in out.items() if k not in computed and k in METRICS}


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)  # inf prints as "inf" / "-inf"


def arrow(metric: str) -> str:
    return {True: " ↑", False: " ↓"}.get(HEADLINE.get(metric), "")


# ---------------------------------------------------------------------------- tables


def results_rows(records: list[dict], swept: list[str], cols: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["cell", "status", *swept, *[c + arrow(c) for c in cols], "s/sample"]
    rows = []
    for r in records:
        status = r.get("status", "?") + (" (cached)" if r.get("skipped") else "")
        per = r.get("seconds_per_sample") or {}
        rows.append([r["cell"], status, *[r["params"].get(k, "") for k in swept],
                     *[fmt((r.get("metrics") or {}).get(c)) for c in cols],
                     fmt(sum(per.values())) if per else "n/a"])
    return header, rows


def timing_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = sorted({k for r in records for k in (r.get("seconds_per_sample") or {})})
    header = ["cell", *names, "cell total (s)"]
    rows = [[r["cell"], *[fmt((r.get("seconds_per_sample") or {}).get(n)) for n in names], fmt(r.get("seconds_total"))]
            for r in records if r.get("status") == "ok"]
    return header, rows


def md_table(header, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header, rows, best: dict[int, bool] | None = None) -> str:
    """``best``: column index -> higher-is-better; the best value of such columns is bold."""
    best_val = {}
    for j, higher in (best or {}).items():
        vals = [v for r in rows if (v := _as_number(r[j])) is not None and math.isfinite(v)]
        if len(vals) > 1 and max(vals) != min(vals):
            best_val[j] = max(vals) if higher else min(vals)
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)

    def cell(j, c):
        text = html.escape(str(c))
        if j == 0:  # cell names: allow line breaks after the commas only
            text = text.replace(",", ",<wbr>")
        bold = j in best_val and _as_number(c) == best_val[j]
        return f"<td class='best'>{text}</td>" if bold else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(j, c) for j, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class='scroll'><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>"


def best_columns(header, cols) -> dict[int, bool]:
    offset = len(header) - len(cols) - 1  # metric columns sit before the trailing s/sample column
    return {offset + i: HEADLINE[c] for i, c in enumerate(cols) if c in HEADLINE}


# ---------------------------------------------------------------------------- plots


def _as_number(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _plot_order(v: str) -> tuple:
    """x order: the base model (``null``) first, then numbers, then names in natural order
    (``step-200`` before ``step-1000``)."""
    n = _as_number(v)
    rank = 0 if v in ("", "null", "None") else 1 if n is not None else 2
    return rank, n or 0.0, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", v)]


def distinct_labels(values) -> dict[str, str]:
    """Each value's shortest distinguishing name: for paths the shortest suffix of path components
    that no other value ends with (``/runs/a/export/lora.safetensors`` and ``/runs/b/export/...``
    -> ``a/export/lora.safetensors`` and ``b/export/lora.safetensors``); other values cut to
    ``short_label`` when that keeps them distinct."""
    values = [str(v) for v in dict.fromkeys(values)]
    parts = {v: [p for p in v.replace("\\", "/").split("/") if p] or [v] for v in values}
    out = {}
    for v in values:
        if "/" not in v and "\\" not in v:
            out[v] = v
            continue
        for n in range(1, len(parts[v]) + 1):
            tail = parts[v][-n:]
            if not any(w != v and parts[w][-n:] == tail for w in values):
                break
        out[v] = "/".join(tail)
    short = {v: short_label(v) for v in values if "/" not in v and "\\" not in v}
    if len(set(short.values())) == len(short):  # long plain values keep their head when still distinct
        out.update(short)
    return out


def cell_label(records: list[dict], param: str, value: str) -> str | None:
    """A ``name=`` given to every cell with ``param=value`` (one name for all of them), else None."""
    names = {r["params"].get("name") for r in records if r["params"].get(param, "") == value}
    return names.pop() if len(names) == 1 and None not in names and param != "name" else None


def plot_figure(records: list[dict], param: str, swept: list[str], cols: list[str]):
    """One figure per swept parameter: a panel per metric, a line per combination of the others.
    Values are labelled by their ``name=`` or their shortest distinguishing name; y ticks are plain
    numbers (no offset such as ``1e-5+1.02644e1``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    metrics = [c for c in cols if any(_finite((r.get("metrics") or {}).get(c)) for r in ok)]
    if not ok or not metrics:
        return None
    values = sorted({r["params"].get(param, "") for r in ok}, key=_plot_order)
    numeric = all(_as_number(v) is not None for v in values)
    xpos = {v: (_as_number(v) if numeric else i) for i, v in enumerate(values)}
    xlabels = distinct_labels(values)
    xlabels = {v: cell_label(ok, param, v) or xlabels[v] for v in values}
    others = [k for k in swept if k not in (param, "name")]
    names = {k: distinct_labels(r["params"].get(k, "") for r in ok) for k in others}
    groups: dict[str, list[dict]] = {}
    for r in ok:
        label = ", ".join(f"{k}={names[k][r['params'].get(k, '')]}" for k in others) or "all"
        groups.setdefault(label, []).append(r)
    metrics = [c for c in metrics if c in PLOTTED] or metrics[:8]
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, rs in sorted(groups.items()):
            pts = sorted((xpos[r["params"].get(param, "")], (r.get("metrics") or {}).get(metric)) for r in rs)
            pts = [(x, y) for x, y in pts if _finite(y)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(metric + arrow(metric), fontsize=9)
        ax.set_xlabel(param, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if not numeric:
            ax.set_xticks(list(xpos.values()), [xlabels[v] for v in values], rotation=20, ha="right")
        elif len(values) <= 8:
            ax.set_xticks(list(xpos.values()), [str(v) for v in values])
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 1 else 0, 1, 1))  # room for the legend below
    return fig


def plot_png(records: list[dict], param: str, swept: list[str], cols: list[str]) -> bytes | None:
    import matplotlib.pyplot as plt

    fig = plot_figure(records, param, swept, cols)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def short_label(value: str, width: int = 22) -> str:
    """Paths keep their informative tail (``checkpoints/step-2000``), other values their head."""
    v = str(value)
    if "/" in v:
        v = "/".join(v.rstrip("/").split("/")[-2:])
        return v if len(v) <= width else "…" + v[-(width - 1):]
    return v if len(v) <= width else v[: width - 1] + "…"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def b64_img(data: bytes, alt: str, style: str = "") -> str:
    return (f'<img alt="{html.escape(alt)}" style="{style}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


# ---------------------------------------------------------------------------- report


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.failed{color:#b00020}.note{color:#555;font-size:13px}
.cells{display:flex;flex-wrap:wrap;gap:16px}.cell{border:1px solid #ddd;padding:8px;border-radius:6px}
.cell h3{font-size:13px;margin:0 0 6px 0}.strip-label{font-size:11px;color:#555}
.scroll{overflow-x:auto;max-width:100%}td.best{font-weight:700;background:#eef7ee}
td:first-child{font-size:11px;color:#444;max-width:420px}
"""


def build_report(sweep_dir, *, wandb_cfg=None, skipped: set[str] = frozenset(), note: str | None = None) -> dict:
    """Write results.jsonl, report.md and report.html into ``sweep_dir``; returns a summary.
    ``skipped``: resolved cell folders that the calling run skipped as finished (marked cached);
    ``note``: a line shown under the title (e.g. that the sweep was interrupted)."""
    sweep_dir = Path(sweep_dir)
    records = collect(sweep_dir, skipped)
    swept, cols = swept_keys(records), metric_columns(records)
    failed = [r for r in records if r.get("status") != "ok"]
    summary = {"cells": len(records), "ok": len(records) - len(failed), "failed": len(failed),
               "cached": sum(bool(r.get("skipped")) for r in records), "swept": swept}
    write_results(sweep_dir / RESULTS_FILE, [
        {"cell": r["cell"], "status": r.get("status"), "params": r["params"], "metrics": r.get("metrics") or {},
         "not_computed": r.get("not_computed") or {}, "seconds_per_sample": r.get("seconds_per_sample") or {},
         "seconds_total": r.get("seconds_total"), "error": r.get("error")} for r in records])

    title, esc = f"Eval report: {sweep_dir.name}", html.escape
    counts = f"{len(records)} cells: {summary['ok']} ok, {len(failed)} failed; swept: {', '.join(swept) or 'nothing'}."
    lists = [("Not computed", [(k, v) for k, v in sorted(not_computed(records).items())]),
             ("Failed cells", [(r["cell"], str(r.get("error", "unknown error"))) for r in failed])]
    header, rows = results_rows(records, swept, cols)
    main_cols = [c for c in cols if c in PLOTTED]
    timing = timing_rows(records)

    md = [f"# {title}", "", counts + (f" {summary['cached']} cells were finished before and reused."
                                      if summary["cached"] else ""),
          "↑ higher is better, ↓ lower is better; n/a = undefined for these samples.", "",
          *([f"**Note:** {note}.", ""] if note else []), "## Results", "", md_table(header, rows), ""]
    for name, items in lists:
        if items:
            md += [f"## {name}", ""] + [f"- **{k}**: {v}" if name == "Not computed" else f"- `{k}`: {v}"
                                        for k, v in items] + [""]
    if timing[1]:
        md += ["## Seconds per sample", "", md_table(*timing), ""]
    (sweep_dir / "report.md").write_text("\n".join(md))

    mheader, mrows = results_rows(records, swept, main_cols)
    parts = [f"<h1>{esc(title)}</h1>", f"<p class='{'failed' if failed else ''}'>{esc(counts)} ↑ higher is better, "
             "↓ lower is better.</p>", *([f"<p class='failed'><b>Note:</b> {esc(note)}.</p>"] if note else []),
             "<h2>Results</h2>", html_table(mheader, mrows, best_columns(mheader, main_cols))]
    for name, items in lists:
        if items:
            parts.append(f"<h2>{name}</h2><ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in items)
                         + "</ul>")
    plots = [(p, png) for p in swept if (png := plot_png(records, p, swept, cols))]
    if plots:
        parts.append("<h2>Metrics against swept values</h2>")
        parts += [f"<h3>{esc(p)}</h3>" + b64_img(png, f"metrics vs {p}", "max-width:100%") for p, png in plots]
    strips = []
    for r in records:
        pngs = sorted((r["_dir"] / "frames").glob("*.png"))[:MAX_FRAME_STRIPS] if r.get("status") == "ok" else []
        if pngs:
            imgs = "".join(f"<div class='strip-label'>{esc(p.stem)}</div>" + b64_img(p.read_bytes(), p.stem)
                           for p in pngs)
            strips.append(f"<div class='cell'><h3>{esc(r['cell'])}</h3><div class='strip-label'>reference | "
                          f"driving | generated (middle frame)</div>{imgs}</div>")
    if strips:
        parts.append("<h2>Frames</h2><div class='cells'>" + "".join(strips) + "</div>")
    parts += ["<h2>All metrics</h2>", html_table(header, rows, best_columns(header, cols))]
    if timing[1]:
        parts += ["<h2>Seconds per sample</h2>", html_table(*timing)]
    (sweep_dir / "report.html").write_text(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
                                           f"{esc(title)}</title><style>{CSS}</style></head><body>{''.join(parts)}"
                                           "</body></html>", encoding="utf-8")
    if wandb_cfg is not None and wandb_cfg.get("enabled"):
        log_wandb(sweep_dir, records, swept, cols, wandb_cfg)
    return summary


def log_wandb(sweep_dir: Path, records: list[dict], swept: list[str], cols: list[str], wandb_cfg) -> None:
    """One wandb table row per cell: cell, status, swept values, metrics as numbers (None = n/a)."""
    import wandb

    def num(v):
        return float(v) if _finite(v) else None

    columns = ["cell", "status", *swept, *cols]
    data = [[r["cell"], r.get("status"), *[r["params"].get(k) for k in swept],
             *[num((r.get("metrics") or {}).get(c)) for c in cols]] for r in records]
    run = wandb.init(project=wandb_cfg.get("project", "wan-animate-eval"), mode=wandb_cfg.get("mode", "offline"),
                     dir=str(sweep_dir), name=f"eval-{sweep_dir.name}", job_type="eval", reinit=True)
    run.log({"eval/results": wandb.Table(columns=columns, data=data)})
    run.finish()


class ReportCallback(Callback):
    """Builds the report after ``python eval/main.py`` (single run or multirun)."""

    def on_run_end(self, config, **kwargs) -> None:
        self._report(config.out_dir, config)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._report(config.hydra.sweep.dir, config)

    @staticmethod
    def _report(sweep_dir, config) -> None:
        wandb_cfg = OmegaConf.to_container(config.wandb, resolve=True) if "wandb" in config else None
        from eval.runner import SKIPPED_THIS_PROCESS

        summary = build_report(sweep_dir, wandb_cfg=wandb_cfg, skipped=set(SKIPPED_THIS_PROCESS))
        print(f"[eval] {summary['cells']} cells: {summary['ok']} ok ({summary['cached']} cached), "
              f"{summary['failed']} failed; report: {Path(sweep_dir) / 'report.html'}")
        if summary["failed"]:
            raise SystemExit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--wandb", action="store_true", help="also log a wandb table")
    ap.add_argument("--wandb-project", default="wan-animate-eval")
    ap.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    a = ap.parse_args(argv)
    if not Path(a.sweep_dir).is_dir():
        raise SystemExit(f"{a.sweep_dir}: not a folder")
    summary = build_report(a.sweep_dir, wandb_cfg={"enabled": a.wandb, "project": a.wandb_project,
                                                   "mode": a.wandb_mode})
    print(json.dumps(summary))
    print(f"wrote {Path(a.sweep_dir) / 'report.md'}, report.html, results.jsonl")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
