// adapterzoo serve: the few actions a page needs (copy, pull, verify, trash, live job progress).
// Reading works without this file. Text from files and sources is only ever set with textContent.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

function toast(message) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 2600);
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body || {}),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(answer.detail) ? answer.detail.map(d => d.msg).join("; ") : answer.error;
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return answer;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function size(bytes) {
  if (bytes == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return `${i ? bytes.toFixed(1) : bytes} ${units[i]}`;
}

function describe(p) {
  if (!p || !p.stage) return "";
  if (p.bytes != null) {
    const share = p.total ? ` (${Math.floor(100 * p.bytes / p.total)}%)` : "";
    const eta = p.eta != null ? ` · ETA ${Math.ceil(p.eta)} s` : "";
    return `${p.stage} ${size(p.bytes)} of ${size(p.total)}${share} · ${size(p.rate)}/s${eta}`;
  }
  if (p.total != null) return `${p.stage} ${p.done} of ${p.total}${p.path || p.file ? " · " + (p.path || p.file) : ""}`;
  return `${p.stage}${p.ref ? " " + p.ref : ""}`;
}

function share(p) {
  if (!p) return 0;
  if (p.bytes != null && p.total) return p.bytes / p.total;
  if (p.total) return p.done / p.total;
  return 0;
}

// Follow a job's Server-Sent Events until its final state.
function follow(jobId, on) {
  const source = new EventSource(`/api/jobs/${jobId}/events`);
  source.addEventListener("progress", e => on.progress && on.progress(JSON.parse(e.data)));
  source.addEventListener("result", e => on.result && on.result(JSON.parse(e.data)));
  source.addEventListener("state", e => {
    const s = JSON.parse(e.data);
    if (s.state !== "running") {
      source.close();
      on.end && on.end(s);
    }
  });
  return source;
}

function resultLine(r) {
  const line = document.createElement("li");
  const words = r.verdict ? [r.verdict, r.file] : r.summary ? [r.summary] : [r.status, r.path || r.ref];
  if (r.id != null) {
    const a = document.createElement("a");
    a.href = `/files/${r.id}`;
    a.textContent = words.filter(Boolean).join(" ");
    line.appendChild(a);
  } else {
    line.textContent = words.filter(Boolean).join(" ");
  }
  const why = r.error || r.reason || (r.reasons && r.reasons.join("; "));
  if (why) line.appendChild(document.createTextNode(`: ${why}`));
  return line;
}

function startPull(button) {
  const status = button.parentElement.querySelector(".job-status");
  const library = document.getElementById("pull-library");
  button.disabled = true;
  status.className = "job-status";
  status.textContent = "starting…";
  post("/api/jobs", {action: "pull", refs: [button.dataset.ref], library: library ? library.value : null})
    .then(job => follow(job.id, {
      progress: p => { status.textContent = describe(p); },
      result: r => {
        status.textContent = "";
        if (r.error) { status.textContent = `failed: ${r.error}`; return; }
        const a = document.createElement("a");
        a.href = `/files/${r.id}`;
        a.className = "pulled";
        a.textContent = `${r.status}: ${r.path.split("/").pop()} — open`;
        status.appendChild(a);
        status.dataset.fileId = r.id;
      },
      end: s => {
        status.classList.add(s.state);
        status.dataset.state = s.state;
        if (s.state !== "done") status.textContent = `${s.state}${s.error ? ": " + s.error : ""}`;
        button.disabled = false;
      },
    }))
    .catch(err => { status.textContent = err.message; status.classList.add("failed"); button.disabled = false; });
}

function startVerify(form) {
  const status = form.querySelector(".job-status");
  const data = new FormData(form);
  const body = {action: "verify", ids: [Number(form.dataset.verify)], checkpoint: Number(data.get("checkpoint"))};
  if (data.get("steps")) body.steps = Number(data.get("steps"));
  if (data.get("size")) body.size = data.get("size");
  form.querySelector("button").disabled = true;
  status.textContent = "starting…";
  post("/api/jobs", body)
    .then(job => follow(job.id, {
      progress: p => { status.textContent = p.stage === "load" ? "loading the checkpoint…" : describe(p); },
      result: r => { status.textContent = `${r.verdict}${r.reasons.length ? ": " + r.reasons.join("; ") : ""}`;
                     status.dataset.verdict = r.verdict; },
      end: s => {
        status.dataset.state = s.state;
        if (s.state === "done") { location.reload(); return; }
        status.textContent = `${s.state}${s.error ? ": " + s.error : ""}`;
        form.querySelector("button").disabled = false;
      },
    }))
    .catch(err => { status.textContent = err.message; form.querySelector("button").disabled = false; });
}

function followJobCard(card) {
  const bar = card.querySelector("progress");
  const text = card.querySelector(".progress-text");
  const results = card.querySelector(".results");
  const state = card.querySelector(".state");
  follow(card.dataset.job, {
    progress: p => { bar.value = share(p); text.textContent = describe(p); },
    result: r => results.appendChild(resultLine(r)),
    end: s => {
      card.dataset.state = s.state;
      card.className = `job state-${s.state}`;
      state.textContent = s.state;
      bar.value = 1;
      text.textContent = s.error || "";
      const cancel = card.querySelector(".cancel");
      if (cancel) cancel.remove();
    },
  });
}

document.addEventListener("click", event => {
  const target = event.target.closest("button");
  if (!target) return;
  if (target.dataset.copy !== undefined) {
    copyText(target.dataset.copy).then(() => toast(`copied ${target.dataset.copy}`), () => toast("could not copy"));
  } else if (target.classList.contains("pull")) {
    startPull(target);
  } else if (target.dataset.cancel) {
    post(`/api/jobs/${target.dataset.cancel}/cancel`).then(() => toast("cancelling…"), err => toast(err.message));
  } else if (target.dataset.action === "reveal") {
    post(`/api/files/${target.dataset.id}/reveal`)
      .then(r => { if (!r.opened) copyText(r.path); toast(r.opened ? "opened the folder" : `no file manager here; path copied: ${r.path}`); },
            err => toast(err.message));
  } else if (target.dataset.action === "trash") {
    if (!confirm(`Move ${target.dataset.name} (and its sidecars) to the trash?`)) return;
    post(`/api/files/${target.dataset.id}/trash`)
      .then(() => { toast("moved to the trash"); setTimeout(() => { location.href = "/"; }, 800); }, err => toast(err.message));
  } else if (target.dataset.action === "enrich") {
    target.disabled = true;
    post("/api/jobs", {action: "enrich", ids: [Number(target.dataset.id)]})
      .then(job => follow(job.id, {end: () => location.reload()}), err => { toast(err.message); target.disabled = false; });
  }
});

document.addEventListener("submit", event => {
  const form = event.target;
  if (form.dataset.verify) {
    event.preventDefault();
    startVerify(form);
  } else if (form.dataset.start) {
    event.preventDefault();
    const body = form.dataset.start === "scan" ? {action: "scan", paths: [form.elements.path.value]}
                                               : {action: "enrich", all: true};
    post("/api/jobs", body).then(() => location.reload(), err => toast(err.message));
  }
});

document.addEventListener("change", event => {
  if (event.target.matches("select[data-autosubmit]")) event.target.form.submit();
});

document.querySelectorAll('.job[data-state="running"]').forEach(followJobCard);
