// The hftlab serve page: plain DOM code, no framework and no build step. Everything the
// server sends is written with textContent (never innerHTML), so uploaded text cannot inject markup.
// The formatting helpers (num, interval, duration, comparison, cell, option) are in format.js.
"use strict";

const KEY_STORAGE = "hftlab-api-key";
const POLL_MS = 1500;
const FINISHED = new Set(["deployed", "refused", "failed"]);

let pollTimer = null;
let currentJob = null;
let adapterUrl = null;

const $ = (id) => document.getElementById(id);

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }
}

function describe(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return `${detail} (HTTP ${status})`;
  return `The service answered HTTP ${status}`;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", `Bearer ${sessionStorage.getItem(KEY_STORAGE) || ""}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 || response.status === 403) {
    loggedOut("The API key was not accepted (HTTP " + response.status + "). Check it and log in again.");
    throw new ApiError(response.status, null);
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    throw new ApiError(response.status, body);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

// ---- log in ------------------------------------------------------------------------------

function loggedOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  stopPolling();
  $("app").hidden = true;
  $("whoami").hidden = true;
  $("login-section").hidden = false;
  if (message) say(message, true);
}

async function logIn(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
  let me;
  try {
    me = await apiJson("/api/me");
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) say(error.message, true);
    return;
  }
  $("tenant-name").textContent = me.tenant;
  $("whoami").hidden = false;
  $("login-section").hidden = true;
  $("app").hidden = false;
  say(`Logged in as ${me.tenant}.`);
  await Promise.all([loadOptions(), loadUploads(), loadJobs()]);
}

// ---- uploads -----------------------------------------------------------------------------

async function loadOptions() {
  const options = await apiJson("/api/options");
  for (const [id, values] of [["job-task", options.tasks], ["job-defense", options.defenses]]) {
    const select = $(id);
    select.replaceChildren();
    for (const value of values || []) option(select, value, value);
  }
}

async function loadUploads(selectId) {
  const uploads = await apiJson("/api/uploads");
  const select = $("job-upload");
  select.replaceChildren();
  for (const upload of uploads) option(select, upload.id, `${upload.name} (${upload.rows} rows)`);
  if (selectId !== undefined) select.value = selectId;
}

function showUploadErrors(detail) {
  const body = $("upload-errors").querySelector("tbody");
  body.replaceChildren();
  for (const error of detail.errors || []) {
    const row = document.createElement("tr");
    cell(row, num(error.row));
    cell(row, error.field === null || error.field === undefined ? "" : String(error.field));
    cell(row, String(error.message));
    body.appendChild(row);
  }
  $("upload-errors").hidden = false;
}

async function upload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  $("upload-errors").hidden = true;
  $("upload-result").textContent = "";
  const form = new FormData();
  form.append("file", file);
  say(`Uploading ${file.name}…`);
  try {
    const created = await apiJson("/api/uploads", { method: "POST", body: form });
    const flagged = typeof created.flagged === "number"
      ? ` The screening flagged ${created.flagged}.` : "";
    $("upload-result").textContent = `${created.name}: ${created.rows} rows accepted.${flagged}`;
    say(`Uploaded ${created.name} (${created.rows} rows).`);
    await loadUploads(created.id);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    const detail = error.body && error.body.detail;
    if (error.status === 422 && detail && typeof detail === "object" && !Array.isArray(detail)) {
      const count = (detail.errors || []).length;
      $("upload-result").textContent = `${detail.file || file.name} was rejected: ${count} row error(s).`;
      showUploadErrors(detail);
      say(`Upload rejected: ${count} row error(s), listed below.`, true);
    } else if (error.status !== 401) {
      $("upload-result").textContent = error.message;
      say(`Upload failed: ${error.message}`, true);
    }
  }
}

// ---- jobs --------------------------------------------------------------------------------

async function loadJobs() {
  const jobs = await apiJson("/api/jobs");
  const body = $("jobs-table").querySelector("tbody");
  body.replaceChildren();
  for (const job of jobs) {
    const row = document.createElement("tr");
    cell(row, String(job.id));
    cell(row, String(job.task));
    cell(row, String(job.defense));
    cell(row, num(job.seed));
    cell(row, String(job.status)).className = `badge ${job.status}`;
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "View";
    button.setAttribute("aria-label", `View job ${job.id}`);
    button.addEventListener("click", () => watch(job.id));
    row.appendChild(document.createElement("td")).appendChild(button);
    body.appendChild(row);
  }
  $("no-jobs").hidden = jobs.length > 0;
}

async function startJob(event) {
  event.preventDefault();
  const payload = {
    upload_id: $("job-upload").value,
    task: $("job-task").value,
    defense: $("job-defense").value,
    seed: Number.parseInt($("job-seed").value, 10),
  };
  try {
    const job = await apiJson("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
    say(`Job ${job.id} queued.`);
    await loadJobs();
    watch(job.id);
  } catch (error) {
    if (error instanceof ApiError && error.status !== 401) say(`Could not start the job: ${error.message}`, true);
    else if (!(error instanceof ApiError)) throw error;
  }
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

function watch(id) {
  stopPolling();
  currentJob = id;
  if (adapterUrl) URL.revokeObjectURL(adapterUrl);
  adapterUrl = null;
  $("download").href = "#";
  $("report-section").hidden = true;
  $("progress-section").hidden = false;
  $("job-id").textContent = String(id);
  poll(id);
}

async function poll(id) {
  let job;
  try {
    job = await apiJson(`/api/jobs/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof ApiError) {
      if (error.status !== 401) say(`Job ${id}: ${error.message}`, true);
    } else if (id === currentJob) {
      // the service is unreachable (restarting?): keep watching
      say(`Job ${id}: the service is not answering; retrying…`, true);
      pollTimer = setTimeout(() => poll(id), POLL_MS * 2);
    }
    return;
  }
  if (id !== currentJob) return;
  showProgress(job);
  if (FINISHED.has(job.status)) {
    await loadJobs();
    if (job.status === "failed") say(`Job ${id} failed.`, true);
    else await loadReport(job);
  } else {
    pollTimer = setTimeout(() => poll(id), POLL_MS);
  }
}

function showProgress(job) {
  $("job-status").textContent = String(job.status);
  $("job-status").className = `badge ${job.status}`;
  $("job-stage").textContent = job.stage ? String(job.stage) : "—";
  const total = Number(job.total_steps) || 0;
  const step = Number(job.step) || 0;
  $("job-step").textContent = FINISHED.has(job.status) ? "finished"
    : total ? `${step} / ${total}` : "—";
  $("job-eta").textContent = FINISHED.has(job.status) ? "done" : duration(job.eta_seconds);
  const bar = $("job-progress");
  if (FINISHED.has(job.status)) {
    // the last stage's counter may stop short of its total (an evaluation's tail batch)
    bar.max = 1;
    bar.value = 1;
  } else if (total) {
    bar.max = total;
    bar.value = Math.min(step, total);
  } else {
    bar.removeAttribute("value"); // indeterminate while queued or between stages
  }
  $("job-error").hidden = !job.error;
  $("job-error").textContent = job.error ? `Error: ${job.error}` : "";
  if (!FINISHED.has(job.status)) {
    say(`Job ${job.id}: ${job.status}` + (job.stage ? `, ${job.stage}` : "") +
        (total ? ` (step ${step} of ${total})` : ""));
  }
}

// ---- report ------------------------------------------------------------------------------

async function loadReport(job) {
  const report = await apiJson(`/api/jobs/${encodeURIComponent(job.id)}/report`);
  if (job.id !== currentJob) return;
  const deployed = Boolean(report.decision && report.decision.deployed);
  const decision = $("decision");
  decision.textContent = deployed ? "Deployed: the gate held." : "Refused: the gate did not hold.";
  decision.className = `decision ${deployed ? "deployed" : "refused"}`;
  const reasons = $("reasons");
  reasons.replaceChildren();
  for (const reason of (report.decision && report.decision.reasons) || []) {
    reasons.appendChild(document.createElement("li")).textContent = String(reason);
  }

  const screening = report.screening || {};
  const row = document.createElement("tr");
  for (const key of ["rows", "flagged", "kept"]) cell(row, num(screening[key]));
  $("screening").querySelector("tbody").replaceChildren(row);

  $("harmful-score").textContent = comparison(report.harmful_score);
  $("finetune-accuracy").textContent = comparison(report.finetune_accuracy);

  const policy = $("policy");
  policy.replaceChildren();
  for (const [key, value] of Object.entries(report.policy || {})) {
    policy.appendChild(document.createElement("dt")).textContent = key.replaceAll("_", " ");
    policy.appendChild(document.createElement("dd")).textContent = interval(value) || num(value, 3);
  }

  // The deployed adapter and the query form exist only for a job the gate let through.
  $("download-row").hidden = !deployed;
  $("generate-form").hidden = !deployed;
  $("generate-output").textContent = "";
  $("report-section").hidden = false;
  say(`Job ${job.id} finished: ${deployed ? "deployed" : "refused by the gate"}.`);
  await loadPlots(report.plots || [], job.id);
}

async function loadPlots(urls, jobId) {
  // Plots need the bearer token, so they are fetched and shown from blob URLs; the holder's
  // data-loaded attribute tells a screenshot (or a test) when every one has arrived.
  const holder = $("plots");
  holder.replaceChildren();
  delete holder.dataset.loaded;
  const loads = urls.map(async (url) => {
    const name = decodeURIComponent(String(url).split("/").pop() || "plot");
    const figure = holder.appendChild(document.createElement("figure"));
    const image = figure.appendChild(document.createElement("img"));
    image.alt = `Plot ${name}`;
    const caption = figure.appendChild(document.createElement("figcaption"));
    caption.textContent = name;
    try {
      const blob = await (await api(String(url))).blob();
      if (jobId !== currentJob) return;
      image.src = URL.createObjectURL(blob);
      await image.decode();
    } catch (error) {
      caption.textContent = `${name}: could not be loaded (${error.message})`;
    }
  });
  await Promise.all(loads);
  if (jobId === currentJob) holder.dataset.loaded = "true";
}

async function downloadAdapter(event) {
  if (adapterUrl) return; // already fetched: let the link download the blob
  event.preventDefault();
  const id = currentJob;
  say("Fetching the adapter…");
  try {
    const blob = await (await api(`/api/jobs/${encodeURIComponent(id)}/adapter`)).blob();
    adapterUrl = URL.createObjectURL(blob);
    const link = $("download");
    link.href = adapterUrl;
    link.download = `adapter-${id}.zip`;
    link.click();
    say(`Adapter of job ${id} downloaded.`);
  } catch (error) {
    if (error instanceof ApiError && error.status !== 401) say(`Download failed: ${error.message}`, true);
  }
}

async function generate(event) {
  event.preventDefault();
  const output = $("generate-output");
  output.textContent = "Generating…";
  try {
    const answer = await apiJson(`/api/jobs/${encodeURIComponent(currentJob)}/generate`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("generate-prompt").value }),
    });
    output.textContent = String(answer.completion);
  } catch (error) {
    output.textContent = error.message;
  }
}

// ---- wiring ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (key) logIn(key);
  });
  $("logout").addEventListener("click", () => {
    loggedOut(null);
    say("Logged out.");
  });
  $("upload-form").addEventListener("submit", upload);
  $("job-form").addEventListener("submit", startJob);
  $("download").addEventListener("click", downloadAdapter);
  $("generate-form").addEventListener("submit", generate);
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) logIn(saved);
});
