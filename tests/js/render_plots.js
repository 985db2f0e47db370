// Renders every chart of a `dvc plots show` page to SVG with the page's own inlined scripts
// (no network, no browser): prints each chart's title, scale types, axis titles and mark
// count as JSON. Used by tests/test_dvc_plots.py.
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
globalThis.self = globalThis;  // the UMD builds attach vega, vegaLite, vegaEmbed to it
for (const m of html.matchAll(/<script>([\s\S]*?)<\/script>/g)) vm.runInThisContext(m[1]);
const specs = [...html.matchAll(/var spec = ([\s\S]*?);\s*vegaEmbed\('#([^']*)'/g)];
(async () => {
  const out = {embed: typeof globalThis.vegaEmbed, plots: {}};
  for (const [, json, id] of specs) {
    const spec = JSON.parse(json);
    const vg = globalThis.vegaLite.compile(spec).spec;
    const svg = await new globalThis.vega.View(globalThis.vega.parse(vg), {renderer: "none"}).toSVG();
    out.plots[id] = {
      title: spec.title && spec.title.text,
      scales: Object.fromEntries((vg.scales || []).map(s => [s.name, s.type || "linear"])),
      axis_titles: [...svg.matchAll(/role-axis-title"[^>]*><text[^>]*>([^<]*)</g)].map(m => m[1]),
      marks: (svg.match(/<path|<circle|<line/g) || []).length,
    };
  }
  console.log(JSON.stringify(out));
})().catch(e => { console.error(String(e)); process.exit(1); });
