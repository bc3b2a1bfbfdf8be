// Polls /status.json (gateway/status.py) and redraws the table.
const REFRESH_MS = 2000;

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
}

function draw(report) {
  const body = document.getElementById("rows");
  body.replaceChildren();
  for (const r of report.rows) {
    const row = body.insertRow();
    row.className = r.state.replace(" ", "-");
    row.dataset.metric = r.metric;
    cell(row, r.metric);
    cell(row, r.value === null ? "–" : `${r.value.toFixed(r.unit === "ms" ? 1 : 2)} ${r.unit}`, "value");
    cell(row, r.target);
    cell(row, r.alert);
    cell(row, r.state, "state");
    cell(row, r.source, "note");
  }
  document.getElementById("window").textContent = report.window;
  document.getElementById("problem").textContent = report.unreachable.length
    ? `metrics not reachable: ${report.unreachable.join(", ")}` : "";
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function poll() {
  try {
    const answer = await fetch("/status.json", { cache: "no-store" });
    draw(await answer.json());
  } catch (error) {
    document.getElementById("problem").textContent = `status unavailable: ${error}`;
  }
  setTimeout(poll, REFRESH_MS);
}

poll();
