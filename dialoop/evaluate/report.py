"""Writing the report card: `report.json`, the PNG plots, and `report.html`, a page that shows them.

The JSON is the record (other tools read it); the HTML is made from it alone, with no script or style
from the network, so a copied report directory still opens anywhere.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dialoop.atomic import write_atomic
from dialoop.evaluate.card import ModelSamples
from dialoop.evaluate.plots import plot_gold, plot_lengths, plot_ppo_curves

PAIR_LABELS = {"both_end": "both replies end", "one_cut": "one cut off", "both_cut": "both cut off"}
PLOTS = {"ppo": "ppo_steps.png", "gold": "gold_per_iteration.png", "length": "reply_length.png"}


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(report: dict[str, Any], out_dir: Path, samples: Sequence[ModelSamples] = ()) -> Path:
    """Write `report.json`, the plots and `report.html` into `out_dir`; returns the HTML's path.

    With `samples`, every reply goes to `samples.jsonl` too (model, prompt row, sample, reply, finished; for
    the reply on the card also its gold score and which of the prompt's checks it passed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if report.get("ppo"):
        plot_ppo_curves(report["ppo"], out_dir / PLOTS["ppo"])
        plots["ppo"] = PLOTS["ppo"]
    plot_gold(report["models"], out_dir / PLOTS["gold"])
    plots["gold"] = PLOTS["gold"]
    if samples:
        plot_lengths(
            {s.spec.name: [len(r.token_ids) for r in s.replies] for s in samples}, out_dir / PLOTS["length"]
        )
        plots["length"] = PLOTS["length"]
        # sample 0 is the model's reply on the card; 1.. are the extra replies the RM's comparisons used
        lines = [
            json.dumps(
                {"model": s.spec.name, "row": i, "sample": k, "reply": r.text, "finished": r.finished}
                | ({"gold": s.gold[i], "checks": s.checks[i]} if k == 0 else {})
            )
            for s in samples
            for k, replies in enumerate([s.replies, *s.extra])
            for i, r in enumerate(replies)
        ]
        write_atomic(out_dir / "samples.jsonl", "\n".join(lines) + "\n")
    report["plots"] = plots
    write_atomic(out_dir / "report.json", json.dumps(_json_ready(report), indent=2) + "\n")
    html_path = out_dir / "report.html"
    write_atomic(html_path, render_html(report))
    return html_path


def _fmt(value: Any, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _machine(machine: Mapping[str, Any] | None) -> list[str]:
    """The line that says where the times were taken, when the report knows."""
    if not machine:
        return []
    device, cpus, threads, precision = (
        _fmt(machine.get(k)) for k in ("device", "cpus", "torch_threads", "precision")
    )
    return [f"<p>On {device} ({cpus} CPUs, {threads} torch threads), training in {precision}.</p>"]


def _checks_table(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per check kind: how many card prompts carry it, and per model how many of them it passed."""
    kinds = models[0]["checks"]  # the same prompts, so the same counts, for every model
    rows = [
        [html.escape(kind), _fmt(kinds[kind]["prompts"])]
        + [f"{_fmt(m['checks'][kind]['rate'], percent=True)} ({m['checks'][kind]['passed']})" for m in models]
        for kind in kinds
    ]
    return [
        "<h2>Checks passed</h2>",
        "<p>Per kind of checkable instruction of the labeling guide: the card prompts that carry it, and per "
        "model the share (and number) of them whose reply passed it. An empty reply, or a refusal of a "
        "harmless request, passes no check.</p>",
        _table(["check", "prompts", *(m["name"] for m in models)], rows),
    ]


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML page (inline style, images by relative path)."""
    models = report["models"]
    model_rows = [
        [
            html.escape(m["name"]),
            _fmt(m["iteration"]),
            f"{_fmt(m['gold_mean'])} ± {_fmt(m['gold_stderr'])}",
            _fmt(m["win_rate_vs_sft"], percent=True),
            _fmt(m["eos_rate"], percent=True),
            _fmt(m["mean_length_tokens"], 1),
            _fmt(m["mean_length_words"], 1),
            _fmt(m["kl_to_sft"], 2),
            _fmt(m["instructions_followed"], percent=True),
            ", ".join(f"{html.escape(k)} {_fmt(v, 2)}" for k, v in m["gold_by_kind"].items()),
        ]
        for m in models
    ]
    parts = [
        "<h1>Dialoop report card</h1>",
        f"<p>{report['eval']['prompts']} held-out prompts (sim eval split), up to "
        f"{report['eval']['max_new_tokens']} new tokens at temperature {report['eval']['temperature']}; "
        f"win rate and KL against <b>{_fmt(report.get('sft'))}</b>. Created {_fmt(report['created'])}.</p>",
        "<h2>Models</h2>",
        _table(
            [
                "model",
                "iteration",
                "gold score",
                "win rate vs SFT",
                "EOS rate",
                "length (tokens)",
                "length (words)",
                "KL to SFT",
                "instructions followed",
                "gold by kind",
            ],
            model_rows,
        ),
    ]
    parts += _checks_table(models)
    if report.get("targets"):
        rows = [
            [html.escape(name), _fmt(t["value"]), _fmt(t["threshold"]), _fmt(t["pass"])]
            for name, t in report["targets"].items()
        ]
        parts += [
            "<h2>Targets</h2>",
            "<p>A target is met when its value is at least its threshold.</p>",
            _table(["target", "value", "threshold", "met"], rows),
        ]
    rm = report.get("reward_model")
    if rm:
        parts += [
            "<h2>Reward model</h2>",
            "<p>Pairwise accuracy against the noise-free gold order: "
            f"<b>{_fmt(rm['accuracy'], percent=True)}</b> "
            f"on {rm['pairs']} pairs with different gold scores: {rm['prompts']} held-out prompts, "
            f"{rm['candidates_per_prompt']} replies of {_fmt(rm['model'])} to each. On "
            f"{_fmt(rm['final_model'])}'s replies: {_fmt(rm['accuracy_final_model'], percent=True)} "
            f"on {rm['pairs_final_model']} pairs. Across the models' "
            f"replies: {_fmt(rm['accuracy_across_models'], percent=True)} "
            f"on {rm['pairs_across_models']} pairs. Model: <code>{_fmt(rm['path'])}</code></p>",
            f"<p>The held-out pairs of {_fmt(rm['model'])} by how many of the two replies ended:</p>",
            _table(
                ["pair type", "pairs", "accuracy"],
                [
                    [label, _fmt(rm[f"pairs_{key}"]), _fmt(rm[f"accuracy_{key}"], percent=True)]
                    for key, label in PAIR_LABELS.items()
                ]
                + [["<b>all</b>", _fmt(rm["pairs"]), _fmt(rm["accuracy"], percent=True)]],
            ),
        ]
    plots = report.get("plots", {})
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f'<img src="{html.escape(name)}" alt="{html.escape(key)}">' for key, name in plots.items()]
    seconds = report.get("stage_seconds", {})
    if seconds:
        cpu = report.get("stage_cpu_seconds", {})
        rows = [[html.escape(k), _fmt(float(v), 1), _fmt(cpu.get(k), 1)] for k, v in seconds.items()]
        total_cpu = _fmt(float(sum(cpu.values())), 1) if cpu else "–"
        rows.append(
            ["<b>total</b>", f"<b>{_fmt(float(sum(seconds.values())), 1)}</b>", f"<b>{total_cpu}</b>"]
        )
        parts += [
            "<h2>Time per stage (seconds)</h2>",
            "<p>CPU seconds / wall seconds is how many cores a stage got.</p>",
            *_machine(report.get("machine")),
            _table(["stage", "wall", "CPU"], rows),
        ]
    examples = report.get("examples", [])
    if examples:
        parts.append("<h2>Examples</h2>")
        for ex in examples:
            checks = ", ".join(ex["checks"]) or "no check"
            rows = [
                [
                    html.escape(name),
                    _fmt(r["gold"], 2),
                    _fmt(r["finished"]),
                    f"<pre>{html.escape(r['text'])}</pre>",
                ]
                for name, r in ex["replies"].items()
            ]
            parts += [
                f"<h3>{html.escape(ex['prompt'])}</h3><p class=checks>{html.escape(checks)}</p>",
                _table(["model", "gold", "ended", "reply"], rows),
            ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
        "pre{white-space:pre-wrap;margin:0;font-size:0.9em}.checks{color:#666}"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Dialoop report card</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
