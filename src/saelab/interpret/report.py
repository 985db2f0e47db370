"""Static HTML report: an index of latents and one page per latent, no scripts, no CDN.

Every text that comes from the corpus or the model is HTML-escaped. Each latent page shows
its activation histogram (inline SVG), its explanation and scores, and its
windows with every character shaded by the activation of the token(s) it came from.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..core.config import InterpretCfg
from .decode import char_values, render
from .models import Explainer
from .results import LatentResult
from .sampling import Window

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .5em;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.note{color:#666}mark{color:inherit;border-radius:2px}
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


def _num(v: Any, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def page_name(latent: int) -> str:
    return f"latent_{latent:06d}.html"


def example_html(w: Window, table: list[bytes], scale: float) -> str:
    """The window's text, each run of equally active characters shaded by its activation."""
    r = render(w.tokens, table)
    vals = char_values(r, w.acts)
    out, i = [], 0
    while i < len(r.text):
        j = i + 1
        while j < len(r.text) and vals[j] == vals[i]:
            j += 1
        text = html.escape(r.text[i:j])
        if vals[i] > 0:
            alpha = min(1.0, 0.15 + 0.85 * float(vals[i]) / scale) if scale > 0 else 1.0
            out.append(f'<mark style="background:rgba(255,120,0,{alpha:.2f})" '
                       f'title="{float(vals[i]):.4g}">{text}</mark>')
        else:
            out.append(text)
        i = j
    return "".join(out)


def _examples_table(windows: list[Window], table: list[bytes], scale: float,
                    label: str) -> str:
    if not windows:
        return "<p class=\"note\">none</p>"
    rows = "".join(
        f"<tr><td class=\"num\">{w.max_act:.3g}</td><td class=\"num\">{w.row}:{w.start}</td>"
        f"<td class=\"ex\">{example_html(w, table, scale)}</td></tr>" for w in windows)
    return (f"<table><tr><th>{label}</th><th>row:start</th><th>text</th></tr>{rows}</table>")


def _scores_html(scores: dict[str, dict[str, Any]]) -> str:
    if not scores:
        return "<p class=\"note\">not scored</p>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=\"num\">{_num(s.get('balanced_accuracy'))}"
        f"</td><td class=\"num\">{_num(s.get('auc'))}</td><td class=\"num\">{s.get('n', 0)}"
        f"</td><td class=\"num\">{s.get('n_unanswered', 0)}</td></tr>" for name, s in scores.items())
    return ("<table><tr><th>scorer</th><th>balanced accuracy</th><th>AUC</th><th>examples</th>"
            f"<th>unanswered</th></tr>{rows}</table>")


def histogram_svg(counts: list[int], edges: list[float], latent: int) -> str:
    """An inline SVG of a latent's activation histogram, log y.

    Written as text rather than drawn by matplotlib: a report of 16,384 latents would
    spend ~0.1 s per PNG (half an hour), and text is byte-identical on rerun.
    """
    w, h, pad_l, pad_b, pad_t = 480, 180, 52, 30, 22
    top = max(counts)
    logmax = math.log10(top + 1)
    bw = (w - pad_l - 8) / len(counts)
    bars = []
    for i, c in enumerate(counts):
        if c:
            bh = (h - pad_b - pad_t) * math.log10(c + 1) / logmax
            bars.append(f'<rect x="{pad_l + i * bw:.1f}" y="{h - pad_b - bh:.1f}" '
                        f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'role="img" aria-label="activation histogram of latent {latent}">'
            f'<text x="{w / 2}" y="14" text-anchor="middle" font-size="12">latent {latent}: '
            'activations where it fires (tokens, log scale)</text>'
            f'<g fill="#4c72b0" fill-opacity="0.75">{"".join(bars)}</g>'
            f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - 8}" y2="{h - pad_b}" stroke="#333"/>'
            f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{h - pad_b}" stroke="#333"/>'
            f'<text x="{pad_l - 4}" y="{pad_t + 4}" text-anchor="end" font-size="10">{top:,}</text>'
            f'<text x="{pad_l - 4}" y="{h - pad_b}" text-anchor="end" font-size="10">0</text>'
            f'<text x="{pad_l}" y="{h - pad_b + 14}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{w - 8}" y="{h - pad_b + 14}" text-anchor="end" font-size="10">'
            f'{edges[-1]:.3g}</text>'
            f'<text x="{(pad_l + w) / 2}" y="{h - 4}" text-anchor="middle" font-size="11">'
            'activation</text></svg>')


def _explanation_html(r: LatentResult, cfg: InterpretCfg) -> str:
    if r.samples.skipped:
        return f"<p class=\"note\">skipped: {html.escape(r.samples.skipped)}</p>"
    if cfg.backend == "none":
        return "<p class=\"note\">not requested (interpret.backend = none)</p>"
    if r.explanation is None:
        return f"<p class=\"note\">no explanation: {html.escape(r.error)}</p>"
    out = f"<p><b>this neuron fires on</b> {html.escape(r.explanation)}</p>"
    if len(r.completions) > 1:
        items = "".join(f"<li>{html.escape(c) if c else '<i>unparsed</i>'}</li>"
                        for c in r.completions)
        out += f"<p class=\"note\">all completions (the first parsed one is used):</p><ul>{items}</ul>"
    return out


def _latent_page(r: LatentResult, table: list[bytes], cfg: InterpretCfg) -> str:
    s = r.samples
    scale = s.max_act
    parts = [
        f"<p><a href=\"index.html\">&larr; all latents</a></p><h1>Latent {s.latent}</h1>",
        _explanation_html(r, cfg),
        f"<p>fires on {s.n_fired:,} of {s.n_tokens:,} stored tokens (density "
        f"{s.density:.3e}); max activation {s.max_act:.4g}</p>",
        _scores_html(r.scores),
        f"<p>{histogram_svg(s.hist_counts, s.hist_edges, s.latent)}</p>" if s.hist_counts
        else "",
        f"<h2>Top activations</h2><p class=\"note\">the first {s.n_explain} were shown to the "
        "explainer; none of them is used for scoring</p>",
        _examples_table(s.top, table, scale, "max act"),
        "<h2>Activation quantiles</h2><p class=\"note\">bin 0 holds the weakest activations; "
        "these windows are the activating examples of the scorers</p>",
    ]
    for q in sorted({w.quantile for w in s.quantiles}):
        parts.append(f"<h3>bin {q}</h3>")
        parts.append(_examples_table([w for w in s.quantiles if w.quantile == q], table,
                                     scale, "max act"))
    parts.append("<h2>Random windows where it is silent</h2>")
    parts.append(_examples_table(s.random, table, scale, "max act"))
    return _page(f"latent {s.latent}", "\n".join(parts))


def _setup(cfg: InterpretCfg, llm: Explainer, failed: list[int]) -> str:
    """Who explained, in which language, what the scores can say, and which labels failed."""
    effort = (f", reasoning effort {html.escape(llm.reasoning_effort)}"
              if llm.reasoning_effort is not None else "")
    priced = "" if llm.listed else " (not in interpret.models: priced at $0)"
    lang = {"en": "English", "es": "Spanish"}[cfg.explanation_language]
    parts = [f"<p>backend {html.escape(cfg.backend)}, model {html.escape(cfg.model)}{priced}"
             f"{effort}. Explanations written in <b>{lang}</b> from Spanish texts; scored on "
             "held-out Spanish windows the explainer never saw.</p>"]
    if llm.auc_note:
        parts.append(f"<p class=\"note\">{html.escape(llm.auc_note)}.</p>")
    if failed:
        links = ", ".join(f"<a href=\"{page_name(i)}\">{i}</a>" for i in failed)
        parts.append(f"<p><b>{len(failed)} explanation(s) fail detection</b> (balanced "
                     f"accuracy &lt; {cfg.min_detection:g} on held-out windows; the label does "
                     f"not transfer): {links}</p>")
    return "".join(parts)


def write_report(out_dir: Path, results: list[LatentResult], table: list[bytes],
                 cfg: InterpretCfg, summary: dict[str, Any], cost: dict[str, Any],
                 llm: Explainer, failed: list[int]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        (out_dir / page_name(r.latent)).write_text(_latent_page(r, table, cfg),
                                                   encoding="utf-8")
    scorers = list(cfg.scorers)
    head = ("<tr><th>latent</th><th>explanation (this neuron fires on …)</th>"
            + "".join(f"<th>{html.escape(s)} bal. acc.</th><th>{html.escape(s)} AUC</th>"
                      for s in scorers)
            + "<th>density</th><th>max act</th></tr>")
    rows = []
    for r in results:
        s = r.samples
        if s.skipped:
            text = f"<span class=\"note\">skipped: {html.escape(s.skipped)}</span>"
        elif r.explanation is None:
            why = "not requested" if cfg.backend == "none" else r.error
            text = f"<span class=\"note\">{html.escape(why)}</span>"
        else:
            text = html.escape(r.explanation)
        cells = "".join(f"<td class=\"num\">{_num(r.scores.get(sc, {}).get('balanced_accuracy'))}"
                        f"</td><td class=\"num\">{_num(r.scores.get(sc, {}).get('auc'))}</td>"
                        for sc in scorers)
        rows.append(f"<tr><td class=\"num\"><a href=\"{page_name(s.latent)}\">{s.latent}</a></td>"
                    f"<td>{text}</td>{cells}<td class=\"num\">{s.density:.2e}</td>"
                    f"<td class=\"num\">{s.max_act:.3g}</td></tr>")
    spent = cost.get("spent_usd")
    money = (f"estimated cost <= ${cost['estimated_usd']:.4f} for {cost['requests_planned']} "
             f"uncached requests (input tokens: {html.escape(cost['token_count_method'])}; "
             "output tokens counted at their max_tokens, an upper bound)")
    if "estimated_usd_batch" in cost:
        money += f"; <= ${cost['estimated_usd_batch']:.4f} with the Batch API discount"
    if spent is not None:
        money += f"; spent this run ${spent:.4f} on {cost.get('requests_sent', 0)} answered requests"
    if not cost.get("token_count_exact", True):
        money += (". <b>Token counts are a chars/4 estimate</b>: tiktoken's encoding could not "
                  "be loaded offline")
    notice = ("<p><b>No explanations were requested</b> (interpret.backend = none). The "
              "explainer requests are in <a href=\"requests.jsonl\">requests.jsonl</a>, ready "
              "for the Batch API.</p>" if cfg.backend == "none" else "")
    stats = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td class=\"num\">"
                    f"{_num(v) if isinstance(v, float) else v}</td></tr>"
                    for k, v in summary.items())
    body = (f"<h1>Latent explanations</h1>{notice}{_setup(cfg, llm, failed)}"
            f"<table>{stats}</table>"
            f"<p class=\"note\">{money}</p><table>{head}{''.join(rows)}</table>")
    index = out_dir / "index.html"
    index.write_text(_page("Latent explanations", body), encoding="utf-8")
    return index
