// The iterations page: each running job's stages, steps, ETA, result and log, refreshed every second
// from /admin/api/jobs/{id} until the job ends.

import { getJson } from "./api.js";

const POLL_MS = 1000;

function stageDetail(stage) {
  const parts = [];
  if (stage.step) parts.push(stage.total ? `step ${stage.step}/${stage.total}` : `step ${stage.step}`);
  if (stage.eta_s !== undefined && stage.eta_s !== null && stage.status === "running") {
    parts.push(`ETA ${Math.round(stage.eta_s)} s`);
  }
  for (const [key, value] of Object.entries(stage.metrics ?? {})) parts.push(`${key} ${Number(value).toPrecision(4)}`);
  if (stage.seconds !== undefined && stage.seconds !== null && stage.status !== "running") {
    parts.push(`${Math.round(stage.seconds)} s`);
  }
  if (stage.note) parts.push(stage.note);
  return parts.join(" · ");
}

function show(article, job) {
  const field = (name) => article.querySelector(`[data-field="${name}"]`);
  article.dataset.status = job.status;
  const status = field("status");
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  field("iteration").textContent = job.iteration ?? "…";
  field("elapsed").textContent = String(Math.round(job.elapsed_s));
  for (const stage of job.stages) {
    const item = article.querySelector(`[data-stage="${stage.name}"]`);
    if (!item) continue;
    item.className = `stage status-${stage.status}`;
    item.querySelector('[data-field="stage-status"]').textContent = stage.status;
    item.querySelector('[data-field="stage-detail"]').textContent = stageDetail(stage);
    const bar = item.querySelector("progress");
    bar.hidden = !stage.total;
    if (stage.total) {
      bar.max = stage.total;
      bar.value = stage.step ?? 0;
    }
  }
  const result = field("result");
  result.replaceChildren();
  if (job.policy_version) {
    const link = document.createElement("a");
    link.href = "/admin/versions";
    link.textContent = "Report card";
    const name = document.createElement("strong");
    name.textContent = job.policy_version;
    result.append("New policy ", name, job.served ? ", now served. " : ". ", link);
  }
  if (job.error) {
    const error = document.createElement("span");
    error.className = "error";
    error.textContent = ` ${job.error}`;
    result.append(error);
  }
  field("log").textContent = job.log_tail;
  if (job.status !== "running") article.querySelector(".cancel-form")?.remove();
}

async function follow(article) {
  const url = `/admin/api/jobs/${article.dataset.jobId}`;
  for (;;) {
    try {
      const job = await getJson(url);
      show(article, job);
      if (job.status !== "running") return;
    } catch (error) {
      console.warn("job progress:", error.message);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

for (const article of document.querySelectorAll('.job[data-status="running"]')) follow(article);
