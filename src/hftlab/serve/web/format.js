// Formatting helpers of the hftlab serve page (loaded before app.js): numbers, intervals,
// durations and table cells. Every value is turned into text for textContent, never markup.
"use strict";

function num(value, digits = 2) {
  if (value === null || value === undefined) return "n/a";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  if (Array.isArray(value)) return value.map((v) => num(v, digits)).join(", ");
  if (typeof value === "object") {
    return Object.entries(value).map(([k, v]) => `${k} ${num(v, digits)}`).join(", ");
  }
  return String(value);
}

function interval(pair) {
  return Array.isArray(pair) && pair.length === 2 ? `[${num(pair[0])}, ${num(pair[1])}]` : null;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "estimating…";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `about ${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `about ${m} min ${s % 60} s` : `about ${Math.floor(m / 60)} h ${m % 60} min`;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.appendChild(o);
}

// "aligned → fine-tuned (Δ +x, 95% interval [lo, hi])" from {aligned, finetuned, delta, delta_ci95}
function comparison(metric) {
  if (!metric || typeof metric !== "object") return "n/a";
  const fixed = (value) => (typeof value === "number" ? value.toFixed(2) : num(value));
  const parts = [];
  if ("aligned" in metric || "finetuned" in metric) {
    parts.push(`aligned ${fixed(metric.aligned)} → fine-tuned ${fixed(metric.finetuned)}`);
  }
  if ("delta" in metric) {
    const ci = interval(metric.delta_ci95);
    const sign = typeof metric.delta === "number" && metric.delta > 0 ? "+" : "";
    parts.push(`Δ ${sign}${fixed(metric.delta)}` + (ci ? `, 95% interval ${ci}` : ""));
  }
  const known = new Set(["aligned", "finetuned", "delta", "delta_ci95"]);
  for (const [key, value] of Object.entries(metric)) {
    if (known.has(key)) continue;
    if (value === null || value === undefined) continue;
    if (key === "n") {
      parts.push(`n = ${num(value)}`);
      continue;
    }
    if (key === "task_label_answers") {
      parts.push(`bare task-label answers ${num(value)}`);
      continue;
    }
    if (key === "measure") {
      parts.push(`measure: ${String(value).replaceAll("_", " ")}`);
      continue;
    }
    if (key === "judge_verdict" && typeof value === "object") {
      parts.push(`judge's verdict aligned ${fixed(value.aligned)} → fine-tuned ` +
                 `${fixed(value.finetuned)}`);
      continue;
    }
    const label = key.replace(/_ci95$/, " 95% interval").replace("finetuned", "fine-tuned")
      .replaceAll("_", " ");
    parts.push(`${label} ${interval(value) || fixed(value)}`);
  }
  return parts.join("; ");
}
